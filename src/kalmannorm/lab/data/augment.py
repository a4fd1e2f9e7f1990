"""Batched augmentation on tensors: random crop after zero padding, and horizontal flip.

Random draws are made for a whole *global* batch from one generator and then applied to any
slice of it, so a batch split across processes or accumulation steps is augmented exactly as
the same batch in one piece (the distributed-equality and resume tests rely on it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as torch_f


@dataclass(frozen=True)
class Draw:
    """Random choices for a batch: crop offsets (N, 2) in [0, 2 pad] and flip flags (N,)."""

    offsets: Tensor
    flips: Tensor

    def __getitem__(self, part: slice | Tensor) -> Draw:
        return Draw(self.offsets[part], self.flips[part])


@dataclass(frozen=True)
class Augmentation:
    """Pad-and-crop by up to ``pad`` pixels and (if ``flip``) mirror half the images."""

    pad: int = 0
    flip: bool = False

    @property
    def active(self) -> bool:
        return self.pad > 0 or self.flip

    def draw(self, n: int, generator: torch.Generator) -> Draw:
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator)
        flips = (
            torch.rand(n, generator=generator) < 0.5
            if self.flip
            else torch.zeros(n, dtype=torch.bool)
        )
        return Draw(offsets, flips)

    def apply(self, x: Tensor, draw: Draw) -> Tensor:
        """Augment images ``x`` (N, C, H, W) with ``draw`` (N entries)."""
        if self.pad > 0:
            x = random_crop(x, draw.offsets.to(x.device), self.pad)
        if self.flip:
            x = torch.where(draw.flips.to(x.device)[:, None, None, None], x.flip(3), x)
        return x


def random_crop(x: Tensor, offsets: Tensor, pad: int) -> Tensor:
    """Zero-pad ``x`` by ``pad`` on every side and cut each image at its (row, column) offset."""
    n, _, h, w = x.shape
    padded = torch_f.pad(x, (pad, pad, pad, pad))
    rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = offsets[:, 1, None] + torch.arange(w, device=x.device)  # (N, W)
    index = torch.arange(n, device=x.device)[:, None, None]
    # advanced indexing on (N, H', W', C) -> (N, H, W, C)
    out = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
