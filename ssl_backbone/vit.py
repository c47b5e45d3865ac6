"""DINOv2-style Vision Transformer built on timm's ``VisionTransformer``.

The HighResCanopyHeight (HRCH) backbone is a DINOv2 ViT with LayerScale, one CLS token, no
register tokens, a ``mask_token`` kept for iBOT masking, and a learned absolute position
embedding that is resized to the token grid on every call. timm gives us the blocks; this
subclass adds the two things timm does differently from DINOv2:

* ``mask_token`` (timm has none; the SSL methods in this package and the HRCH state dict need it);
* DINOv2's position-embedding resize: bicubic with ``align_corners=True`` on the patch grid
  (HRCH calls ``interpolate(scale_factor=(h+0.1)/n, recompute_scale_factor=True,
  align_corners=True)``, which is exactly a resize to ``(h, w)``). timm's own resampler uses
  ``align_corners=False`` and antialiasing, which would move released-checkpoint outputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn


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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out_indices"] = list(self.out_indices)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown backbone config keys: {sorted(unknown)}")
        d = dict(d)
        if "out_indices" in d:
            d["out_indices"] = tuple(d["out_indices"])
        return cls(**d)


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


class DinoViT(VisionTransformer):
    """timm ViT with DINOv2 conventions; ``forward_taps`` feeds dense decoders."""

    def __init__(self, cfg: ViTConfig):
        super().__init__(
            img_size=cfg.pos_grid * cfg.patch_size,
            patch_size=cfg.patch_size,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            qkv_bias=cfg.qkv_bias,
            init_values=cfg.layerscale_init,
            class_token=True,
            reg_tokens=0,
            num_classes=0,
            global_pool="token",
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            dynamic_img_size=True,
            drop_path_rate=cfg.drop_path_rate,
        )
        self.cfg = cfg
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.embed_dim))

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, H, W, C] patch tokens (dynamic_img_size). DINOv2 order: concat CLS, then add.
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + resize_pos_embed_dinov2(self.pos_embed, (h, w))
        return self.pos_drop(x)

    def pad_to_patch_multiple(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad right/bottom to a multiple of the patch size (as HRCH does)."""
        p = self.cfg.patch_size
        ph, pw = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        return F.pad(x, (0, pw, 0, ph)) if (ph or pw) else x

    def forward_taps(self, x: torch.Tensor, indices=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Tapped block outputs, not final-normed: ``[(patch_map [B,D,h,w], cls [B,D]), ...]``."""
        indices = list(indices if indices is not None else self.cfg.out_indices)
        x = self.pad_to_patch_multiple(x)
        feats = self.forward_intermediates(
            x, indices=indices, return_prefix_tokens=True, norm=False,
            output_fmt="NCHW", intermediates_only=True,
        )
        return [(spatial, prefix[:, 0]) for spatial, prefix in feats]


def build_vit(cfg_or_name: ViTConfig | str) -> DinoViT:
    cfg = VARIANTS[cfg_or_name] if isinstance(cfg_or_name, str) else cfg_or_name
    return DinoViT(cfg)
