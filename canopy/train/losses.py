"""Training losses for the height decoder: SiLog, L1, their weighted sum, and the sparse GEDI loss.

Ground floor of ``canopy.train``: torch, plus the one GEDI footprint rule of
``data_catalog.gedi`` (numpy), so every function can be checked against hand-computed numbers on
tiny tensors and the loss measures a footprint exactly as evaluation does.

Conventions:

* heights are metres; ``pred`` is what ``HeightModel.heights`` returns (≥ 0);
* a target is float with NaN where there is no label; ``valid`` masks (image nodata, date
  mismatch) are combined with the target's own NaNs by :func:`label_mask`;
* a target may be *coarser* than the prediction (lidar CHM at 1 m, model at 0.25 m). The
  prediction is then averaged onto the target grid (:func:`pool_to_target`): supervision happens
  at the lidar's own resolution and the target is never upsampled, which would invent detail the
  lidar never measured.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from data_catalog.gedi import FOOTPRINT_DIAMETER_M

SILOG_LAMBDA = 0.85  # DINOv2/v3 depth heads: Dg = var(g) + 0.15·mean(g)²


@dataclass(frozen=True)
class LossConfig:
    """Weights and constants of the training loss (all echoed in the run's config.json)."""

    silog_weight: float = 0.25
    l1_weight: float = 1.0          # metres; anchors the absolute scale SiLog only weakly sees
    silog_lambda: float = SILOG_LAMBDA
    # ε of log(h + ε). The depth heads use 1e-3 m; canopy targets are 0 m on bare ground, where a
    # tiny ε turns centimetres of error into log-ratios of ~5 and lets ground pixels dominate
    # (log(h + 1), as often used for canopy height, learned best in our runs; docs/training.md).
    silog_eps: float = 1.0
    gedi_weight: float = 0.0
    gedi_percentile: float = 95.0   # compare with RH95 (98 for RH98)
    gedi_rh_column: str = "rh95"
    footprint_diameter_m: float = FOOTPRINT_DIAMETER_M
    gedi_max_shift_m: float | None = None  # default: one footprint radius (Pauls et al. 2024)
    gedi_shift_steps: int = 2       # shift lattice: radius/steps apart, within the max shift
    gedi_min_coverage: float = 0.5  # share of a footprint that must lie on valid chip pixels
    gedi_huber_delta: float = 1.0   # metres
    min_target_coverage: float = 0.5  # share of a coarse target cell covered by valid pixels
    # The bins' linear normalisation is blind to the logits' overall scale, so nothing in the
    # height losses stops activations from growing; through the unnormalised DPT stack they then
    # explode under Adam (1e8 within 100 steps at lr 1e-3) and the relus die. A small penalty on
    # (logit / prior scale)² pins them to the head prior's scale.
    logit_reg: float = 0.01

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------ dense


def label_mask(target: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Pixels that carry a label: finite target and (if given) ``valid``."""
    ok = torch.isfinite(target)
    return ok & valid.bool() if valid is not None else ok


def silog_terms(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                eps: float = 1e-3) -> torch.Tensor:
    """g = log(pred + ε) − log(target + ε) over the labelled pixels (1-D)."""
    p = pred[mask].float()
    t = target[mask].float().clamp_min(0.0)  # lidar CHMs hold small negatives near the ground
    return torch.log(p + eps) - torch.log(t + eps)


def silog_from_terms(g: torch.Tensor, lam: float = SILOG_LAMBDA) -> torch.Tensor:
    """sqrt(mean(g²) − λ·mean(g)²); 0 (still attached to the graph) when ``g`` is empty."""
    if g.numel() == 0:
        return g.sum() * 0.0
    d = (g * g).mean() - lam * g.mean() ** 2
    # d ≥ 0 for λ ≤ 1 but rounding can dip below; the clamp also keeps sqrt's gradient finite
    return torch.sqrt(d.clamp_min(1e-12))


def silog_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
               lam: float = SILOG_LAMBDA, eps: float = 1e-3) -> torch.Tensor:
    """Scale-invariant log loss over all labelled pixels of the batch (the DINOv2 depth head's)."""
    mask = label_mask(target) if mask is None else mask & torch.isfinite(target)
    return silog_from_terms(silog_terms(pred, target, mask, eps), lam)


def l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean |pred − target| over labelled pixels (metres)."""
    mask = label_mask(target) if mask is None else mask & torch.isfinite(target)
    if not bool(mask.any()):
        return pred.sum() * 0.0
    return (pred[mask].float() - target[mask].float().clamp_min(0.0)).abs().mean()


def pool_to_target(pred: torch.Tensor, valid: torch.Tensor, target_hw: tuple[int, int],
                   min_coverage: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Average a [H,W] prediction onto a coarser [h,w] target grid covering the same footprint.

    Only valid prediction pixels are averaged; a coarse cell counts when valid pixels cover at
    least ``min_coverage`` of it. Returns (pooled [h,w], cell_ok [h,w] bool). With equal shapes
    the inputs come back unchanged.
    """
    h, w = target_hw
    if tuple(pred.shape[-2:]) == (h, w):
        return pred, valid.bool()
    if h > pred.shape[-2] or w > pred.shape[-1]:
        raise ValueError(f"target {h}×{w} is finer than the prediction {tuple(pred.shape[-2:])}; "
                         "average the target down instead (never upsample a target)")
    v = valid.float()
    # adaptive average pooling = area interpolation; exact block means when the ratio is whole
    num = F.adaptive_avg_pool2d((pred.float() * v)[None, None], (h, w))[0, 0]
    cover = F.adaptive_avg_pool2d(v[None, None], (h, w))[0, 0]
    pooled = num / cover.clamp_min(1e-6)
    return pooled, cover >= min_coverage - 1e-6


def downsample_target(target: torch.Tensor, out_hw: tuple[int, int],
                      min_coverage: float = 0.5) -> torch.Tensor:
    """Average a finer target (NaN = no label) onto a coarser grid; NaN where too little is labelled."""
    if tuple(target.shape[-2:]) == tuple(out_hw):
        return target
    ok = torch.isfinite(target).float()[None, None]
    vals = torch.nan_to_num(target.float(), nan=0.0)[None, None]
    num = F.adaptive_avg_pool2d(vals, out_hw)[0, 0]
    cover = F.adaptive_avg_pool2d(ok, out_hw)[0, 0]
    out = num / cover.clamp_min(1e-6)
    return torch.where(cover >= min_coverage - 1e-6, out, torch.full_like(out, math.nan))


def paired_pixels(pred: torch.Tensor, valid: torch.Tensor, targets: Sequence[torch.Tensor],
                  min_coverage: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(pred, target) 1-D pairs over the batch, each sample compared at its target's resolution.

    ``pred`` [B,H,W], ``valid`` [B,H,W] (image has data), ``targets`` one [h_i,w_i] tensor per
    sample, with h_i ≤ H (a target finer than the model grid is averaged down by the dataset).
    """
    ps, ts = [], []
    for i, target in enumerate(targets):
        pooled, ok = pool_to_target(pred[i], valid[i], tuple(target.shape[-2:]), min_coverage)
        m = ok & torch.isfinite(target)
        ps.append(pooled[m])
        ts.append(target[m].float().clamp_min(0.0))
    if not ps:
        empty = pred.new_zeros(0)
        return empty, empty
    return torch.cat(ps), torch.cat(ts)


def dense_loss(pred: torch.Tensor, valid: torch.Tensor, targets: Sequence[torch.Tensor],
               cfg: LossConfig = LossConfig()) -> dict[str, torch.Tensor]:
    """Weighted SiLog + L1 at each target's resolution. Returns the terms and their ``total``."""
    return loss_from_pairs(*paired_pixels(pred, valid, targets, cfg.min_target_coverage), cfg)


def loss_from_pairs(p: torch.Tensor, t: torch.Tensor, cfg: LossConfig = LossConfig()
                    ) -> dict[str, torch.Tensor]:
    """:func:`dense_loss` of already paired (prediction, target) pixels."""
    everything = torch.ones_like(p, dtype=torch.bool)
    silog = silog_from_terms(silog_terms(p, t, everything, cfg.silog_eps), cfg.silog_lambda)
    l1 = (p - t).abs().mean() if p.numel() else p.sum() * 0.0
    total = cfg.silog_weight * silog + cfg.l1_weight * l1
    return {"silog": silog, "l1": l1, "total": total, "n_pixels": torch.tensor(p.numel())}


# ------------------------------------------------------------------------------------- GEDI


def shift_offsets(max_shift_px: float, steps: int) -> torch.Tensor:
    """Candidate footprint shifts (drow, dcol) in pixels: a lattice ``max/steps`` apart inside a
    disc of radius ``max_shift_px``; (0, 0) first. ``steps = 0`` or ``max = 0`` gives no shift."""
    if steps <= 0 or max_shift_px <= 0:
        return torch.zeros(1, 2)
    step = max_shift_px / steps
    k = torch.arange(-steps, steps + 1, dtype=torch.float64)
    dr, dc = torch.meshgrid(k * step, k * step, indexing="ij")
    offs = torch.stack([dr.ravel(), dc.ravel()], dim=1)
    offs = offs[(offs ** 2).sum(1) <= max_shift_px ** 2 + 1e-9]
    order = torch.argsort((offs ** 2).sum(1), stable=True)  # (0, 0) first: ties keep the true spot
    return offs[order].float()


def huber(x: torch.Tensor, delta: float) -> torch.Tensor:
    return F.huber_loss(x, torch.zeros_like(x), reduction="none", delta=delta)


def gedi_shot_losses(pred: torch.Tensor, valid: torch.Tensor, shots: torch.Tensor, gsd: float,
                     cfg: LossConfig = LossConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-shot loss for one chip: the best (lowest) over the footprint and its shifts.

    ``pred``/``valid`` [H,W]; ``shots`` [n,3] = (px_row, px_col, rh) at the reported position,
    pixel (r, c) covering [c, c+1) × [r, r+1) as in the chip sampler. For each candidate centre
    the ``gedi_percentile`` of the predicted heights in the footprint is compared with RH (Huber).
    Which pixels form the footprint and which partial footprints count is the rule of
    :func:`data_catalog.gedi.footprint_percentiles` (numpy offsets from
    :func:`data_catalog.gedi.footprint_members`, turned into tensors here so gradients flow):
    pixels off the chip or not ``valid`` are missing, and a candidate counts when its valid pixels
    are at least ``gedi_min_coverage`` of its pixels, so a footprint mostly off the chip is not
    judged on a sliver and the loss measures what ``canopy evaluate`` measures. Returns
    (losses [m], chosen shift index [m]) for the m shots with any usable candidate.
    """
    import numpy as np
    from affine import Affine

    from data_catalog.gedi import footprint_members

    radius_m = cfg.footprint_diameter_m / 2.0
    max_shift = (radius_m if cfg.gedi_max_shift_m is None else cfg.gedi_max_shift_m) / gsd
    offsets = shift_offsets(max_shift, cfg.gedi_shift_steps).double().numpy()
    pixel = Affine(gsd, 0, 0, 0, -gsd, 0)  # chip pixels in metres (the origin does not matter)
    h, w = pred.shape
    usable = valid.bool().cpu().numpy()
    flat = pred.reshape(-1)
    q = cfg.gedi_percentile / 100.0
    losses, chosen = [], []
    for row, col, rh in shots.tolist():
        if not math.isfinite(rh):
            continue
        rr, cc, member = footprint_members(col + offsets[:, 1], row + offsets[:, 0], pixel, radius_m)
        cand, i, j = np.nonzero(member)  # every (candidate, pixel) of the footprints, by candidate
        r, c = rr[cand, i, j], cc[cand, i, j]
        ok = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        ok[ok] = usable[r[ok], c[ok]]
        n_ok = np.bincount(cand[ok], minlength=len(offsets))
        n_all = np.bincount(cand, minlength=len(offsets))
        counts = (n_ok > 0) & (n_ok >= cfg.gedi_min_coverage * n_all - 1e-9)
        if not counts.any():
            continue
        k = np.flatnonzero(counts)
        index = torch.from_numpy(r[ok] * w + c[ok]).to(pred.device)
        parts = torch.split(flat[index].float(), n_ok.tolist())
        # linear interpolation, as numpy.percentile, over each candidate's valid pixels
        pct = torch.stack([torch.quantile(parts[m], q) for m in k])
        values = huber(pct - rh, cfg.gedi_huber_delta)
        best = int(torch.argmin(values.detach()))  # first of equals: (0, 0) when it ties
        losses.append(values[best])
        chosen.append(int(k[best]))
    if not losses:
        return pred.new_zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.stack(losses), torch.tensor(chosen, dtype=torch.long)


def gedi_loss(pred: torch.Tensor, valid: torch.Tensor, shots: Sequence[torch.Tensor], gsd: float,
              cfg: LossConfig = LossConfig()) -> tuple[torch.Tensor, int]:
    """Mean shift-tolerant footprint loss over every usable shot of the batch, and their count."""
    per_shot = [gedi_shot_losses(pred[i], valid[i], s, gsd, cfg)[0]
                for i, s in enumerate(shots) if s is not None and len(s)]
    per_shot = [x for x in per_shot if x.numel()]
    if not per_shot:
        return pred.sum() * 0.0, 0
    allv = torch.cat(per_shot)
    return allv.mean(), int(allv.numel())


# ----------------------------------------------------------------------------------- cosub


def logit_scale_penalty(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """mean((logit / scale)²): keeps the head's logits near the scale of its prior."""
    x = logits.float()
    return (x * x).mean() / (scale * scale)


def bin_distribution_kl(student_probs: torch.Tensor, teacher_probs: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher ‖ student) per pixel over the bin axis (dim 1), averaged over ``mask``.

    The teacher is detached here: each submodel is the other's *soft* teacher (cosub,
    arXiv:2212.04884), so no gradient flows into the teacher's distribution.
    """
    t = teacher_probs.detach().float().clamp_min(1e-8)
    s = student_probs.float().clamp_min(1e-8)
    kl = (t * (t.log() - s.log())).sum(dim=1)  # [B,H,W]
    if mask is not None:
        if not bool(mask.any()):
            return kl.sum() * 0.0
        return kl[mask].mean()
    return kl.mean()


# ------------------------------------------------------------------ heights for training


class _ReluLeakyGrad(torch.autograd.Function):
    """relu forward, leaky backward: a bin whose logit went negative still hears the loss."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, leak: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.leak = leak
        return torch.relu(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        # One-sided: a negative input may be pulled back up (grad < 0: descent raises it) but is
        # never pushed further down, where the true gradient is 0. A two-sided leak let unused
        # bins drift towards −∞ without bound (logits of 1e4–1e5 within a few hundred steps).
        return torch.where(x > 0, grad, ctx.leak * grad.clamp(max=0.0)), None


def relu_leaky_grad(x: torch.Tensor, leak: float) -> torch.Tensor:
    """relu(x) in the forward pass; for x < 0 the backward pass lets through ``leak`` × the part
    of the gradient that would raise x (revives a dead unit, never buries it deeper)."""
    return _ReluLeakyGrad.apply(x, leak) if leak > 0 else torch.relu(x)


class LeakyGradReLU(torch.nn.Module):
    """Drop-in for ``nn.ReLU`` at training time: same outputs, no permanently dead units."""

    def __init__(self, leak: float):
        super().__init__()
        self.leak = leak

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return relu_leaky_grad(x, self.leak)


def train_bin_probabilities(logits: torch.Tensor, leak: float = 0.05, eps: float | None = None
                            ) -> torch.Tensor:
    """The bin distribution ((relu(l) + ε)/Σ, float32; ε the model's, HRCH's 0.1 by default) with
    a leaky surrogate gradient.

    Forward values equal :func:`canopy.model.bins.bin_probabilities` exactly, so every loss sees
    the heights inference will produce. Only the backward pass differs: with a plain relu, a bin
    whose logit turns negative for every pixel gets no gradient again, and early in training the
    many 0 m ground pixels push the tall bins there; the model then collapses to predicting the
    median (0 m) everywhere. A small leak keeps those bins trainable.
    """
    from canopy.model.bins import BIN_EPS

    eps = BIN_EPS if eps is None else eps
    w = (_ReluLeakyGrad.apply(logits.float(), leak) if leak > 0 else torch.relu(logits.float())) + eps
    return w / w.sum(dim=1, keepdim=True)


def train_heights(logits: torch.Tensor, centres: torch.Tensor, scale: float,
                  leak: float = 0.05, eps: float | None = None) -> torch.Tensor:
    """Expected height [B,H,W] from bin logits, equal to ``HeightModel.heights`` in value.

    Σ_k p_k c_k with p = (relu(l) + 0.1)/Σ(relu(l) + 0.1), computed as
    (relu(l)·c + 0.1·Σc) / (Σ relu(l) + 0.1·K) so that no [B,K,H,W] probability tensor is
    materialised: on a CPU the per-pixel bin arithmetic, not the convolutions, was the slowest
    part of a step (256 bins × every pixel).
    """
    from canopy.model.bins import BIN_EPS

    eps = BIN_EPS if eps is None else eps
    r = relu_leaky_grad(logits.float(), leak).movedim(1, -1)  # [B,H,W,K]
    k = centres.numel()
    num = r @ centres + eps * centres.sum()
    den = r.sum(dim=-1) + eps * k
    return torch.relu(num / den * scale)


def heights_from_probs(probs: torch.Tensor, centres: torch.Tensor, scale: float) -> torch.Tensor:
    """[B,K,H,W] → [B,H,W] metres (as ``canopy.model.bins.expected_height``, clipped at 0)."""
    return torch.relu(torch.einsum("bkhw,k->bhw", probs, centres) * scale)
