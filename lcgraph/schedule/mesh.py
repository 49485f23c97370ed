"""A rank's place in the (pp, dp, cp, sp) device mesh: one numbering for the trainer and the NCCL model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Coords:
    """This rank's place in the (pp, dp, cp, sp) mesh; sp is innermost so its all-to-alls stay within a node,
    cp (ring attention) next, so a ring spans nodes. The replicas of a stage are its dp * cp * sp ranks."""

    rank: int
    pp: int
    dp: int
    sp: int
    pp_rank: int
    dp_rank: int
    sp_rank: int
    cp: int = 1
    cp_rank: int = 0

    @classmethod
    def of(cls, rank: int, pp: int, dp: int, sp: int, cp: int = 1) -> Coords:
        stage = dp * cp * sp
        return cls(rank, pp, dp, sp, rank // stage, (rank // (cp * sp)) % dp, rank % sp, cp, (rank // sp) % cp)

    def global_rank(
        self, pp_rank: int, dp_rank: int | None = None, sp_rank: int | None = None, cp_rank: int | None = None
    ) -> int:
        dp_rank = self.dp_rank if dp_rank is None else dp_rank
        sp_rank = self.sp_rank if sp_rank is None else sp_rank
        cp_rank = self.cp_rank if cp_rank is None else cp_rank
        return ((pp_rank * self.dp + dp_rank) * self.cp + cp_rank) * self.sp + sp_rank

    @property
    def replicas(self) -> int:
        """Ranks of one stage that hold the same parameters (ZeRO shards optimizer state over them)."""
        return self.dp * self.cp * self.sp

    @property
    def replica_rank(self) -> int:
        """This rank's index among its stage's replicas (the order of the flattened dp x cp x sp group)."""
        return (self.dp_rank * self.cp + self.cp_rank) * self.sp + self.sp_rank

    def replica_global_rank(self, index: int) -> int:
        """Global rank of replica `index` of this rank's stage."""
        return self.pp_rank * self.replicas + index

    def first_and_last_stages(self) -> list[list[int]]:
        """For each replica position, the global ranks of its first and last pipeline stage: the pairs that share a
        tied embedding under pp > 1."""
        return [
            [self.global_rank(0, d, s, r), self.global_rank(self.pp - 1, d, s, r)]
            for d in range(self.dp)
            for r in range(self.cp)
            for s in range(self.sp)
        ]
