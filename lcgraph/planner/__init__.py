"""Predicting a layout before touching a GPU: device profiles, per-node costs read from the graph, the cost
model (time and memory on a device), the event simulator that replays programs, and the plan (layout
evaluation, alternatives table, plan files).

Owns: predictions. May import: lcgraph.runtime, lcgraph.graph, lcgraph.schedule, lcgraph.ops.
"""
