"""Restrictions evaluated on a batch: which input version each position (or (dest, src) pair) reads."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pathpatch.language.copies import ChannelInput
from pathpatch.language.patterns import Restriction


@dataclass
class PositionContext:
    """Evaluates restrictions on one batch: 1-D [batch, pos] and 2-D [batch, dest, src] masks."""

    masks: dict[str, torch.Tensor]
    batch: int
    seq_len: int
    device: torch.device
    _static: dict[tuple[Restriction, bool], torch.Tensor] = field(default_factory=dict, repr=False)
    """Restrictions the same in every example, on the device: each made once per batch."""

    def holds(self, r: Restriction, two_d: bool) -> torch.Tensor:
        shape = (self.batch, self.seq_len, self.seq_len) if two_d else (self.batch, self.seq_len)
        key = (r, two_d)
        static = self._static.get(key)
        if static is None:
            positions = r.positions(self.seq_len, two_d)
            if positions is None:  # a dataset mask, per example
                return r.mask_in(self.masks, two_d).to(self.device, torch.bool)
            static = torch.from_numpy(np.ascontiguousarray(positions)).to(self.device)
            self._static[key] = static
        return static.expand(shape)

    def atom_holds(self, atom, relevant, two_d: bool) -> torch.Tensor:
        """[batch, pos] or [batch, dest, src]: where exactly `atom`'s restrictions (of `relevant`) hold."""
        shape = (self.batch, self.seq_len, self.seq_len) if two_d else (self.batch, self.seq_len)
        sel = torch.ones(shape, dtype=torch.bool, device=self.device)
        for r in relevant:
            holds = self.holds(r, two_d)
            sel &= holds if r in atom else ~holds
        return sel

    def version_index(self, ci: ChannelInput) -> torch.Tensor | None:
        """Per position (or (dest, src) pair), which input version to read; None if only one."""
        if len(ci.versions) == 1:
            return None
        two_d = ci.channel is not None and ci.channel.is_2d
        relevant = {r for atom in ci.atoms for r in atom}
        shape = (self.batch, self.seq_len, self.seq_len) if two_d else (self.batch, self.seq_len)
        index = torch.zeros(shape, dtype=torch.long, device=self.device)
        for atom, version in zip(ci.atoms, ci.atom_version, strict=True):
            if version:
                index[self.atom_holds(atom, relevant, two_d)] = version
        return index
