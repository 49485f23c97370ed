"""Running one rank: the interpreter of a per-rank program over stage graphs, the optimizers and
gradient sync (replicated AdamW; the distributed optimizer: ZeRO-1 memory, reduce-scatter communication),
model weights and config, the token data and checkpoints.

Owns: what happens on a device during a step. May import: lcgraph.graph, lcgraph.schedule, lcgraph.ops.
"""
