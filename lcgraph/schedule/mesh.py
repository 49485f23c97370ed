"""A rank's place in the (pp, dp, sp) device mesh: one numbering for the trainer and the NCCL model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Coords:
    """This rank's place in the (pp, dp, sp) mesh; sp is innermost so its all-to-alls stay within a node."""

    rank: int
    pp: int
    dp: int
    sp: int
    pp_rank: int
    dp_rank: int
    sp_rank: int

    @classmethod
    def of(cls, rank: int, pp: int, dp: int, sp: int) -> Coords:
        return cls(rank, pp, dp, sp, rank // (dp * sp), (rank // sp) % dp, rank % sp)

    def global_rank(self, pp_rank: int, dp_rank: int | None = None, sp_rank: int | None = None) -> int:
        dp_rank = self.dp_rank if dp_rank is None else dp_rank
        sp_rank = self.sp_rank if sp_rank is None else sp_rank
        return pp_rank * self.dp * self.sp + dp_rank * self.sp + sp_rank
