"""The token API both backbone families share: images → tokens → blocks → maps for decoders.

Invariant: whoever runs a backbone (dense prediction through :meth:`TokenAPI.forward_taps`,
decoder training running the depth in two parts, pretraining methods that mask or drop
patches, timm's own ``forward_features``) gets its tokens from the same preparation, so a block
sees the same tokens for the same image in every caller. Why it holds: ``forward_taps`` is
``prepare_tokens`` + ``run_blocks`` + ``tokens_to_maps``, the three public pieces other code
composes, and each family supplies its positions in exactly one place (``_prefix_and_positions``
for learned tables, ``_block_kwargs`` for rotary ones). Code outside this package therefore
never needs timm's private members, whose names and order change between releases.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class TokenAPI:
    """The token API both backbone families share (mixed into a timm model).

    ``prepare_tokens`` → ``run_blocks`` → ``tokens_to_maps`` is what ``forward_taps`` does for
    dense decoders; masked-image (iBOT) and masked-context (MSN, I-JEPA) methods pass ``masks``
    or ``keep`` to ``prepare_tokens`` and run the blocks themselves, handing ``run_blocks`` the
    grid (and ``keep``) so that rotary positions follow the tokens. Tokens are
    ``[B, P + N, D]``: ``P = num_prefix_tokens`` (CLS first, then any registers), then the
    patches in row-major order.

    A family supplies ``_prefix_and_positions(patches, grid)`` (prefix tokens + absolute
    positions, if any) and ``_block_kwargs(grid, keep, batch)`` (per-call block arguments: the
    rotary table, if any).
    """

    cfg: object  # the family's ssl_backbone.vit.ViTConfig (not imported: vit imports this)

    def pad_to_patch_multiple(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-pad right/bottom to a multiple of the patch size (as HRCH does)."""
        p = self.cfg.patch_size
        ph, pw = (-x.shape[-2]) % p, (-x.shape[-1]) % p
        return F.pad(x, (0, pw, 0, ph)) if (ph or pw) else x

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None,
                       keep: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """Images ``[B, 3, H, W]`` → tokens ``[B, P + N, D]`` for the first block, and the patch
        grid ``(h, w)`` (``N = h·w`` unless ``keep`` is given).

        ``masks`` (``[B, N]`` or ``[B, h, w]``, bool, True = masked): those patch embeddings are
        replaced by ``mask_token`` *before* positions are added, so a masked token still says
        where it is (iBOT/DINOv2). ``keep`` (``[B, K]`` int64 indices into the N patch tokens):
        only those patch tokens, in that order, follow the prefix, picked after positions are
        added (MSN/I-JEPA encode only the visible patches); pass the same ``keep`` to
        :meth:`run_blocks`. Shape errors are the caller's bugs and raise ``ValueError``.
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
        x = self._prefix_and_positions(patches, (h, w))
        if keep is not None:
            _check_keep(keep, b)
            p = self.num_prefix_tokens
            kept = torch.gather(x[:, p:], 1, keep[..., None].expand(-1, -1, d))
            x = torch.cat([x[:, :p], kept], dim=1)
        x = self.pos_drop(x)
        x = self.patch_drop(x) if self.patch_drop is not None else x
        return self.norm_pre(x), (h, w)

    def run_blocks(self, tokens: torch.Tensor, start: int = 0, end: int | None = None,
                   taps: Sequence[int] = (), *, grid: tuple[int, int] | None = None,
                   keep: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Blocks ``start … end-1`` on ``tokens``; returns the last output and
        ``{i: output of block i}`` for each ``i`` in ``taps`` that lies in the range (taps
        outside it are skipped, so a caller splitting the depth passes the same taps to every
        part). Outputs are not final-normed. ``grid`` and ``keep`` are what
        :meth:`prepare_tokens` returned and was given: rotary positions (dinov3) need them;
        learned positions (dinov2) are already in the tokens."""
        depth = len(self.blocks)
        end = depth if end is None else end
        if not 0 <= start <= end <= depth:
            raise ValueError(f"block range [{start}, {end}) is not within the {depth} blocks")
        kwargs = self._block_kwargs(grid, keep, tokens) if end > start else {}
        wanted = set(taps)
        out: dict[int, torch.Tensor] = {}
        for i in range(start, end):
            blk = self.blocks[i]
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(blk, tokens, use_reentrant=False, **kwargs)
            else:
                tokens = blk(tokens, **kwargs)
            if i in wanted:
                out[i] = tokens
        return tokens, out

    def tokens_to_maps(self, taps: Sequence[torch.Tensor], grid: tuple[int, int]
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Block outputs ``[B, P + h·w, D]`` → ``[(patch_map [B, D, h, w], cls [B, D]), ...]``,
        the format dense decoders read (tokens from ``prepare_tokens`` without ``keep``).
        Registers are dropped; with ``cfg.tap_norm`` the final norm is applied first (CLS and
        patches alike, as CHMv2's backbone does)."""
        h, w = grid
        p = self.num_prefix_tokens
        out = []
        for t in taps:
            b, n, d = t.shape
            if n != p + h * w:
                raise ValueError(f"{n} tokens cannot form a {h}×{w} map plus {p} prefix tokens")
            if self.cfg.tap_norm:
                t = self.norm(t)
            out.append((t[:, p:].reshape(b, h, w, d).permute(0, 3, 1, 2).contiguous(), t[:, 0]))
        return out

    def forward_taps(self, x: torch.Tensor, indices=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Tapped block outputs: ``[(patch_map [B,D,h,w], cls [B,D]), ...]`` in block order,
        final-normed only where ``cfg.tap_norm`` says. ``indices`` default to
        ``cfg.out_indices``; negative ones count from the end. Blocks after the last tap are
        not run."""
        depth = len(self.blocks)
        raw = list(indices if indices is not None else self.cfg.out_indices)
        wanted = sorted({i + depth if i < 0 else i for i in raw})
        if not wanted or wanted[0] < 0 or wanted[-1] >= depth:
            raise ValueError(f"tap indices {raw} must name blocks of the {depth}")
        tokens, grid = self.prepare_tokens(x)
        _, taps = self.run_blocks(tokens, 0, wanted[-1] + 1, taps=wanted, grid=grid)
        return self.tokens_to_maps([taps[i] for i in wanted], grid)


def timm_args(cfg) -> dict:
    """The timm constructor arguments both families take from a ViTConfig the same way."""
    return dict(img_size=cfg.pos_grid * cfg.patch_size, patch_size=cfg.patch_size,
                in_chans=cfg.in_chans,
                embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio, init_values=cfg.layerscale_init, class_token=True,
                num_classes=0, global_pool="token", dynamic_img_size=True,
                drop_path_rate=cfg.drop_path_rate)


def _check_keep(keep: torch.Tensor, b: int) -> None:
    if keep.ndim != 2 or keep.shape[0] != b or keep.dtype != torch.int64:
        raise ValueError(f"keep must be int64 [B={b}, K], got {keep.dtype} {tuple(keep.shape)}")
