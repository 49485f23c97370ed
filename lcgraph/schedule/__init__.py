"""Pipeline schedules as plain data: the Action vocabulary (actions), per-rank programs built per
schedule family: gpipe, 1F1B, interleaved, Seq1F1B (programs), p2p transfers and their groups (p2p),
the validator and replay (validator), the text format (text) and the sequence split (sequence).

Owns: programs; nccl (the programs replayed under NCCL's rules, collectives included); mesh (a rank's
(pp, dp, cp, sp) coordinates). May import: nothing else from lcgraph (schedules know no graphs and no tensors).
"""
