"""I-JEPA (Assran et al. 2023, arXiv:2301.08243; spec ../shared/specs/ssl.md §3), written from
the paper and the spec: from one context block, predict the target encoder's representations
of four masked target blocks of the same image. No hand-made augmentation beyond the crop.

Invariant: the context encoder sees only the context tokens (plus the backbone's prefix tokens)
— :meth:`IJEPA.losses` gathers them in ``prepare_tokens(keep=...)`` before any block runs, so
the encoder's cost follows the context size (about a quarter of the grid), which is what makes
I-JEPA cheap; ``tests/ssl_backbone/test_ijepa_msn.py`` checks the sequence length with a hook.
The target encoder changes only by EMA (:meth:`IJEPA.update_teacher`).

Deliberate differences from the official code (each tested or stated in docs/pretraining.md):

* masks: a block may touch the last patch row and column (the official ``randint`` upper bound
  excludes them, ijepa #40/#59); masks of a batch are cut to equal length by keeping a seeded
  random subset of each, not the first indices in raster order (which drops bottom-right
  patches, ijepa #60); a context that keeps too few patches is redrawn up to 40 times, then
  the settings are refused as impossible (the official code drops constraints with a warning);
* the encoder is our backbone: its own positions (learned, or rotary for DINOv3) and its CLS
  token, which attends to the context; the predictor has the fixed 2-D sin-cos positions;
* the crop is followed by one of the 8 dihedral transforms (overhead imagery has no "up").
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ssl_backbone.augment import OVERHEAD_MEAN, OVERHEAD_STD, check_band_stats
from ssl_backbone.config import from_dict as config_from_dict
from ssl_backbone.config import to_dict as config_to_dict
from ssl_backbone.errors import ConfigError

FORMAT_VERSION = 1


@dataclass
class IJEPAConfig:
    """Every setting of an I-JEPA run; defaults are the paper's ViT-H/14 recipe scaled to the
    small backbones (spec §3.3) unless a comment says otherwise."""

    arch: str = "vit_small"
    init: str = ""
    drop_path_rate: float = 0.0
    image_size: int = 224
    crop_scale: tuple[float, float] = (0.3, 1.0)
    targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    min_keep: int = 10
    predictor_dim: int = 384
    predictor_depth: int = 6  # official 12 for ViT-H; 6 for the small backbones here
    predictor_heads: int = 6
    base_lr: float = 7.1e-4  # × sqrt(global batch / 1024): 1e-3 at the official 2,048
    start_lr: float = 2e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 40.0
    epochs: float = 300.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 0.0  # official: none
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0
    freeze_backbone_blocks: int = 0
    mean: tuple[float, ...] = OVERHEAD_MEAN  # per band, 0..1: R,G,B (+ NIR; else their average)
    std: tuple[float, ...] = OVERHEAD_STD
    batch_size: int = 64
    seed: int = 0
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        def bad(f, why):
            raise ConfigError(f"ijepa {f} {why}", field=f)

        for name in ("target_scale", "context_scale", "crop_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                bad(name, f"must be 0 < min ≤ max ≤ 1, got {getattr(self, name)}")
        if not 0 < self.target_aspect[0] <= self.target_aspect[1]:
            bad("target_aspect", f"must be 0 < min ≤ max, got {self.target_aspect}")
        if self.targets < 1:
            bad("targets", "must be ≥ 1")
        if self.targets * self.target_scale[0] >= self.context_scale[1]:
            bad("targets", f"{self.targets} targets of ≥ {self.target_scale[0]:.0%} of the image "
                           "leave no context")
        if self.epochs <= 0:
            bad("epochs", f"must be > 0, got {self.epochs}")
        if self.predictor_dim % self.predictor_heads:
            bad("predictor_heads", f"must divide predictor_dim {self.predictor_dim}")
        check_band_stats(self.mean, self.std, "ijepa")

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "IJEPAConfig":
        return config_from_dict(cls, d, what="ijepa config")


# ---------------------------------------------------------------------------------- masks


def _block_size(n_h: int, n_w: int, u: float, scale, aspect) -> tuple[int, int]:
    s = scale[0] + u * (scale[1] - scale[0])
    a = aspect[0] + u * (aspect[1] - aspect[0])
    h = max(1, round(math.sqrt(n_h * n_w * s * a)))
    w = max(1, round(math.sqrt(n_h * n_w * s / a)))
    # strictly smaller than the grid, as the official collator (a full-grid context block
    # would leave the context 10 % larger than the paper's measured sizes)
    return max(1, min(h, n_h - 1)), max(1, min(w, n_w - 1))


def _place(n_h, n_w, h, w, gen) -> torch.Tensor:
    top = int(torch.randint(0, n_h - h + 1, (), generator=gen))  # the last row is reachable
    left = int(torch.randint(0, n_w - w + 1, (), generator=gen))
    m = torch.zeros(n_h, n_w, dtype=torch.bool)
    m[top:top + h, left:left + w] = True
    return m


def multiblock_masks(batch: int, n_h: int, n_w: int, cfg: IJEPAConfig, gen: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [B, Kc], targets [B, M, Kt]) patch indices (row-major, sorted) of one batch.

    Target and context sizes are drawn once per batch (one uniform draw sets scale and aspect
    together, as the official collator), positions per image; the context is its block minus
    every target block; all masks of a batch are cut to the batch's shortest by a seeded random
    subset. Context and targets never share a patch.
    """
    u_t = float(torch.rand((), generator=gen))
    u_c = float(torch.rand((), generator=gen))
    th, tw = _block_size(n_h, n_w, u_t, cfg.target_scale, cfg.target_aspect)
    ch, cw = _block_size(n_h, n_w, u_c, cfg.context_scale, (1.0, 1.0))
    contexts, targets = [], []
    for _ in range(batch):
        for attempt in range(40):
            t_masks = [_place(n_h, n_w, th, tw, gen) for _ in range(cfg.targets)]
            ctx = _place(n_h, n_w, ch, cw, gen)
            for t in t_masks:
                ctx &= ~t
            if int(ctx.sum()) >= cfg.min_keep:
                break
        else:
            raise ConfigError(f"no context of ≥ {cfg.min_keep} patches is left beside "
                              f"{cfg.targets} targets of {th}×{tw} on a {n_h}×{n_w} grid; "
                              "lower targets or target_scale", field="target_scale")
        contexts.append(ctx.flatten().nonzero().squeeze(1))
        targets.append([t.flatten().nonzero().squeeze(1) for t in t_masks])
    k_ctx = min(len(c) for c in contexts)
    k_tgt = min(len(t) for ts in targets for t in ts)

    def cut(idx: torch.Tensor, k: int) -> torch.Tensor:
        if len(idx) == k:
            return idx
        pick = torch.randperm(len(idx), generator=gen)[:k]
        return idx[pick].sort().values

    ctx = torch.stack([cut(c, k_ctx) for c in contexts])
    tgt = torch.stack([torch.stack([cut(t, k_tgt) for t in ts]) for ts in targets])
    return ctx, tgt


