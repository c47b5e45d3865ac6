"""From per-pixel bin logits to heights in metres, and the spread of the bin distribution.

HRCH ("linear" AdaBins normalisation, not softmax): p_k = (relu(l_k) + 0.1) / Σ (relu(l) + 0.1),
height = scale · Σ p_k b_k with b = linspace(0.001, 10, 256) and scale = 10. All-zero logits are
a uniform distribution (≈ 50 m), so low heights need confident mass on the low bins.
"""

from __future__ import annotations

import torch

BIN_EPS = 0.1


def bin_centres(n_bins: int, min_depth: float, max_depth: float, device=None) -> torch.Tensor:
    return torch.linspace(min_depth, max_depth, n_bins, device=device, dtype=torch.float32)


def bin_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """[B, K, H, W] logits → [B, K, H, W] probabilities (computed in float32)."""
    w = torch.relu(logits.float()) + BIN_EPS
    return w / w.sum(dim=1, keepdim=True)


def expected_height(probs: torch.Tensor, centres: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, K, H, W] → [B, H, W] metres: scale · Σ p_k b_k, clipped at 0 as the reference does."""
    return torch.relu(torch.einsum("bkhw,k->bhw", probs, centres) * scale)


def height_spread(probs: torch.Tensor, centres: torch.Tensor, scale: float) -> torch.Tensor:
    """Standard deviation (metres) of the per-pixel height distribution over bins."""
    mu = torch.einsum("bkhw,k->bhw", probs, centres)
    second = torch.einsum("bkhw,k->bhw", probs, centres * centres)
    return torch.sqrt(torch.clamp(second - mu * mu, min=0.0)) * scale
