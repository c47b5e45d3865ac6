"""Apply a GEDI correction model: one factor per block of imagery, interpolated without seams.

The correction model (:mod:`canopy.model.gedi_correction`) looks at a downsampled block of imagery
and returns one multiplicative factor for the decoder's heights in that block. Here those block
factors become a smooth factor field that multiplies the height map.

**Block lattice.** Blocks are squares of ``block_px`` pixels on the *global* pixel lattice of the
output CRS, the convention of ``canopy.predict.grid.Cell.pixel_origin``: global column
``round(x_left / gsd)``, global row ``round(-y_top / gsd)`` (row 0 at northing 0, increasing
southward). Block ``(br, bc)`` holds global rows ``[br·P, (br+1)·P)`` and columns
``[bc·P, (bc+1)·P)``. A block's factor depends only on the imagery inside it and on its index
(for latitude/longitude inputs), never on the window being predicted.

**Factor field.** Log-factors are interpolated between block centres (bilinear or Catmull-Rom
bicubic; separable, on the centre grid). Interpolating logs keeps every factor positive and makes
the field geometric between two blocks. The pieces of the interpolant change at block *centres*,
where it is continuous (bicubic: with its first derivative), so nothing happens at block borders.

**Seam-free tiling.** A pixel's factor depends on the blocks around it, whose imagery reaches
beyond the pixel's window. A caller that cuts a big area into windows (the state-scale engine)
passes, for each window, imagery covering :func:`required_window`; every window then gets exactly
the values a whole-area call would give. A caller with one raster passes that raster's imagery:
blocks hanging over its edge see only the part that exists, as they would in any other split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from affine import Affine

from canopy.errors import InputError
from data_catalog.raster import GSD_TOLERANCE
from canopy.model.gedi_correction import (
    INTERPOLATIONS, GediCorrectionNet, block_centres_lonlat, cut_block, downsample_block,
    load_correction, scalar_features)

__all__ = ["apply_correction", "correct_heights", "factor_field", "load_correction",
           "required_window"]



# ---------------------------------------------------------------------------------------------
# the global pixel lattice


@dataclass(frozen=True)
class PixelWindow:
    """A window in pixels, relative to another window's upper-left pixel (offsets may be < 0)."""

    row_off: int
    col_off: int
    height: int
    width: int

    def transform(self, base: Affine) -> Affine:
        """The window's transform, given the transform of the window it is relative to."""
        return base @ Affine.translation(self.col_off, self.row_off)


def global_origin(transform: Affine, gsd: float) -> tuple[int, int]:
    """(row, col) of the upper-left pixel of a north-up ``gsd`` grid on the CRS's pixel lattice.

    A raster whose corner is off the lattice by a fraction of a pixel is snapped to the nearest
    lattice position: every window of that raster shifts by whole pixels, so they all agree.
    """
    if transform.b != 0 or transform.d != 0 or transform.e >= 0 or transform.a <= 0:
        raise InputError("GEDI correction needs a north-up grid (no rotation, rows going south)")
    if (abs(transform.a - gsd) > GSD_TOLERANCE * gsd
            or abs(-transform.e - gsd) > GSD_TOLERANCE * gsd):
        raise InputError(
            f"the height map has {transform.a:g} m pixels but the GEDI correction model was "
            f"fitted at {gsd:g} m")
    return int(math.floor(-transform.f / gsd + 0.5)), int(math.floor(transform.c / gsd + 0.5))


def pixel_block_coords(start: int, length: int, block_px: int) -> np.ndarray:
    """Position of pixel centres in block-centre units: block ``i``'s centre is at ``i``."""
    return (np.arange(start, start + length, dtype=np.float64) + 0.5) / block_px - 0.5


def block_span(start: int, length: int, block_px: int, interpolation: str) -> tuple[int, int]:
    """First and last block index (inclusive) whose factor pixels ``[start, start+length)`` use."""
    u0 = (start + 0.5) / block_px - 0.5
    u1 = (start + length - 0.5) / block_px - 0.5
    i0, i1 = math.floor(u0), math.floor(u1)
    if interpolation == "bilinear":
        return i0, i1 + 1
    if interpolation == "bicubic":
        return i0 - 1, i1 + 2
    raise InputError(f"interpolation must be one of {INTERPOLATIONS}, got '{interpolation}'")


