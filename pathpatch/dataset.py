"""A dataset of (reference, counterfactual) token pairs, with the positions where delta is read.

Everything a hypothesis or metric may refer to travels in one frozen object, so a shard of it
is a self-contained unit of work (hashable by content, picklable to workers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, eq=False)
class PairDataset:
    """Pairs of equal-length token sequences plus per-example position masks.

    Attributes:
        reference: [batch, pos] int64 tokens x_r.
        counterfactual: [batch, pos] int64 tokens x_c (same shape as reference).
        scored: [batch, pos] bool, where delta is read (predictions made *at* these positions).
        masks: named per-example masks a hypothesis can refer to: [batch, pos] bool (1-D, for
            input/q/MLP/output steps) or [batch, pos, pos] bool ([dest, src], for k/v steps).
        answer: optional [batch] int64, the correct next token at the last scored position
            (for the logit-difference metric).
        wrong_answer: optional [batch] int64, the competing token.
        example_ids: [batch] int64 global example index (stable across sharding).
    """

    reference: torch.Tensor
    counterfactual: torch.Tensor
    scored: torch.Tensor
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    answer: torch.Tensor | None = None
    wrong_answer: torch.Tensor | None = None
    example_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.example_ids is None:
            object.__setattr__(self, "example_ids", torch.arange(self.reference.shape[0]))

    def __len__(self) -> int:
        return int(self.reference.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.reference.shape[1])

    def select(self, index: slice | torch.Tensor) -> PairDataset:
        """Rows `index` as a new dataset (masks and answers follow; example ids are kept)."""

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index]

        return PairDataset(
            reference=self.reference[index],
            counterfactual=self.counterfactual[index],
            scored=self.scored[index],
            masks={k: v[index] for k, v in self.masks.items()},
            answer=pick(self.answer),
            wrong_answer=pick(self.wrong_answer),
            example_ids=self.example_ids[index],
        )
