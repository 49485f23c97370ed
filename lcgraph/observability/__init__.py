"""Seeing a run: metrics and W&B logging, Perfetto/PNG timelines (the measured one gathered from every rank), graph
pictures (SVG/HTML), the sweep comparison table and the compute/communication overlap analysis of profiler traces.

Owns: what is written for people to read. May import: lcgraph.runtime, lcgraph.graph, lcgraph.schedule,
lcgraph.ops (never lcgraph.planner or lcgraph.app).
"""