def required_window(transform: Affine, shape: tuple[int, int], correction: GediCorrectionNet,
                    interpolation: str | None = None) -> PixelWindow:
    """The imagery window (relative to the output window) that holds every block the factors of
    an output window of ``shape`` read: pass imagery over it to :func:`apply_correction`.

    Bilinear needs at most one block of margin around the output, bicubic at most two.
    """
    cfg = correction.cfg
    interp = interpolation or cfg.interpolation
    row0, col0 = global_origin(transform, cfg.gsd)
    br0, br1 = block_span(row0, shape[0], cfg.block_px, interp)
    bc0, bc1 = block_span(col0, shape[1], cfg.block_px, interp)
    p = cfg.block_px
    return PixelWindow(br0 * p - row0, bc0 * p - col0, (br1 - br0 + 1) * p, (bc1 - bc0 + 1) * p)


# ---------------------------------------------------------------------------------------------
# factor-field interpolation (pure numpy)


def interpolation_taps(u: np.ndarray, interpolation: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """For coordinates ``u`` in block-centre units: the first block index each one reads and the
    weights of consecutive blocks from there (2 taps bilinear, 4 Catmull-Rom taps bicubic).

    Weights sum to one; at a block centre (integer ``u``) all weight is on that block.
    """
    base = np.floor(u)
    t = u - base
    base = base.astype(np.int64)
    if interpolation == "bilinear":
        return base, [1.0 - t, t]
    if interpolation == "bicubic":
        t2, t3 = t * t, t * t * t
        return base - 1, [0.5 * (-t3 + 2 * t2 - t), 0.5 * (3 * t3 - 5 * t2 + 2),
                          0.5 * (-3 * t3 + 4 * t2 + t), 0.5 * (t3 - t2)]
    raise InputError(f"interpolation must be one of {INTERPOLATIONS}, got '{interpolation}'")


def interpolate_block_grid(grid: np.ndarray, first_block: tuple[int, int], rows_u: np.ndarray,
                           cols_u: np.ndarray, interpolation: str) -> np.ndarray:
    """Interpolate a grid of per-block values (``grid[i, j]`` = block ``first_block + (i, j)``) at
    the outer product of row and column coordinates (block-centre units). Returns float64.

    Separable, and every output value is summed over its taps in a fixed order with elementwise
    operations, so a pixel's value does not depend on how many other pixels are computed with it.
    """
    grid = np.asarray(grid, dtype=np.float64)
    r_idx, r_w = interpolation_taps(np.asarray(rows_u, np.float64), interpolation)
    c_idx, c_w = interpolation_taps(np.asarray(cols_u, np.float64), interpolation)
    r_idx = r_idx - first_block[0]
    c_idx = c_idx - first_block[1]
    if (r_idx.size and (r_idx.min() < 0 or r_idx.max() + len(r_w) > grid.shape[0])) or (
            c_idx.size and (c_idx.min() < 0 or c_idx.max() + len(c_w) > grid.shape[1])):
        raise ValueError("block grid does not cover the interpolation taps")
    along_rows = r_w[0][:, None] * grid[r_idx]
    for k in range(1, len(r_w)):
        along_rows += r_w[k][:, None] * grid[r_idx + k]
    out = c_w[0][None, :] * along_rows[:, c_idx]
    for k in range(1, len(c_w)):
        out += c_w[k][None, :] * along_rows[:, c_idx + k]
    return out


# ---------------------------------------------------------------------------------------------
# applying a model


def block_log_factors(rgb: np.ndarray, valid: np.ndarray | None, rgb_transform: Affine, crs,
                      correction: GediCorrectionNet, rows: tuple[int, int],
                      cols: tuple[int, int], sun_elevation: float | None = None) -> np.ndarray:
    """Log-factors of blocks ``rows[0]..rows[1]`` × ``cols[0]..cols[1]`` (inclusive) from imagery
    ``rgb`` (3×H×W uint8) on the lattice at ``rgb_transform``. Returns (nr, nc) float64.

    Each block goes through the network alone (batch of one): a block's factor never depends on
    which other blocks are evaluated with it.
    """
    import torch

    cfg = correction.cfg
    origin = global_origin(rgb_transform, cfg.gsd)
    valid = np.ones(rgb.shape[1:], bool) if valid is None else np.asarray(valid, bool)
    br = np.arange(rows[0], rows[1] + 1)
    bc = np.arange(cols[0], cols[1] + 1)
    gr, gc = np.meshgrid(br, bc, indexing="ij")
    if cfg.scalars:
        lon, lat = block_centres_lonlat(gr.ravel(), gc.ravel(), cfg.block_px, cfg.gsd, crs)
        scalars = scalar_features(cfg.scalars, lon, lat, sun_elevation)
    else:
        scalars = np.zeros((gr.size, 0), np.float32)
    out = np.empty(gr.size, np.float64)
    device = next(correction.parameters()).device
    for i, (r, c) in enumerate(zip(gr.ravel(), gc.ravel())):
        block, ok = cut_block(rgb, valid, origin, (int(r), int(c)), cfg.block_px)
        small, small_ok = downsample_block(block, ok, cfg.input_px)
        with torch.no_grad():
            out[i] = float(correction.log_factor(
                torch.from_numpy(small[None]).to(device), torch.from_numpy(small_ok[None]).to(device),
                torch.from_numpy(scalars[i:i + 1]).to(device))[0])
    return out.reshape(gr.shape)


def factor_field(transform: Affine, shape: tuple[int, int], rgb: np.ndarray, crs,
                 correction: GediCorrectionNet, *, valid: np.ndarray | None = None,
                 rgb_transform: Affine | None = None, sun_elevation: float | None = None,
                 interpolation: str | None = None) -> np.ndarray:
    """The multiplicative factor (float64, H×W) for an output window; see :func:`apply_correction`."""
    cfg = correction.cfg
    interp = interpolation or cfg.interpolation
    rgb_transform = transform if rgb_transform is None else rgb_transform
    if rgb.ndim != 3 or rgb.shape[0] != 3:
        raise InputError(f"GEDI correction needs 3×H×W RGB imagery, got shape {rgb.shape}")
    if valid is not None and valid.shape != rgb.shape[1:]:
        raise InputError(f"imagery mask {valid.shape} does not match imagery {rgb.shape[1:]}")
    row0, col0 = global_origin(transform, cfg.gsd)
    global_origin(rgb_transform, cfg.gsd)  # same checks for the imagery grid
    rows = block_span(row0, shape[0], cfg.block_px, interp)
    cols = block_span(col0, shape[1], cfg.block_px, interp)
    grid = block_log_factors(rgb, valid, rgb_transform, crs, correction, rows, cols, sun_elevation)
    log_field = interpolate_block_grid(
        grid, (rows[0], cols[0]), pixel_block_coords(row0, shape[0], cfg.block_px),
        pixel_block_coords(col0, shape[1], cfg.block_px), interp)
    return np.exp(log_field)


def apply_correction(height: np.ndarray, rgb: np.ndarray, transform: Affine, crs,
                     correction: GediCorrectionNet, *, valid: np.ndarray | None = None,
                     rgb_transform: Affine | None = None, sun_elevation: float | None = None,
                     interpolation: str | None = None) -> np.ndarray:
    """Corrected heights: ``height × factor field`` (float32, NaN stays NaN).

    ``height`` (H×W, metres) is on the north-up grid ``transform`` in ``crs``, at the model's GSD.
    ``rgb`` (3×h×w uint8) with ``valid`` (h×w bool, default all) is the imagery on the same pixel
    lattice: by default the same window as ``height``; with ``rgb_transform`` any window, e.g.
    :func:`required_window` for seam-free tiling. ``sun_elevation`` (degrees) is needed only by
    models fitted with the ``sun`` input; ``interpolation`` overrides the model's default.
    """
    height = np.asarray(height)
    if height.ndim != 2:
        raise InputError(f"GEDI correction needs a 2-D height map, got shape {height.shape}")
    if rgb_transform is None and rgb.shape[1:] != height.shape:
        raise InputError(f"imagery {rgb.shape[1:]} and heights {height.shape} differ in size; "
                         "pass rgb_transform for imagery on a larger window")
    field = factor_field(transform, height.shape, rgb, crs, correction, valid=valid,
                         rgb_transform=rgb_transform, sun_elevation=sun_elevation,
                         interpolation=interpolation)
    return (height.astype(np.float64) * field).astype(np.float32)


def correct_heights(correction: GediCorrectionNet, height: np.ndarray, spread: np.ndarray | None,
                    rgb: np.ndarray, valid: np.ndarray, transform: Affine, crs, *,
                    rgb_transform: Affine | None = None):
    """Heights (and their spread) × the correction's smooth factor field.

    ``rgb``/``valid`` may cover a larger window (``rgb_transform``, e.g. :func:`required_window`)
    so that cells of a state run get the values a whole-area call would.
    """
    field = factor_field(transform, height.shape, rgb, crs, correction, valid=valid,
                         rgb_transform=rgb_transform)
    height = (height.astype(np.float64) * field).astype(np.float32)
    if spread is not None:
        spread = (spread.astype(np.float64) * field).astype(np.float32)
    return height, spread

