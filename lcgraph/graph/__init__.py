"""The compiler: capture an HF LLaMA model into one torch.fx graph (torch.export) with per-node
annotations, then the passes that split it into pipeline stages and rewrite each stage (relay, fused
loss, attention lowering, Ulysses, fused RMSNorm/SwiGLU/rotary).

Owns: CapturedGraph, StageGraph and every graph -> graph pass. May import: lcgraph.ops.
"""
