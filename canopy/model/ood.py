"""How unlike the training data an image is: a per-tile out-of-distribution score.

A tile's *embedding* is the mean of the backbone's last tapped patch tokens over the tile,
L2-normalised. A model that carries an :class:`OodReference` (``ood.safetensors`` beside its
``model.safetensors``) holds the embeddings of its training tiles; a tile's score is the mean
cosine distance to its ``k`` nearest reference embeddings divided by ``scale``. ``scale`` is the
95th percentile of the same distance for the training tiles themselves, each measured against the
tiles of *other* training images only (a tile is always close to its own image's overlapping
chips), so a score above 1 (``canopy.io.outputs.OOD_UNLIKE``) reads "farther from the training
data than 95 % of the training images are from the rest of it".

Invariant: the score of a tile depends only on the model, its reference and the tile's pixels at
the model's GSD (no batch statistics), so the same image gets the same scores in one-raster and
state runs and at any batch size. Tiles are the non-overlapping ``tile``-px squares of the
output grid from its top-left corner, the last row/column shifted inwards to end at the edge.
A tile's pixels without imagery are filled by the prediction paths' edge rule (mirrored imagery,
:func:`data_catalog.raster.mirror_fill`) from the tile's own pixels, for training images (an
80-px NEON plot under a 96-px tile) and mapped ones alike.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FORMAT_VERSION = 1
FILE_NAME = "ood.safetensors"


@dataclass
class OodReference:
    embeddings: torch.Tensor  # [N, D] float32, L2-normalised
    k: int
    scale: float
    tile: int                 # px at the model's GSD

    def score(self, emb: torch.Tensor) -> torch.Tensor:
        """[B, D] normalised embeddings → [B] scores (module docstring)."""
        ref = self.embeddings.to(emb.device, torch.float32)
        dist = 1.0 - emb.float() @ ref.T
        k = min(self.k, ref.shape[0])
        return dist.topk(k, dim=1, largest=False).values.mean(1) / self.scale

    def save(self, folder: str | os.PathLike) -> Path:
        """``ood.safetensors`` in ``folder``, atomically and readable by the team (the one
        safetensors writer, :func:`ssl_backbone.checkpoints.save_safetensors`)."""
        from ssl_backbone.checkpoints import save_safetensors

        meta = {"k": self.k, "scale": self.scale, "tile": self.tile,
                "format_version": FORMAT_VERSION}
        return save_safetensors({"embeddings": self.embeddings.to(torch.float16)},
                                Path(folder) / FILE_NAME, metadata={"ood": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "OodReference":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("ood", "{}"))
            emb = f.get_tensor("embeddings").float()
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: OOD reference format {meta.get('format_version')!r}, "
                             f"this version reads {FORMAT_VERSION}")
        return cls(emb, int(meta["k"]), float(meta["scale"]), int(meta["tile"]))


@torch.no_grad()
def embed(model, rgb: torch.Tensor) -> torch.Tensor:
    """uint8-valued RGB tiles [B,3,T,T] → [B, D] L2-normalised embeddings, in fp32."""
    x = model.normalize(rgb.to(model.device))
    # a GPU bf16 run keeps bf16 weights (HeightModel.prepare_for_inference): feed what they take
    dtype = next((p.dtype for p in model.backbone.parameters() if p.is_floating_point()),
                 torch.float32)
    patch_map, _ = model.backbone.forward_taps(x.to(dtype))[-1]
    return torch.nn.functional.normalize(patch_map.float().mean((2, 3)), dim=1)


def tile_starts(length: int, tile: int) -> list[int]:
    """Starts of the non-overlapping tiles along one axis (last one shifted to end at the edge)."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, tile))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def _filled(model, rgb: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """One tile's pixels with those without imagery filled by the edge rule (module docstring)."""
    from canopy.model.height_model import fill_colour
    from data_catalog.raster import mirror_fill

    # reach: one tile, as the prediction paths' edge_reach
    return mirror_fill(rgb, valid, rgb.shape[-1], fill_colour(model))


