"""Cheap collapse monitors for self-supervised training (spec ../shared/specs/ssl.md §8).

* RankMe of an [N, D] embedding matrix: exp(entropy of its normalised singular values);
  falls to ~1 on complete collapse and to r on rank-r (dimensional) collapse.
* Per-dimension std of the L2-normalised embeddings: ≈ 1/√D when healthy, ≈ 0 when every
  sample is the same (blind to dimensional collapse: use with RankMe).
* On prototype distributions [N, K]: mean per-sample entropy H̄, entropy of the batch marginal
  H(p̄) and their gap (→ 0 for one-prototype *and* uniform collapse), and the number of distinct
  argmax prototypes.

:func:`collapse_report` turns them into a verdict with the thresholds of the spec's E3 test
(RankMe/D > 0.1, H(p̄) − H̄ > 0.5 nats, distinct argmax > 10 % of the samples).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def rankme(z: torch.Tensor, eps: float = 1e-7) -> float:
    s = torch.linalg.svdvals(z.float())
    p = s / s.sum().clamp_min(1e-12) + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


@torch.no_grad()
def normalised_std(z: torch.Tensor) -> float:
    return float(F.normalize(z.float(), dim=-1).std(dim=0).mean())


@torch.no_grad()
def prototype_stats(p: torch.Tensor) -> dict:
    p = p.float().clamp_min(1e-12)
    p = p / p.sum(dim=-1, keepdim=True)
    per_sample = float(-(p * p.log()).sum(dim=-1).mean())
    marginal = p.mean(dim=0)
    h_marginal = float(-(marginal * marginal.log()).sum())
    return {"entropy_mean": per_sample, "entropy_marginal": h_marginal,
            "entropy_gap": h_marginal - per_sample,
            "distinct_argmax": int(p.argmax(dim=-1).unique().numel())}


def collapse_report(embeddings: torch.Tensor, probs: torch.Tensor | None = None) -> dict:
    """Monitors of one batch and ``collapsed``: the list of monitors out of their healthy band."""
    n, d = embeddings.shape
    out = {"rankme": rankme(embeddings), "normalised_std": normalised_std(embeddings),
           "healthy_std": 1 / math.sqrt(d)}
    bad = []
    if out["rankme"] / min(n, d) <= 0.1:
        bad.append("rankme")
    if probs is not None:
        out.update(prototype_stats(probs))
        if out["entropy_gap"] <= 0.5:
            bad.append("entropy_gap")
        if out["distinct_argmax"] <= 0.1 * probs.shape[0]:
            bad.append("distinct_argmax")
    out["collapsed"] = bad
    return out
