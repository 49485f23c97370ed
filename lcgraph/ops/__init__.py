"""Kernels and collectives that passes put into graphs: attention (reference, SDPA, flash), the
Seq1F1B key/value relay, Ulysses all-to-alls, the fused linear + cross-entropy loss, fused RMSNorm, SwiGLU and rotary.

Owns: the numerics of one op. May import: torch and third-party libraries only (no other lcgraph package).
"""