def _pad_to(rgb: np.ndarray, valid: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """An image (any band count) smaller than a tile, grown to one with the added pixels marked
    invalid."""
    h, w = rgb.shape[1:]
    if h >= tile and w >= tile:
        return rgb, valid
    H, W = max(h, tile), max(w, tile)
    out, ok = np.zeros((rgb.shape[0], H, W), rgb.dtype), np.zeros((H, W), bool)
    out[:, :h, :w], ok[:h, :w] = rgb, valid
    return out, ok


def tile_embeddings(model, rgb: np.ndarray, valid: np.ndarray | None = None, tile: int = 96,
                    batch: int = 16) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Embeddings of the tiles of a (3,H,W) uint8 image and their (row, col) starts. Tiles with
    under half their pixels valid are left out. An image smaller than a tile is mirrored up."""
    rgb, valid = _pad_to(rgb, np.ones(rgb.shape[1:], bool) if valid is None else valid, tile)
    h, w = rgb.shape[1:]
    starts = [(r, c) for r in tile_starts(h, tile) for c in tile_starts(w, tile)
              if valid[r:r + tile, c:c + tile].mean() >= 0.5]
    out = []
    for i in range(0, len(starts), batch):
        chunk = np.stack([_filled(model, rgb[:, r:r + tile, c:c + tile],
                                  valid[r:r + tile, c:c + tile]) for r, c in starts[i:i + batch]])
        out.append(embed(model, torch.from_numpy(chunk)))
    d = model.cfg.backbone.embed_dim
    return (torch.cat(out) if out else torch.zeros(0, d)), starts


def score_map(model, rgb: np.ndarray, valid: np.ndarray) -> np.ndarray | None:
    """Per-pixel OOD score (float32, NaN where not ``valid``) of a (3,H,W) image on the model's
    grid, each tile's score over its pixels (where tiles overlap at the edge, the later one
    wins); None when the model carries no reference."""
    ref: OodReference | None = getattr(model, "ood", None)
    if ref is None:
        return None
    h, w = valid.shape
    out = np.full((h, w), np.nan, np.float32)
    emb, starts = tile_embeddings(model, rgb, valid, ref.tile)
    if not starts:
        return out
    scores = ref.score(emb).cpu().numpy()
    for (r, c), s in zip(starts, scores):
        out[r:r + ref.tile, c:c + ref.tile] = s
    out[~valid] = np.nan
    return out


def window_scores(model, read, window: tuple[int, int, int, int], height: int, width: int,
                  batch: int = 16) -> np.ndarray | None:
    """Scores over one output window ``(r0, c0, h, w)`` of a ``height``×``width`` grid, from
    the grid's tiles (module docstring) that overlap it; ``read(r, c, h, w)`` returns the grid's
    ``(rgb, valid)`` there. The same pixel gets the same score whatever the windows (each tile is
    scored from its own pixels only). None when the model carries no reference."""
    ref: OodReference | None = getattr(model, "ood", None)
    if ref is None:
        return None
    r0, c0, h, w = window
    t = ref.tile
    out = np.full((h, w), np.nan, np.float32)
    tiles = window_tiles(window, height, width, t)
    for i in range(0, len(tiles), batch):
        chunk, kept = [], []
        for r, c in tiles[i:i + batch]:
            rgb, valid = read(r, c, t, t)
            if valid.mean() >= 0.5:
                chunk.append(_filled(model, rgb, valid))
                kept.append((r, c))
        if not chunk:
            continue
        scores = ref.score(embed(model, torch.from_numpy(np.stack(chunk)))).cpu().numpy()
        for (r, c), s in zip(kept, scores):
            rs, cs = slice(max(r, r0) - r0, min(r + t, r0 + h) - r0), \
                slice(max(c, c0) - c0, min(c + t, c0 + w) - c0)
            out[rs, cs] = s
    return out


def window_tiles(window: tuple[int, int, int, int], height: int, width: int, tile: int
                 ) -> list[tuple[int, int]]:
    """(row, col) starts of the grid's tiles (module docstring) that overlap ``window``."""
    r0, c0, h, w = window
    return [(r, c) for r in tile_starts(height, tile) if r < r0 + h and r + tile > r0
            for c in tile_starts(width, tile) if c < c0 + w and c + tile > c0]


def build_reference(model, images: list[tuple[np.ndarray, np.ndarray | None, str]], k: int = 5,
                    tile: int = 96) -> OodReference:
    """A reference from training images ``[(rgb (3,H,W) uint8 at the model's GSD, valid, image
    id)]``; ``scale`` from distances to other images' tiles (module docstring)."""
    embs, owner = [], []
    for rgb, valid, name in images:
        e, _ = tile_embeddings(model, rgb, valid, tile)
        embs.append(e)
        owner += [name] * len(e)
    emb = torch.cat(embs)
    owner_arr = np.array(owner)
    dist = (1.0 - emb @ emb.T).numpy()
    same = owner_arr[:, None] == owner_arr[None, :]
    dist[same] = np.inf
    kk = min(k, max(1, int((~same).sum(1).min())))
    nearest = np.sort(dist, axis=1)[:, :kk].mean(1)
    scale = float(np.percentile(nearest[np.isfinite(nearest)], 95))
    return OodReference(emb, k, max(scale, 1e-6), tile)
