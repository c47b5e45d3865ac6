"""Overlapping model tiles and tapered blending weights: seam-free by construction.

Tiles of ``T`` pixels start every ``S`` pixels on a lattice (``origin + k·S``). Each tile's
prediction is weighted by a raised-cosine taper that rises over the overlap ``R = T − S`` and is
flat in the middle; with a regular lattice the tapers of neighbours sum to one (cos² + sin²), so
the blend is a partition of unity and no pixel is dominated by a tile edge, where a ViT's border
artefacts live. A flat average of overlaps makes seams worse (docs/geo_conventions.md).

A pixel covered by one tile only (a raster edge) gets exactly that tile's value, because the
weighted sum is divided by the summed weights: a 256×256 input is one unmodified tile.
"""

from __future__ import annotations

import contextlib
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
import torch

from canopy.errors import ModelOutputError
from canopy.model.height_model import PER_TILE_PRECISIONS, fill_colour
# the edge rule lives with the imagery readers, so the model's OOD tiles (canopy.model.ood) share it
from data_catalog.raster import mirror_fill

DEFAULT_OVERLAP_FRACTION = 0.25  # 64 px of a 256 px tile, as the HRCH notebook


def default_stride(tile_size: int) -> int:
    return tile_size - int(round(tile_size * DEFAULT_OVERLAP_FRACTION))


def taper_1d(tile_size: int, stride: int) -> np.ndarray:
    """Raised-cosine ramps over the overlap at both ends, 1 in the middle; never exactly 0."""
    ramp = tile_size - stride
    w = np.ones(tile_size, dtype=np.float64)
    if ramp > 0:
        i = np.arange(ramp, dtype=np.float64)
        rise = np.sin(0.5 * math.pi * (i + 0.5) / ramp) ** 2
        w[:ramp] = rise
        w[-ramp:] = rise[::-1]
    return w


def blend_weights(tile_size: int, stride: int) -> np.ndarray:
    w = taper_1d(tile_size, stride)
    return np.outer(w, w).astype(np.float32)


def tile_starts(length: int, tile_size: int, stride: int, origin: int = 0) -> list[int]:
    """Starts ``origin + k·stride`` of every tile that touches ``[0, length)``.

    The first start is the lattice point at or before 0, so tiles may hang over either end;
    the caller pads. With ``origin=0`` and ``length <= tile_size`` this is one tile at 0.
    """
    first = origin + math.floor((0 - origin) / stride) * stride
    starts = []
    s = first
    while s < length:
        if s + tile_size > 0:
            starts.append(s)
        if s + tile_size >= length:
            break
        s += stride
    return starts


def edge_reach(tile_size: int) -> int:
    """How far (px) from the imagery a pixel without imagery still gets mirrored content: one
    tile, so a tile that holds any imagery is filled everywhere but in its far corners."""
    return tile_size


def iter_batches(items: list, batch_size: int) -> Iterator[list]:
    for i in range(0, len(items), batch_size):
        yield items[i:i + batch_size]


MAX_AUTO_LANES = 4  # each lane holds one batch's activations (~1 GB for ViT-L at batch 8)


