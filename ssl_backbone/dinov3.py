"""The ``dinov3`` backbone family: DINOv3 ViTs (rotary positions, register tokens) on timm's ``Eva``.

DINOv3 (and CHMv2, which taps its SAT-493M ViT-L/16) differs from the DINOv2/HRCH ViT in three
ways that change outputs: positions are rotary (RoPE on the patch tokens' queries and keys,
coordinates of patch centres normalised to [-1, 1] per axis, base period ``rope_theta``), four
register tokens follow CLS, and LayerNorms use eps 1e-5. timm's ``Eva`` with
``rope_type='dinov3'`` implements all three (``vit_large_patch16_dinov3``); this subclass adds
the project's token API (:class:`ssl_backbone.tokens.TokenAPI`) and two things its DINOv3 variants
lack:

* one ``qkv`` Linear *with* its bias, as the DINOv3 release stores it (``attn.qkv.bias``).
  timm keeps q/v biases apart and the key bias as a fixed zero buffer; under RoPE a key bias
  does change attention (the rotation makes ``q·R(b)`` vary over keys), so a checkpoint's key
  bias must be loaded, not dropped. One Linear also quantises as a whole (int8 inference).
* ``mask_token`` for masked-image pretraining, shaped ``[1, D]`` as in DinoViT.

Invariant: a token sees the same rotary position whichever caller runs the blocks
(``forward_taps``, decoder training running the depth in two parts, a pretraining method
encoding only kept patches). Why it holds: :meth:`Dinov3ViT._block_kwargs` is the only place
the rotary table is made, from the grid ``prepare_tokens`` returned, gathered by the same
``keep`` indices that picked the tokens, and :meth:`TokenAPI.run_blocks` passes it to every
block it runs.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import LayerNorm
from timm.models.eva import Eva
from torch import nn

from ssl_backbone.tokens import TokenAPI, timm_args


class Dinov3ViT(TokenAPI, Eva):
    """timm ``Eva`` configured as a DINOv3 ViT, with the shared token API."""

    def __init__(self, cfg):  # an ssl_backbone.vit.ViTConfig of the dinov3 family
        if cfg.family != "dinov3":
            raise ValueError(f"Dinov3ViT builds the dinov3 family, got {cfg.family!r}")
        super().__init__(
            **timm_args(cfg),
            qkv_bias=False,  # the bias lives in one qkv Linear, below
            num_reg_tokens=cfg.reg_tokens,
            use_abs_pos_emb=False,
            use_rot_pos_emb=True,
            rope_type="dinov3",
            rope_temperature=cfg.rope_theta,
            rope_rotate_half=True,
            use_fc_norm=False,
            norm_layer=partial(LayerNorm, eps=cfg.norm_eps),
        )
        self.cfg = cfg
        if cfg.qkv_bias:
            for blk in self.blocks:
                old = blk.attn.qkv
                qkv = nn.Linear(old.in_features, old.out_features, bias=True,
                                device=old.weight.device, dtype=old.weight.dtype)
                with torch.no_grad():
                    if old.weight.device.type != "meta":
                        qkv.weight.copy_(old.weight)
                        qkv.bias.zero_()
                blk.attn.qkv = qkv
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.embed_dim))

    def reset_buffers(self, device=None) -> None:
        """Recompute the rotary periods (a non-persistent buffer, not in weights files): a model
        built on the meta device to skip random initialisation gets them here."""
        periods = self.rope.periods
        if periods.is_meta:
            self.rope.register_buffer("periods", torch.empty(periods.shape, dtype=torch.float32,
                                                             device=device or "cpu"),
                                      persistent=False)
        self.rope.reset_parameters()

    def _prefix_and_positions(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b = patches.shape[0]
        prefix = [self.cls_token.expand(b, -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(b, -1, -1))
        return torch.cat([*prefix, patches], dim=1)  # positions are rotary: added in the blocks

    def _block_kwargs(self, grid, keep, tokens) -> dict:
        if grid is None:
            raise ValueError("a RoPE backbone needs the patch grid: pass grid= (from "
                             "prepare_tokens) to run_blocks")
        rope = self.rope.get_embed(shape=tuple(grid))  # [h·w, 2·head_dim]: sin | cos
        if keep is not None:
            rope = rope[keep].unsqueeze(1)  # [B, 1 (heads), K, 2·head_dim]
        n_patches = keep.shape[1] if keep is not None else grid[0] * grid[1]
        if tokens.shape[1] != self.num_prefix_tokens + n_patches:
            raise ValueError(f"{tokens.shape[1]} tokens do not match the grid {tuple(grid)} "
                             f"plus {self.num_prefix_tokens} prefix tokens"
                             + (" (with keep)" if keep is not None else ""))
        return {"rope": rope}
