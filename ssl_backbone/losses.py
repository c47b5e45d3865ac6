"""The DINOv2 objective's losses and teacher targets (spec ../shared/specs/ssl.md §1.3), plus
DINOv3's Gram anchoring (§10.1): plain functions and small modules with no training logic.

Invariant: every reduction over the batch that the official code all-reduces across ranks
goes through :func:`all_sum`, so N processes each holding 1/N of a batch compute what one
process holding the whole batch computes; with one process (no process group) it is the
identity. Why it matters: the official iBOT Sinkhorn-Knopp calls ``all_reduce`` unguarded and
fails in one process (DINOv2 PR #590); ours is tested in one process and in simulated ranks.

Deliberate deviations from the official code, each tested in tests/ssl_backbone/test_dinov2.py:

* KoLeo runs in float32 whatever the input dtype: in fp16 a duplicated tile (water, bare soil,
  uniform forest) made the official loss ``inf`` (log of an underflowed 1e-8).
* Sinkhorn-Knopp subtracts the (global) maximum logit before ``exp`` and guards its divisions:
  the official code overflows for logits/τ beyond ~88 (NaN targets); the subtraction cancels
  in the normalisation, and a prototype whose mass underflows to 0 stays 0 instead of 0/0, so
  results are otherwise equal.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place on a copy); the identity without a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, iterations: int = 3,
                   n_total: int | float | None = None) -> torch.Tensor:
    """Teacher targets [N, K] by Sinkhorn-Knopp: rows (samples) sum to 1, prototype marginals
    equalised. ``n_total``: the number of samples over all ranks (default: this rank's count
    times the world size; iBOT passes the all-reduced masked-token count)."""
    x = logits.float() / temp
    x = x - all_max(x.max())  # deviation: overflow guard (cancels in the normalisation)
    q = torch.exp(x).t()  # K × N
    k = q.shape[0]
    n = float(n_total) if n_total is not None else float(q.shape[1] * world_size())
    tiny = torch.finfo(torch.float32).tiny  # a prototype no sample reaches stays at 0, not NaN
    q = q / all_sum(q.sum())
    for _ in range(iterations):
        q = q / all_sum(q.sum(dim=1, keepdim=True)).clamp_min(tiny) / k
        q = q / q.sum(dim=0, keepdim=True).clamp_min(tiny) / n
    return (q * n).t()


def all_max(x: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


class Centering(nn.Module):
    """DINO/iBOT centring: targets softmax((t − c)/τ) with ``c`` an EMA (momentum 0.9) of the
    teacher logits' mean, updated *lazily*: the mean of step n is folded in at step n+1, so
    step n's targets use a centre built from earlier steps only (as the official code)."""

    def __init__(self, k: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, k))
        self.register_buffer("pending", torch.zeros(1, k))
        self.register_buffer("has_pending", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def targets(self, logits: torch.Tensor, temp: float) -> torch.Tensor:
        self.apply_pending()
        out = F.softmax((logits.float() - self.center) / temp, dim=-1)
        count = all_sum(torch.tensor(float(logits.shape[0]), device=logits.device))
        self.pending.copy_(all_sum(logits.float().sum(dim=0, keepdim=True)) / count.clamp_min(1))
        self.has_pending.fill_(bool(count > 0))
        return out

    @torch.no_grad()
    def apply_pending(self) -> None:
        if bool(self.has_pending):
            self.center.mul_(self.momentum).add_(self.pending, alpha=1 - self.momentum)
            self.has_pending.fill_(False)


def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], student_temp: float = 0.1
              ) -> torch.Tensor:
    """L_DINO (§1.3): ``teacher`` = targets of the 2 global crops [B, K] each, ``student`` =
    logits of all views (the 2 globals first, then the locals). Each teacher global is matched
    with every student view but itself; the mean over the 2·(V−1) terms."""
    total, terms = student[0].new_zeros((), dtype=torch.float32), 0
    logp = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student]
    for g, t in enumerate(teacher):
        for v, lp in enumerate(logp):
            if v == g:
                continue
            total = total - (t * lp).sum(dim=-1).mean()
            terms += 1
    return total / max(terms, 1)


def ibot_loss(student_logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
              n_crops: int, student_temp: float = 0.1) -> torch.Tensor:
    """L_iBOT (§1.3): over the masked tokens of all crops ([M, K] logits and targets, each
    token weighted 1/|M_i| of its crop), summed, divided by the number of crops ``n_crops``
    (2B: unmasked crops count in the denominator)."""
    if student_logits.shape[0] == 0:
        return student_logits.new_zeros((), dtype=torch.float32) + 0.0 * student_logits.sum()
    lp = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    per_token = -(targets * lp).sum(dim=-1)
    return (per_token * weights).sum() / n_crops


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (§1.3) on one crop's student CLS features [B, D], in float32 (deviation, see the
    module docstring): −mean log(distance to the nearest other sample + eps)."""
    with torch.autocast(x.device.type, enabled=False):
        z = F.normalize(x.float(), dim=-1, eps=eps)
        sim = z @ z.t()
        sim.fill_diagonal_(-1.0)
        nn_idx = sim.argmax(dim=1)
        d = F.pairwise_distance(z, z[nn_idx], eps=eps)
        return -torch.log(d + eps).mean()


def gram_loss(student_patches: torch.Tensor, teacher_patches: torch.Tensor,
              remove_neg: bool = False) -> torch.Tensor:
    """DINOv3's Gram anchoring (§10.1), per image: MSE between the patch-similarity matrices
    of L2-normalised student and Gram-teacher features [B, N, D], in float32."""
    with torch.autocast(student_patches.device.type, enabled=False):
        s = F.normalize(student_patches.float(), dim=-1)
        t = F.normalize(teacher_patches.float(), dim=-1)
        gs, gt = s @ s.transpose(1, 2), t @ t.transpose(1, 2)
        if remove_neg:
            gs, gt = gs.clamp_min(0), gt.clamp_min(0)
        return F.mse_loss(gs, gt)