def lane_plan(lanes: int | None, device: torch.device) -> tuple[int, int]:
    """(lanes, torch threads per lane) for this thread's torch thread budget.

    A lane is a thread that runs whole batches on its own share of the cores. On a CPU, one
    batch split over all cores (torch's intra-op threads) scales badly for ViT tiles: a tile's
    matrices are small (257 tokens), and every op ends at a barrier where all threads wait for
    the slowest. Two lanes of one thread each ran ViT-L 1.20× faster than one batch on two
    threads in int8 and 1.06× in bf16 here, with bit-identical heights (docs/performance.md).
    ``None`` picks at most ``MAX_AUTO_LANES`` lanes, all with the same number of threads (so
    every batch runs with the same kernels); a GPU always has one lane.
    """
    if lanes is not None and lanes < 1:
        raise ValueError(f"lanes must be at least 1, got {lanes}")
    total = torch.get_num_threads()
    if device.type != "cpu" or total < 2:
        return 1, total
    if lanes is None:
        per = -(-total // MAX_AUTO_LANES)
        return total // per, per
    n = min(lanes, total)
    return n, total // n


def predict_array(
    model,
    image: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    precision: str = "fp32",
    batch_size: int = 8,
    with_std: bool = False,
    stride: int | None = None,
    origin: tuple[int, int] = (0, 0),
    margin: int = 0,
    fixed_batch: bool = False,
    progress: Callable[[int], None] | None = None,
    lanes: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Blend overlapping model tiles over a ``C×H×W`` uint8 image (C: the model's bands, 3 or 4).

    Returns ``(height, spread)`` float32 arrays in metres over the image without its ``margin``
    (``H − 2·margin`` × ``W − 2·margin``), NaN where ``valid`` is False (``spread`` is None
    unless ``with_std``). Tiles with no valid pixel are skipped. Pixels without imagery — masked
    ones and those of tiles hanging over the image's edge — reach the model as
    :func:`mirror_fill` makes them; ``margin`` px of context around the predicted area let that
    fill see imagery beyond it (a state run's cell passes ``2·edge_reach`` so every window gives
    a pixel the same input). ``origin`` (row, col, relative to the predicted area) anchors the
    tile lattice, so a caller cutting a big raster into cells can keep one lattice for all of
    them. ``fixed_batch`` pads the last batch to ``batch_size`` so results do
    not depend on batch composition (int8 runs tiles one at a time: its batches are single tiles,
    never padded). ``progress`` is called with the number of tiles done per batch.
    ``lanes`` runs that many batches at once, each on its share of this thread's torch threads
    (:func:`lane_plan`; ``None`` chooses); the result does not depend on it.
    """
    n_in = model.cfg.backbone.in_chans
    if image.ndim != 3 or image.shape[0] != n_in:
        raise ValueError(f"expected a {n_in}×H×W image (the model's bands), got {image.shape}")
    tile = model.cfg.tile_size
    stride = stride or default_stride(tile)
    if not 0 < stride <= tile:
        raise ValueError(f"stride must be in (0, {tile}], got {stride}")
    _, full_h, full_w = image.shape
    valid = np.ones((full_h, full_w), bool) if valid is None else valid.astype(bool)
    m = margin
    h, w = full_h - 2 * m, full_w - 2 * m
    if h < 1 or w < 1:
        raise ValueError(f"margin {m} leaves nothing of a {full_h}×{full_w} image to predict")
    fill = fill_colour(model)

    rows = tile_starts(h, tile, stride, origin[0])
    cols = tile_starts(w, tile, stride, origin[1])
    # the canvas holds every tile and the margin; predicted-area pixel (r, c) is (r + top, c + left)
    top, left = max(m, -rows[0]), max(m, -cols[0])
    ph = top + max(h + m, rows[-1] + tile)
    pw = left + max(w + m, cols[-1] + tile)
    r0, c0 = top - m, left - m  # where the given image starts on the canvas
    if (r0, c0, ph, pw) == (0, 0, full_h, full_w):
        img_p, valid_p = image, valid
    else:
        img_p = np.zeros((image.shape[0], ph, pw), np.uint8)
        valid_p = np.zeros((ph, pw), bool)
        img_p[:, r0:r0 + full_h, c0:c0 + full_w] = image
        valid_p[r0:r0 + full_h, c0:c0 + full_w] = valid
    img_p = mirror_fill(img_p, valid_p, edge_reach(tile), fill)
    valid = valid[m:m + h, m:m + w]
    all_valid = bool(valid.all())

    device = model.device
    # Accumulate on the model's device (a GPU keeps up with ~10³ tiles/s; numpy on the host
    # would not), in float64: a pixel seen by one tile only comes back bit-identical after /w.
    acc = torch.float64 if device.type != "mps" else torch.float32
    # accumulators cover the tiles only (the canvas's margin is context for the fill)
    ar, ac = rows[0] + top, cols[0] + left
    ah, aw = rows[-1] + tile - rows[0], cols[-1] + tile - cols[0]
    num = torch.zeros((ah, aw), dtype=acc, device=device)
    num_std = torch.zeros((ah, aw), dtype=acc, device=device) if with_std else None
    den = torch.zeros((ah, aw), dtype=acc, device=device)
    weight = torch.from_numpy(blend_weights(tile, stride).astype(np.float64)).to(device, acc)

    tiles = [(r + top, c + left) for r in rows for c in cols
             if valid_p[r + top:r + top + tile, c + left:c + left + tile].any()]
    # the (uint8, small) image goes to the device once; tiles are cut there
    img_t = torch.from_numpy(np.ascontiguousarray(img_p)).to(device)

    if precision in PER_TILE_PRECISIONS:
        # the model runs one tile per call anyway (HeightModel.predict_tensor), so no batch
        # shape reaches a kernel: batches of one tile need no padding, and no lane sits idle
        # while another finishes the last large batch.
        batch_size, fixed_batch = 1, False

    def run(batch):
        xt = torch.stack([img_t[:, r:r + tile, c:c + tile] for r, c in batch])
        if fixed_batch and len(batch) < batch_size:
            # Every forward pass sees exactly batch_size tiles: BLAS kernels are chosen by shape,
            # and a different shape can change a tile's result in the last bits. Padding keeps a
            # tile's value independent of which other tiles share its batch (seam-free cells).
            xt = torch.cat([xt, xt[:1].expand(batch_size - len(batch), -1, -1, -1)])
        out = model.predict_tensor(xt, precision=precision, with_std=with_std)
        return out if with_std else (out, None)

    n_lanes, lane_threads = lane_plan(lanes, device)
    batches = list(iter_batches(tiles, batch_size))
    with _lanes(n_lanes, lane_threads) as pool:
        if pool is not None:
            model.weights_for(precision)  # once, before threads share the model
        # Results are blended in tile order whatever lane computed them: float sums in another
        # order could differ in the last bit, and the map must not depend on the lanes.
        results = map(run, batches) if pool is None else pool.map(run, batches)
        for batch, (hgt, sd) in zip(batches, results):
            for i, (r, c) in enumerate(batch):
                r, c = r - ar, c - ac
                num[r:r + tile, c:c + tile] += weight * hgt[i]
                den[r:r + tile, c:c + tile] += weight
                if with_std:
                    num_std[r:r + tile, c:c + tile] += weight * sd[i]
            if progress is not None:
                progress(len(batch))

    crop = (slice(top - ar, top - ar + h), slice(left - ac, left - ac + w))
    height = (num[crop] / den[crop]).float().cpu().numpy()
    bad = int((~np.isfinite(height[valid])).sum())
    if bad:
        # a model with broken weights gives NaN everywhere: refuse rather than write a map of
        # nodata that looks finished
        raise ModelOutputError(f"the model gave non-finite heights for {bad:,} of "
                               f"{int(valid.sum()):,} valid pixels ({model.cfg.name}: broken "
                               "weights or input)")
    spread = (num_std[crop] / den[crop]).float().cpu().numpy() if with_std else None
    if not all_valid:
        height[~valid] = np.nan
        if spread is not None:
            spread[~valid] = np.nan
    return height, spread


def predict_image(model, rgb: np.ndarray, *, precision: str = "auto", batch_size: int | None = None,
                  with_std: bool = False, stride: int | None = None, lanes: int | None = None,
                  progress: Callable[[int], None] | None = None):
    """Canopy height (metres, float32 ``H×W``) of an ``H×W×3`` uint8 RGB array at the model's GSD
    (``H×W×4``, RGB + near-infrared, for a 4-band model).

    Images of any size are cut into overlapping model tiles and blended (no seams), exactly as
    ``canopy predict`` does; an image of one tile is that tile's output. ``precision`` ``auto``
    is the fastest accurate one for this model on this machine (:mod:`canopy.model.auto`). With ``with_std`` a
    ``(height, spread)`` pair is returned; spread is the standard deviation of the head's
    distribution over height bins, in metres.
    """
    if getattr(rgb, "dtype", None) != np.uint8:
        # a float image in [0, 1] would silently give ~50 m everywhere
        raise TypeError(f"rgb must be a uint8 array (0..255), got {getattr(rgb, 'dtype', type(rgb))}")
    n_in = model.cfg.backbone.in_chans
    if rgb.ndim != 3 or rgb.shape[2] != n_in:
        raise ValueError(f"expected an H×W×{n_in} {'RGB' if n_in == 3 else 'RGB+NIR'} array, "
                         f"got shape {rgb.shape}")
    from canopy.model.auto import batch_size_for, choose_precision, own_model

    batch_size = batch_size_for(model.device, batch_size)
    if precision == "auto":
        precision = choose_precision(model, precision, batch_size=batch_size).precision
        model = own_model(model, precision)
    height, spread = predict_array(model, np.moveaxis(rgb, 2, 0), precision=precision,
                                   batch_size=batch_size, with_std=with_std, stride=stride,
                                   lanes=lanes, progress=progress)
    return (height, spread) if with_std else height


@contextlib.contextmanager
def _lanes(n: int, threads: int):
    """A pool of ``n`` lane threads with ``threads`` torch threads each (None for one lane).

    ``torch.set_num_threads`` sets the OpenMP team of the calling thread (and torch's default
    for threads that start later), so each lane sets its own, and the caller's is put back."""
    if n < 2:
        yield None
        return
    caller = torch.get_num_threads()
    pool = ThreadPoolExecutor(n, thread_name_prefix="canopy-lane",
                              initializer=torch.set_num_threads, initargs=(threads,))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(caller)


def count_tiles(valid: np.ndarray, tile_size: int, stride: int, origin=(0, 0)) -> int:
    h, w = valid.shape
    rows = tile_starts(h, tile_size, stride, origin[0])
    cols = tile_starts(w, tile_size, stride, origin[1])
    n = 0
    for r in rows:
        for c in cols:
            if valid[max(r, 0):max(r + tile_size, 0), max(c, 0):max(c + tile_size, 0)].any():
                n += 1
    return n
