"""Parallel sizes that layers take at construction (tensor parallel size 1 for now)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ParallelConfig:
    """Tensor-parallel group of this process: layers shard weights by `tp_size` / `tp_rank`."""

    tp_size: int = 1
    tp_rank: int = 0

    def __post_init__(self) -> None:
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(
                f"tensor parallel rank {self.tp_rank} is outside a group of size {self.tp_size}."
            )

    def shard(self, size: int, what: str) -> int:
        """Size of this rank's shard of a dimension of `size`, which must divide evenly."""
        if size % self.tp_size:
            raise ValueError(
                f"{what} ({size}) is not divisible by tensor_parallel_size ({self.tp_size}); "
                "pick a tensor_parallel_size that divides it."
            )
        return size // self.tp_size
