"""iBOT block masks (spec ../shared/specs/ssl.md §1.4), as DINOv2 draws them.

Per batch of ``n`` global crops: ``int(n · probability)`` of them get a mask whose target ratio
is stratified over ``ratio_min_max`` (crop i of those draws uniformly in the i-th of equal
sub-intervals), the rest none, in shuffled order. Per mask: rectangular blocks of at least
``min_block`` patches, area uniform up to what remains (and at most half the grid), aspect
ratio log-uniform in [0.3, 1/0.3], added until the target count is reached; a block that adds
nothing stops the mask early, so a mask may fall short of its target but never exceeds it.

All randomness comes from the ``torch.Generator`` passed in, so a batch's masks are a pure
function of the data loader's seed (exact resume).
"""

from __future__ import annotations

import math

import torch


def block_mask(h: int, w: int, n_target: int, gen: torch.Generator, min_block: int = 4,
               max_block: int | None = None, aspect: float = 0.3) -> torch.Tensor:
    """A [h, w] bool mask with at most ``n_target`` masked patches, in blocks."""
    mask = torch.zeros(h, w, dtype=torch.bool)
    max_block = max_block if max_block is not None else int(0.5 * h * w)
    log_lo, log_hi = math.log(aspect), math.log(1 / aspect)

    def rand() -> float:
        return float(torch.rand((), generator=gen))

    count = 0
    while count < n_target:
        remaining = n_target - count
        hi = min(remaining, max_block)
        added = 0
        for _ in range(10):  # placement attempts for one block
            if hi < min_block:
                break
            area = min_block + rand() * (hi - min_block)
            ratio = math.exp(log_lo + rand() * (log_hi - log_lo))
            bh = int(round(math.sqrt(area * ratio)))
            bw = int(round(math.sqrt(area / ratio)))
            if not (0 < bh < h and 0 < bw < w):
                continue
            top = int(rand() * (h - bh + 1))
            left = int(rand() * (w - bw + 1))
            region = mask[top:top + bh, left:left + bw]
            new = bh * bw - int(region.sum())
            if 0 < new <= hi:
                region.fill_(True)
                added = new
                break
        if added == 0:
            break
        count += added
    return mask


def batch_masks(n_crops: int, h: int, w: int, gen: torch.Generator, probability: float = 0.5,
                ratio_min_max: tuple[float, float] = (0.1, 0.5)) -> torch.Tensor:
    """[n_crops, h·w] bool masks for a batch of global crops (see the module docstring)."""
    n_masked = int(n_crops * probability)
    lo, hi = ratio_min_max
    edges = torch.linspace(lo, hi, n_masked + 1)
    masks = []
    for i in range(n_masked):
        r = float(edges[i] + torch.rand((), generator=gen) * (edges[i + 1] - edges[i]))
        masks.append(block_mask(h, w, int(h * w * r), gen).flatten())
    masks += [torch.zeros(h * w, dtype=torch.bool)] * (n_crops - n_masked)
    order = torch.randperm(n_crops, generator=gen)
    return torch.stack(masks)[order] if masks else torch.zeros(0, h * w, dtype=torch.bool)
