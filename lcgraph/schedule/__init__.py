"""Pipeline schedules as plain data: the Action vocabulary, per-rank programs (1F1B, interleaved,
Seq1F1B), p2p pairing, the validator and replay, the text format and the sequence split.

Owns: programs; nccl (the programs replayed under NCCL's rules, collectives included); mesh (a rank's
(pp, dp, sp) coordinates). May import: nothing else from lcgraph (schedules know no graphs and no tensors).
"""
