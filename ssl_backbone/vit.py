"""DINOv2-style Vision Transformer built on timm's ``VisionTransformer``, and its token API.

The HighResCanopyHeight (HRCH) backbone is a DINOv2 ViT with LayerScale, one CLS token, no
register tokens, a ``mask_token`` kept for iBOT masking, and a learned absolute position
embedding that is resized to the token grid on every call. timm gives us the blocks; this
subclass adds the two things timm does differently from DINOv2:

* ``mask_token`` (timm has none; the SSL methods in this package and the HRCH state dict need it);
* DINOv2's position-embedding resize: bicubic with ``align_corners=True`` on the patch grid
  (HRCH calls ``interpolate(scale_factor=(h+0.1)/n, recompute_scale_factor=True,
  align_corners=True)``, which is exactly a resize to ``(h, w)``). timm's own resampler uses
  ``align_corners=False`` and antialiasing, which would move released-checkpoint outputs.

Invariant: whoever runs the backbone (dense prediction through :meth:`DinoViT.forward_taps`,
decoder training, pretraining methods built on this package, timm's own ``forward_features``)
gets its tokens from the same preparation, so a block sees the same tokens for the same image
in every caller.
Why it holds: :meth:`DinoViT.prepare_tokens` and timm's ``_pos_embed`` hook both add the CLS
token and positions through one method (``_add_cls_and_positions``), and
:meth:`DinoViT.forward_taps` is :meth:`~DinoViT.prepare_tokens` + :meth:`~DinoViT.run_blocks`
+ :meth:`~DinoViT.tokens_to_maps`, the three public pieces other code composes. Code outside
this package therefore never needs timm's private members, whose names and order change
between timm releases.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ssl_backbone.config import from_dict as config_from_dict
from ssl_backbone.config import to_dict as config_to_dict


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
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ViTConfig":
        return config_from_dict(cls, d, what="backbone config")


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
    """timm ViT with DINOv2 conventions and a public token API.

    ``prepare_tokens`` → ``run_blocks`` → ``tokens_to_maps`` is what ``forward_taps`` does for
    dense decoders; masked-image (iBOT) and masked-context (MSN, I-JEPA) methods pass ``masks``
    or ``keep`` to ``prepare_tokens`` and run the blocks themselves.
    """

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

    def _add_cls_and_positions(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        # DINOv2 order: concatenate CLS first, then add the (resized) table to all tokens at once
        b = patches.shape[0]
        x = torch.cat([self.cls_token.expand(b, -1, -1), patches], dim=1)
        return x + resize_pos_embed_dinov2(self.pos_embed, grid)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # timm's hook, used by its own forward paths; x: [B, H, W, C] (dynamic_img_size)
        b, h, w, c = x.shape
        return self.pos_drop(self._add_cls_and_positions(x.reshape(b, h * w, c), (h, w)))

    def pad_to_patch_multiple(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad right/bottom to a multiple of the patch size (as HRCH does)."""
        p = self.cfg.patch_size
        ph, pw = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        return F.pad(x, (0, pw, 0, ph)) if (ph or pw) else x

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None,
                       keep: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images ``[B, 3, H, W]`` → tokens ``[B, 1 + N, D]`` (CLS first) for the first block,
        and the patch grid ``(h, w)`` (``N = h·w`` unless ``keep`` is given).

        ``masks`` (``[B, N]`` or ``[B, h, w]``, bool, True = masked): those patch embeddings are
        replaced by ``mask_token`` *before* positions are added, so a masked token still says
        where it is (iBOT/DINOv2). ``keep`` (``[B, K]`` int64 indices into the N patch tokens):
        only those patch tokens, in that order, follow CLS, picked after positions are added
        (MSN/I-JEPA encode only the visible patches). Shape errors are the caller's bugs and
        raise ``ValueError``.
        """
        x = self.pad_to_patch_multiple(x)
        patches = self.patch_embed(x)  # [B, h, w, D]
        b, h, w, d = patches.shape
        patches = patches.reshape(b, h * w, d)
        if masks is not None:
            if masks.dtype != torch.bool or masks.shape[0] != b or masks[0].numel() != h * w:
                raise ValueError(f"masks must be bool [B={b}, N={h * w}] (or [B, {h}, {w}]), "
                                 f"got {masks.dtype} {tuple(masks.shape)}")
            masks = masks.reshape(b, h * w, 1)
            patches = torch.where(masks, self.mask_token.to(patches.dtype)[None], patches)
        x = self._add_cls_and_positions(patches, (h, w))
        if keep is not None:
            if keep.ndim != 2 or keep.shape[0] != b or keep.dtype != torch.int64:
                raise ValueError(f"keep must be int64 [B={b}, K], got {keep.dtype} "
                                 f"{tuple(keep.shape)}")
            kept = torch.gather(x[:, 1:], 1, keep[..., None].expand(-1, -1, d))
            x = torch.cat([x[:, :1], kept], dim=1)
        x = self.pos_drop(x)
        x = self.patch_drop(x)
        return self.norm_pre(x), (h, w)

    def run_blocks(self, tokens: torch.Tensor, start: int = 0, end: int | None = None,
                   taps: Sequence[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Blocks ``start … end-1`` on ``tokens``; returns the last output and
        ``{i: output of block i}`` for each ``i`` in ``taps`` that lies in the range (taps
        outside it are skipped, so a caller splitting the depth passes the same taps to every
        part). Outputs are not final-normed."""
        depth = len(self.blocks)
        end = depth if end is None else end
        if not 0 <= start <= end <= depth:
            raise ValueError(f"block range [{start}, {end}) is not within the {depth} blocks")
        wanted = set(taps)
        out: dict[int, torch.Tensor] = {}
        for i in range(start, end):
            blk = self.blocks[i]
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(blk, tokens, use_reentrant=False)
            else:
                tokens = blk(tokens)
            if i in wanted:
                out[i] = tokens
        return tokens, out

    def tokens_to_maps(self, taps: Sequence[torch.Tensor], grid: tuple[int, int]
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Block outputs ``[B, 1 + h·w, D]`` → ``[(patch_map [B, D, h, w], cls [B, D]), ...]``,
        the format dense decoders read (tokens from ``prepare_tokens`` without ``keep``)."""
        h, w = grid
        out = []
        for t in taps:
            b, n, d = t.shape
            if n != 1 + h * w:
                raise ValueError(f"{n} tokens cannot form a {h}×{w} map plus CLS")
            out.append((t[:, 1:].reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous(), t[:, 0]))
        return out

    def forward_taps(self, x: torch.Tensor, indices=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Tapped block outputs, not final-normed: ``[(patch_map [B,D,h,w], cls [B,D]), ...]``
        in block order. ``indices`` default to ``cfg.out_indices``; negative ones count from
        the end. Blocks after the last tap are not run."""
        depth = len(self.blocks)
        raw = list(indices if indices is not None else self.cfg.out_indices)
        wanted = sorted({i + depth if i < 0 else i for i in raw})
        if not wanted or wanted[0] < 0 or wanted[-1] >= depth:
            raise ValueError(f"tap indices {raw} must name blocks of the {depth}")
        tokens, grid = self.prepare_tokens(x)
        _, taps = self.run_blocks(tokens, 0, wanted[-1] + 1, taps=wanted)
        return self.tokens_to_maps([taps[i] for i in wanted], grid)


def build_vit(cfg_or_name: ViTConfig | str) -> DinoViT:
    cfg = VARIANTS[cfg_or_name] if isinstance(cfg_or_name, str) else cfg_or_name
    return DinoViT(cfg)