# ---------------------------------------------------------------------------------- predictor


def sincos_2d(dim: int, n_h: int, n_w: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions [n_h·n_w, dim] (row-major): half the channels encode the
    row, half the column, each as sin/cos at frequencies 1/10000^(2i/(dim/2)) (MAE/I-JEPA)."""
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    rows, cols = torch.meshgrid(torch.arange(n_h, dtype=torch.float64),
                                torch.arange(n_w, dtype=torch.float64), indexing="ij")

    def enc(pos):
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([enc(rows), enc(cols)], dim=1).float()


class Predictor(nn.Module):
    """A narrow ViT: context tokens (projected to ``dim``, with sin-cos positions) and one mask
    token per target patch (at the target's position) → predictions of the target encoder's
    features at the target patches."""

    def __init__(self, embed_dim: int, dim: int, depth: int, heads: int):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio=4.0, qkv_bias=True,
                                           norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, embed_dim)
        self._pos: dict = {}

    def positions(self, n_h: int, n_w: int, device) -> torch.Tensor:
        key = (n_h, n_w, str(device))
        if key not in self._pos:
            self._pos[key] = sincos_2d(self.embed.out_features, n_h, n_w).to(device)
        return self._pos[key]

    def forward(self, context: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor,
                grid: tuple[int, int]) -> torch.Tensor:
        """``context`` [B, Kc, D] encoder outputs at ``ctx_idx`` [B, Kc]; ``tgt_idx`` [B, M, Kt]
        → predictions [B·M, Kt, D] (target block m of image b at row m·B + b)."""
        b, m, kt = tgt_idx.shape
        pos = self.positions(*grid, context.device)
        x = self.embed(context) + pos[ctx_idx]
        x = x.repeat(m, 1, 1)  # block-major: rows m·B + b
        tgt = tgt_idx.transpose(0, 1).reshape(m * b, kt)
        queries = self.mask_token.to(x.dtype) + pos[tgt]
        x = torch.cat([x, queries], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.proj(self.norm(x[:, -kt:]))


# ---------------------------------------------------------------------------------- model


def smooth_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean smooth-L1 (β = 1) over every element, what the official code optimises."""
    return F.smooth_l1_loss(pred.float(), target.float(), beta=1.0)


class IJEPA(nn.Module):
    """``student``: the context encoder (``backbone``) and the ``predictor``; ``teacher``: the
    EMA target encoder (``backbone``)."""

    def __init__(self, cfg: IJEPAConfig, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg
        d = backbone.cfg.embed_dim
        self.student = nn.ModuleDict({"backbone": backbone, "predictor": Predictor(
            d, cfg.predictor_dim, cfg.predictor_depth, cfg.predictor_heads)})
        self.teacher = nn.ModuleDict({"backbone": copy.deepcopy(backbone)})
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        for i, blk in enumerate(backbone.blocks):
            if i < cfg.freeze_backbone_blocks:
                for p in blk.parameters():
                    p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def losses(self, images: torch.Tensor, ctx_idx: torch.Tensor, tgt_idx: torch.Tensor
               ) -> dict[str, torch.Tensor]:
        b, m, kt = tgt_idx.shape
        enc = self.student["backbone"]
        p = enc.num_prefix_tokens
        with torch.no_grad():
            tokens, grid = self.teacher["backbone"].prepare_tokens(images)
            out, _ = self.teacher["backbone"].run_blocks(tokens, grid=grid)
            h = self.teacher["backbone"].norm(out)
            target_all = F.layer_norm(h[:, p:].float(), (h.shape[-1],))  # no affine (spec §3.3)
            tgt = tgt_idx.transpose(0, 1).reshape(m * b, kt)
            y = torch.gather(target_all.repeat(m, 1, 1), 1,
                             tgt[..., None].expand(-1, -1, target_all.shape[-1]))
        tokens, grid = enc.prepare_tokens(images, keep=ctx_idx)
        out, _ = enc.run_blocks(tokens, grid=grid, keep=ctx_idx)
        ctx = enc.norm(out)[:, p:]
        pred = self.student["predictor"](ctx, ctx_idx, tgt_idx, grid)
        loss = smooth_l1(pred, y)
        return {"jepa": loss, "total": loss,
                "teacher_embeddings": h[:, p:].mean(dim=1).detach(), "teacher_probs": None,
                "context_tokens": torch.tensor(float(ctx_idx.shape[1]))}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        t = list(self.teacher["backbone"].parameters())
        s = [p.detach() for p in self.student["backbone"].parameters()]
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1 - momentum)

    def clip_gradients(self, max_norm: float) -> dict[str, float]:
        norms = {}
        for name, module in self.student.items():
            params = [p for p in module.parameters() if p.grad is not None]
            if params:
                norms[name] = float(torch.nn.utils.clip_grad_norm_(
                    params, max_norm if max_norm > 0 else float("inf")))
        return norms
