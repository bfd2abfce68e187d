"""Restrictions evaluated on a batch: which input version each position (or (dest, src) pair) reads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pathpatch.errors import PathPatchError
from pathpatch.language.copies import ChannelInput
from pathpatch.language.patterns import Restriction


@dataclass
class PositionContext:
    """Evaluates restrictions on one batch: 1-D [batch, pos] and 2-D [batch, dest, src] masks."""

    masks: dict[str, torch.Tensor]
    batch: int
    seq_len: int
    device: torch.device

    def holds(self, r: Restriction, two_d: bool) -> torch.Tensor:
        B, T = self.batch, self.seq_len
        i = torch.arange(T, device=self.device)
        if r.kind == "offset":
            out = i[None, :] == (i[:, None] - r.value)  # [dest, src]
        elif r.kind in ("pos", "src"):
            wanted = torch.zeros(T, dtype=torch.bool, device=self.device)
            for p in r.value:
                if -T <= p < T:
                    wanted[p] = True
            if not two_d:
                out = wanted
            else:
                out = wanted[:, None].expand(T, T) if r.kind == "pos" else wanted[None, :].expand(T, T)
        else:
            mask = self.masks.get(r.value)
            if mask is None:
                raise PathPatchError(
                    f"restriction {r} names a mask the dataset lacks; it has: "
                    f"{sorted(self.masks) or 'no masks'}"
                )
            want_dims = 3 if two_d else 2
            if mask.dim() != want_dims:
                kind = "2-D [batch, dest, src] (k/v steps)" if two_d else "1-D [batch, pos]"
                raise PathPatchError(
                    f"restriction {r} needs a {kind} mask but {r.value!r} has shape"
                    f" {tuple(mask.shape)}"
                )
            return mask.to(self.device, torch.bool)
        shape = (B, T, T) if two_d else (B, T)
        return out.expand(shape)

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
