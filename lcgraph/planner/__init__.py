"""Predicting a layout before touching a GPU: device profiles, per-node costs and memory, the event
simulator that replays programs, and the plan (layout evaluation, alternatives table, plan files).

Owns: predictions. May import: lcgraph.runtime, lcgraph.graph, lcgraph.schedule, lcgraph.ops.
"""
