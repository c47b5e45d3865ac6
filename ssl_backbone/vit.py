"""Backbone configs and the ``dinov2`` family: DINOv2-style ViTs on timm's ``VisionTransformer``.

:class:`ViTConfig` describes both backbone families (:data:`FAMILIES`); :func:`build_vit` builds
either; both share the token API of :mod:`ssl_backbone.tokens`. The ``dinov3`` family (rotary
positions, registers) is :mod:`ssl_backbone.dinov3`.

The HighResCanopyHeight (HRCH) backbone is a DINOv2 ViT with LayerScale, one CLS token, no
register tokens, a ``mask_token`` kept for iBOT masking, and a learned absolute position
embedding that is resized to the token grid on every call. timm gives us the blocks; this
subclass adds the two things timm does differently from DINOv2:

* ``mask_token`` (timm has none; the SSL methods in this package and the HRCH state dict need it);
* DINOv2's position-embedding resize: bicubic with ``align_corners=True`` on the patch grid
  (HRCH calls ``interpolate(scale_factor=(h+0.1)/n, recompute_scale_factor=True,
  align_corners=True)``, which is exactly a resize to ``(h, w)``). timm's own resampler uses
  ``align_corners=False`` and antialiasing, which would move released-checkpoint outputs.

Invariant: a token of this family gets its position the same way in every caller. Why it
holds: :meth:`DinoViT.prepare_tokens` (the token API's) and timm's ``_pos_embed`` hook both add
the CLS token and positions through one method, :meth:`DinoViT._prefix_and_positions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ssl_backbone.config import added_field
from ssl_backbone.config import from_dict as config_from_dict
from ssl_backbone.config import to_dict as config_to_dict
from ssl_backbone.dinov3 import Dinov3ViT
from ssl_backbone.tokens import TokenAPI, timm_args


#: Backbone families. ``dinov2``: learned absolute positions resized to the token grid, a CLS
#: token only (DINOv2, HRCH v1). ``dinov3``: rotary positions (RoPE) on the patch tokens, CLS
#: plus register tokens (DINOv3, CHMv2), built on timm's ``Eva``
#: (:class:`ssl_backbone.dinov3.Dinov3ViT`).
FAMILIES = ("dinov2", "dinov3")


@dataclass
class ViTConfig:
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    patch_size: int = 16
    pos_grid: int = 14  # learned position grid (img_size 224 / patch 16 in HRCH)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layerscale_init: float | None = 1.0
    drop_path_rate: float = 0.0
    out_indices: tuple[int, ...] = (4, 11, 17, 23)
    family: str = "dinov2"  # one of FAMILIES
    reg_tokens: int = 0  # register tokens after CLS (dinov3 only)
    rope_theta: float = 100.0  # RoPE base period (dinov3 only)
    norm_eps: float = 1e-6  # LayerNorm epsilon (DINOv2 1e-6; DINOv3 1e-5)
    tap_norm: bool = False  # taps pass through the final norm (CHMv2's use_backbone_norm)
    in_chans: int = added_field(3)  # input bands: 3 (RGB) or 4 (RGB + near-infrared)

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        return config_from_dict(cls, d, what="backbone config")


def per_band(values, n: int) -> tuple[float, ...]:
    """RGB normalisation values (mean or std, 0..1) for ``n`` input bands: a band past the
    third (near-infrared) takes the average of the RGB ones, matching how a grown backbone
    starts its kernel (the mean of the RGB kernels,
    :func:`ssl_backbone.checkpoints.grow_input_channels`). Values already given per band are
    kept."""
    values = [float(v) for v in values]
    return tuple((values + [sum(values[:3]) / 3] * max(0, n - len(values)))[:n])


def default_out_indices(depth: int) -> tuple[int, ...]:
    """Four taps spread over the depth, ending at the last block (HRCH's choice for 24/32 blocks)."""
    known = {24: (4, 11, 17, 23), 32: (9, 16, 22, 29)}
    if depth in known:
        return known[depth]
    if depth < 4:
        return tuple(range(depth))
    return tuple(round(depth * f) - 1 for f in (0.25, 0.5, 0.75, 1.0))


# Named variants (timm style: tiny functions with explicit arguments). Head dim is 64 throughout.
VARIANTS: dict[str, ViTConfig] = {
    "vit_tiny": ViTConfig(embed_dim=192, depth=12, num_heads=3, out_indices=(2, 5, 8, 11)),
    "vit_small": ViTConfig(embed_dim=384, depth=12, num_heads=6, out_indices=(2, 5, 8, 11)),
    "vit_base": ViTConfig(embed_dim=768, depth=12, num_heads=12, out_indices=(2, 5, 8, 11)),
    "vit_large": ViTConfig(embed_dim=1024, depth=24, num_heads=16, out_indices=(4, 11, 17, 23)),
    "vit_huge": ViTConfig(embed_dim=1280, depth=32, num_heads=20, out_indices=(9, 16, 22, 29)),
    # for tests and plumbing: a few milliseconds per tile on a CPU
    "vit_micro": ViTConfig(embed_dim=128, depth=4, num_heads=2, out_indices=(0, 1, 2, 3)),
    # DINOv3 ViT-L/16 as pretrained on SAT-493M and tapped by CHMv2 (dinov3 family)
    "dinov3_vit_large": ViTConfig(embed_dim=1024, depth=24, num_heads=16, layerscale_init=1e-5,
                                  out_indices=(5, 11, 17, 23), family="dinov3", reg_tokens=4,
                                  norm_eps=1e-5, tap_norm=True),
    "dinov3_vit_micro": ViTConfig(embed_dim=128, depth=4, num_heads=2, layerscale_init=1e-5,
                                  out_indices=(0, 1, 2, 3), family="dinov3", reg_tokens=4,
                                  norm_eps=1e-5, tap_norm=True),
}


def resize_pos_embed_dinov2(pos_embed: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Resize a ``[1, 1 + n*n, D]`` position table (CLS first) to ``grid_hw`` patches."""
    n = int(round((pos_embed.shape[1] - 1) ** 0.5))
    h, w = grid_hw
    if (h, w) == (n, n):
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    grid = patch_pos.float().reshape(1, n, n, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=True)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


class DinoViT(TokenAPI, VisionTransformer):
    """timm ViT with DINOv2 conventions (the ``dinov2`` family) and the shared token API."""

    def __init__(self, cfg: ViTConfig):
        if cfg.family != "dinov2" or cfg.reg_tokens:
            raise ValueError(f"DinoViT builds the dinov2 family without registers, got "
                             f"family={cfg.family!r}, reg_tokens={cfg.reg_tokens}")
        super().__init__(
            **timm_args(cfg),
            qkv_bias=cfg.qkv_bias,
            reg_tokens=0,
            norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps),
        )
        self.cfg = cfg
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.embed_dim))

    def _prefix_and_positions(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        # DINOv2 order: concatenate CLS first, then add the (resized) table to all tokens at once
        b = patches.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), patches], dim=1)
        return x + resize_pos_embed_dinov2(self.pos_embed, grid)

    def _block_kwargs(self, grid, keep, tokens) -> dict:
        return {}

    def reset_buffers(self, device=None) -> None:
        """Nothing to recompute: every tensor of this family is in its weights files."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # timm's hook, used by its own forward paths; x: [B, H, W, C] (dynamic_img_size)
        b, h, w, c = x.shape
        return self.pos_drop(self._prefix_and_positions(x.reshape(b, h * w, c), (h, w)))


def build_vit(cfg_or_name: ViTConfig | str) -> nn.Module:
    """The backbone of a config (or a :data:`VARIANTS` name), of its family."""
    cfg = VARIANTS[cfg_or_name] if isinstance(cfg_or_name, str) else cfg_or_name
    if cfg.family not in FAMILIES:
        raise ValueError(f"unknown backbone family {cfg.family!r} (one of {', '.join(FAMILIES)})")
    if cfg.family == "dinov3":
        return Dinov3ViT(cfg)
    return DinoViT(cfg)
