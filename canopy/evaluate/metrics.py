"""Accuracy metrics for canopy-height maps, in plain numpy.

Conventions shared by every function here:

* ``pred`` and ``ref`` are same-shaped float arrays on one grid (the evaluation grid).
  Nodata is NaN. A pixel counts only where both are finite: nodata is never read as 0 m.
* Errors are ``e = pred − ref`` (a positive bias means the map is too tall).
* An undefined value (no pixels, or a constant reference for R²) is NaN, written as ``null``
  in JSON.

Sources of the definitions: HighResCanopyHeight ``inference.py::evaluate`` for MAE, RMSE, bias,
R² and block-R²; Open-Canopy ``compute_metrics.py`` for nMAE, the tree-cover IoU at 2 m and the
height bins (the HRCH definitions: docs/reference_model.md). The edge-error figure and the
calibration shares are this project's own (documented in docs/evaluate.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np

from canopy.io import outputs
from canopy.io.outputs import TileLattice  # noqa: F401 (part of this module's API)

# Reference-height bins (m), as Open-Canopy reports them.
HEIGHT_BIN_EDGES: tuple[float, ...] = (0.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0)
TREE_COVER_THRESHOLD_M = 2.0
BLOCK_SIZE = 50
# Share of a 50×50 block that must be valid in both rasters for its means to count.
BLOCK_MIN_VALID_SHARE = 0.8
# Gaussian coverage of ±1σ and ±2σ, what a calibrated uncertainty band should reach.
GAUSSIAN_WITHIN_1SIGMA = 0.6827
GAUSSIAN_WITHIN_2SIGMA = 0.9545


def bin_labels(edges: Sequence[float] = HEIGHT_BIN_EDGES) -> list[str]:
    """``['0-2', '2-5', ...]`` for the bins between consecutive ``edges``."""
    return [f"{lo:g}-{hi:g}" for lo, hi in zip(edges[:-1], edges[1:])]


def valid_pairs(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 1-D pred and ref values where both are finite (the only pixels that count)."""
    pred = np.asarray(pred, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if pred.shape != ref.shape:
        raise ValueError(f"shape mismatch: pred {pred.shape} vs ref {ref.shape}")
    ok = np.isfinite(pred) & np.isfinite(ref)
    return pred[ok], ref[ok]


def mae(pred: np.ndarray, ref: np.ndarray) -> float:
    """MAE = mean |p − y| over pixels valid in both."""
    p, y = valid_pairs(pred, ref)
    return float(np.mean(np.abs(p - y))) if p.size else math.nan


def rmse(pred: np.ndarray, ref: np.ndarray) -> float:
    """RMSE = sqrt(mean (p − y)²)."""
    p, y = valid_pairs(pred, ref)
    return float(np.sqrt(np.mean((p - y) ** 2))) if p.size else math.nan


def bias(pred: np.ndarray, ref: np.ndarray) -> float:
    """Bias (mean error) = mean (p − y); positive = predicted too tall."""
    p, y = valid_pairs(pred, ref)
    return float(np.mean(p - y)) if p.size else math.nan


def r2(pred: np.ndarray, ref: np.ndarray) -> float:
    """R² = 1 − SS_res / SS_tot with SS_res = Σ(y − p)², SS_tot = Σ(y − ȳ)² (torchmetrics R2Score).

    NaN when fewer than two pixels or the reference is constant (SS_tot = 0).
    """
    p, y = valid_pairs(pred, ref)
    if p.size < 2:
        return math.nan
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot == 0.0:
        return math.nan
    return 1.0 - float(np.sum((y - p) ** 2)) / ss_tot


def nmae(pred: np.ndarray, ref: np.ndarray) -> float:
    """nMAE = mean(|p − y| / (1 + |y|)) (Open-Canopy): errors on short vegetation weigh more."""
    p, y = valid_pairs(pred, ref)
    return float(np.mean(np.abs(p - y) / (1.0 + np.abs(y)))) if p.size else math.nan


def tree_cover_iou(pred: np.ndarray, ref: np.ndarray,
                   threshold: float = TREE_COVER_THRESHOLD_M) -> float:
    """IoU = |P ∩ R| / |P ∪ R| of the tree-cover masks P = {p ≥ t}, R = {y ≥ t} (t = 2 m).

    NaN when neither raster has tree cover (empty union).
    """
    p, y = valid_pairs(pred, ref)
    cp, cr = p >= threshold, y >= threshold
    union = int(np.count_nonzero(cp | cr))
    return int(np.count_nonzero(cp & cr)) / union if union else math.nan


def calibration_shares(pred: np.ndarray, std: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Shares of pixels with |p − y| ≤ 1σ and ≤ 2σ, σ the predicted standard deviation.

    A calibrated Gaussian uncertainty gives 0.683 and 0.954. Pixels with a non-finite or negative
    σ do not count.
    """
    p = np.asarray(pred, dtype=np.float64)
    s = np.asarray(std, dtype=np.float64)
    y = np.asarray(ref, dtype=np.float64)
    ok = np.isfinite(p) & np.isfinite(y) & np.isfinite(s) & (s >= 0)
    n = int(np.count_nonzero(ok))
    if not n:
        return {"within_1sigma": math.nan, "within_2sigma": math.nan, "n": 0}
    e = np.abs(p[ok] - y[ok])
    return {
        "within_1sigma": float(np.count_nonzero(e <= s[ok]) / n),
        "within_2sigma": float(np.count_nonzero(e <= 2 * s[ok]) / n),
        "n": n,
    }


def height_bin_index(ref: np.ndarray, edges: Sequence[float] = HEIGHT_BIN_EDGES) -> np.ndarray:
    """Bin number (0..len(edges)−2) of each reference height; bins are [lo, hi).

    Heights below the first edge (lidar noise a little under 0 m) fall in the first bin and
    heights at or above the last edge in the last bin, so every valid pixel is in exactly one bin.
    NaN gets −1.
    """
    y = np.asarray(ref, dtype=np.float64)
    idx = np.clip(np.digitize(y, edges[1:-1], right=False), 0, len(edges) - 2)
    return np.where(np.isfinite(y), idx, -1)


# ---------------------------------------------------------------------------------------------
# Block R²


def block_means(arr: np.ndarray, valid: np.ndarray, block: int = BLOCK_SIZE
                ) -> tuple[np.ndarray, np.ndarray]:
    """Means of ``arr`` over non-overlapping ``block``×``block`` blocks from the top-left corner.

    Only ``valid`` pixels enter a mean; the second result is each block's valid share. Partial
    blocks at the right and bottom edges are dropped, as ``AvgPool2d`` (floor mode) does.
    """
    h, w = arr.shape
    nby, nbx = h // block, w // block
    if nby == 0 or nbx == 0:
        return np.empty((0, 0)), np.empty((0, 0))
    a = np.where(valid, arr, 0.0)[: nby * block, : nbx * block].astype(np.float64)
    v = valid[: nby * block, : nbx * block].astype(np.float64)
    sums = a.reshape(nby, block, nbx, block).sum(axis=(1, 3))
    counts = v.reshape(nby, block, nbx, block).sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts
    return means, counts / (block * block)


def block_mean_pairs(pred: np.ndarray, ref: np.ndarray, block: int = BLOCK_SIZE,
                     min_valid_share: float = BLOCK_MIN_VALID_SHARE
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Paired block means (pred, ref) of the blocks valid in both on ≥ ``min_valid_share``.

    Both means of a block are taken over the same pixels (valid in both rasters), so a nodata
    hole shifts neither side alone.
    """
    pred = np.asarray(pred, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if pred.ndim != 2:  # blocks need a raster; 1-D samples have none
        return np.empty(0), np.empty(0)
    valid = np.isfinite(pred) & np.isfinite(ref)
    pm, share = block_means(pred, valid, block)
    rm, _ = block_means(ref, valid, block)
    keep = share >= min_valid_share - 1e-12
    keep &= share > 0
    return pm[keep], rm[keep]


def block_r2(pred: np.ndarray, ref: np.ndarray, block: int = BLOCK_SIZE,
             min_valid_share: float = BLOCK_MIN_VALID_SHARE) -> float:
    """Block-R² = R² over the means of non-overlapping 50×50-pixel blocks.

    Adaptation of the HRCH code (which crops 256-px tiles to 253×253, then AvgPool2d(50)) to
    arbitrary rasters: blocks tile the evaluation grid from its top-left corner, edge remainders
    are dropped, and a block counts when ≥ ``min_valid_share`` of it is valid in both rasters.
    """
    pm, rm = block_mean_pairs(pred, ref, block, min_valid_share)
    return r2(pm, rm)


def block_r2_hrch(pred_crops: np.ndarray, ref_crops: np.ndarray) -> float:
    """Block-R² exactly as HRCH ``inference.py::evaluate``: crops (N, H, W), drop the first 3
    rows and columns, 50×50 average pooling (floor mode), R² over all block means.

    Predictions are clamped at ≥ 0 (ReLU) and references at ≥ 0, as that code does. Every pixel
    counts (that code has no nodata).
    """
    p = np.maximum(np.asarray(pred_crops, dtype=np.float64), 0.0)[..., 3:, 3:]
    y = np.maximum(np.asarray(ref_crops, dtype=np.float64), 0.0)[..., 3:, 3:]
    ones = np.ones(p.shape[1:], dtype=bool)
    pm = np.concatenate([block_means(c, ones)[0].ravel() for c in p])
    ym = np.concatenate([block_means(c, ones)[0].ravel() for c in y])
    return r2(pm, ym)


# ---------------------------------------------------------------------------------------------
# Sufficient statistics: every pixel metric above is a ratio of sums, so sums over references
# (or over windows of one reference) add up to exact pooled metrics without keeping the pixels.


@dataclass
class PixelSums:
    """Additive sums over valid pixel pairs, from which the pixel metrics follow exactly."""

    n: int = 0
    sum_err: float = 0.0          # Σ e
    sum_abs_err: float = 0.0      # Σ |e|
    sum_sq_err: float = 0.0       # Σ e²
    sum_ref: float = 0.0          # Σ y
    sum_sq_ref: float = 0.0       # Σ y²
    sum_norm_abs_err: float = 0.0  # Σ |e| / (1 + |y|)
    cover_intersection: int = 0   # |P ∩ R| at the tree-cover threshold
    cover_union: int = 0          # |P ∪ R|
    n_calibration: int = 0        # pixels with a usable σ
    within_1sigma: int = 0
    within_2sigma: int = 0

    @classmethod
    def from_values(cls, p: np.ndarray, y: np.ndarray, s: np.ndarray | None = None,
                    threshold: float = TREE_COVER_THRESHOLD_M) -> "PixelSums":
        """Sums over 1-D arrays that are already valid pairs (``s`` may hold NaN)."""
        p = p.astype(np.float64, copy=False)
        y = y.astype(np.float64, copy=False)
        e = p - y
        ae = np.abs(e)
        cp, cr = p >= threshold, y >= threshold
        out = cls(
            n=int(p.size), sum_err=float(e.sum()), sum_abs_err=float(ae.sum()),
            sum_sq_err=float((e * e).sum()), sum_ref=float(y.sum()), sum_sq_ref=float((y * y).sum()),
            sum_norm_abs_err=float((ae / (1.0 + np.abs(y))).sum()),
            cover_intersection=int(np.count_nonzero(cp & cr)),
            cover_union=int(np.count_nonzero(cp | cr)),
        )
        if s is not None:
            s = s.astype(np.float64, copy=False)
            ok = np.isfinite(s) & (s >= 0)
            out.n_calibration = int(np.count_nonzero(ok))
            out.within_1sigma = int(np.count_nonzero(ae[ok] <= s[ok]))
            out.within_2sigma = int(np.count_nonzero(ae[ok] <= 2 * s[ok]))
        return out

    def __add__(self, other: "PixelSums") -> "PixelSums":
        return PixelSums(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    def metrics(self) -> dict[str, float | int]:
        """MAE, RMSE, bias, R², nMAE, tree-cover IoU (and calibration shares when σ was given)."""
        n = self.n
        nan = math.nan
        ss_tot = self.sum_sq_ref - self.sum_ref ** 2 / n if n else 0.0
        out: dict[str, float | int] = {
            "n": n,
            "mae": self.sum_abs_err / n if n else nan,
            "rmse": math.sqrt(self.sum_sq_err / n) if n else nan,
            "bias": self.sum_err / n if n else nan,
            # ss_tot below a rounding-level share of Σy² means a constant reference.
            "r2": (1.0 - self.sum_sq_err / ss_tot
                   if n >= 2 and ss_tot > 1e-12 * max(self.sum_sq_ref, 1e-300) else nan),
            "nmae": self.sum_norm_abs_err / n if n else nan,
            "tree_cover_iou": (self.cover_intersection / self.cover_union
                               if self.cover_union else nan),
            "ref_mean": self.sum_ref / n if n else nan,
        }
        if self.n_calibration:
            out["within_1sigma"] = self.within_1sigma / self.n_calibration
            out["within_2sigma"] = self.within_2sigma / self.n_calibration
            out["n_calibration"] = self.n_calibration
        return out


@dataclass
class EvaluationSums:
    """Overall and per-height-bin :class:`PixelSums` plus block means: all a pooled report needs."""

    edges: tuple[float, ...] = HEIGHT_BIN_EDGES
    overall: PixelSums = field(default_factory=PixelSums)
    above_threshold: PixelSums = field(default_factory=PixelSums)  # y ≥ 2 m (Open-Canopy "Full")
    by_bin: list[PixelSums] = field(default_factory=list)
    block_pred: list[np.ndarray] = field(default_factory=list)
    block_ref: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.by_bin:
            self.by_bin = [PixelSums() for _ in range(len(self.edges) - 1)]

    @classmethod
    def from_arrays(cls, pred: np.ndarray, ref: np.ndarray, std: np.ndarray | None = None,
                    edges: Sequence[float] = HEIGHT_BIN_EDGES, block: int = BLOCK_SIZE,
                    min_valid_share: float = BLOCK_MIN_VALID_SHARE,
                    threshold: float = TREE_COVER_THRESHOLD_M) -> "EvaluationSums":
        pred = np.asarray(pred)
        ref = np.asarray(ref)
        ok = np.isfinite(pred) & np.isfinite(ref)
        p = pred[ok].astype(np.float64)
        y = ref[ok].astype(np.float64)
        s = None if std is None else np.asarray(std)[ok].astype(np.float64)
        out = cls(edges=tuple(edges))
        out.overall = PixelSums.from_values(p, y, s, threshold)
        tall = y >= threshold
        out.above_threshold = PixelSums.from_values(
            p[tall], y[tall], None if s is None else s[tall], threshold)
        idx = height_bin_index(y, edges)
        out.by_bin = [
            PixelSums.from_values(p[idx == b], y[idx == b], None if s is None else s[idx == b],
                                  threshold)
            for b in range(len(edges) - 1)
        ]
        pm, rm = block_mean_pairs(pred, ref, block, min_valid_share)
        out.block_pred, out.block_ref = [pm], [rm]
        return out

    def __add__(self, other: "EvaluationSums") -> "EvaluationSums":
        if tuple(self.edges) != tuple(other.edges):
            raise ValueError("cannot pool sums over different height bins")
        return EvaluationSums(
            edges=self.edges,
            overall=self.overall + other.overall,
            above_threshold=self.above_threshold + other.above_threshold,
            by_bin=[a + b for a, b in zip(self.by_bin, other.by_bin)],
            block_pred=self.block_pred + other.block_pred,
            block_ref=self.block_ref + other.block_ref,
        )

    def metrics(self) -> dict:
        """``{'overall': {...}, 'by_height_bin': {'0-2': {...}, ...}}`` with block-R² overall."""
        overall = self.overall.metrics()
        pm = np.concatenate(self.block_pred) if self.block_pred else np.empty(0)
        rm = np.concatenate(self.block_ref) if self.block_ref else np.empty(0)
        overall["block_r2"] = r2(pm, rm)
        overall["n_blocks"] = int(pm.size)
        overall["nmae_ref_above_2m"] = self.above_threshold.metrics()["nmae"]
        return {
            "overall": overall,
            "by_height_bin": {label: s.metrics()
                              for label, s in zip(bin_labels(self.edges), self.by_bin)},
        }


def summarize(pred: np.ndarray, ref: np.ndarray, std: np.ndarray | None = None, **kwargs) -> dict:
    """Every pixel metric, overall and per reference-height bin, for one pair of arrays."""
    return EvaluationSums.from_arrays(pred, ref, std, **kwargs).metrics()


# ---------------------------------------------------------------------------------------------
# Edge error at model-tile borders


def tile_border_positions(length: int, size: int, stride: int, origin: int,
                          count: int | None = None) -> np.ndarray:
    """Pixel-edge positions p (0 < p < length) where a model tile starts or ends.

    A border at p lies between pixels p − 1 and p. Tiles start at origin + k·stride (k ∈ ℤ, or
    k = 0..count−1 when ``count`` is given) and end at start + size; only tiles overlapping
    [0, length) can put a border inside.
    """
    if count is not None:
        starts = origin + stride * np.arange(count)
        edges = np.concatenate([starts, starts + size])
        return np.unique(edges[(edges > 0) & (edges < length)])
    k_lo = math.floor((-size - origin) / stride)       # last tile ending at or before 0, or earlier
    k_hi = math.ceil((length - origin) / stride)       # first tile starting at or after length
    starts = origin + stride * np.arange(k_lo, k_hi + 1)
    edges = np.concatenate([starts, starts + size])
    edges = edges[(edges > 0) & (edges < length)]
    return np.unique(edges)


@dataclass
class EdgeSums:
    """Σ|Δ| and pair counts for adjacent-pixel pairs across and away from tile borders."""

    border_sum: float = 0.0
    border_n: int = 0
    inside_sum: float = 0.0
    inside_n: int = 0

    def __add__(self, other: "EdgeSums") -> "EdgeSums":
        return EdgeSums(self.border_sum + other.border_sum, self.border_n + other.border_n,
                        self.inside_sum + other.inside_sum, self.inside_n + other.inside_n)

    def metrics(self) -> dict[str, float | int]:
        b = self.border_sum / self.border_n if self.border_n else math.nan
        i = self.inside_sum / self.inside_n if self.inside_n else math.nan
        ratio = b / i if self.border_n and self.inside_n and i > 0 else math.nan
        return {"edge_error": ratio, "border_mean_abs_jump": b, "inside_mean_abs_jump": i,
                "n_border_pairs": self.border_n, "n_inside_pairs": self.inside_n}


def _pair_sums(diff: np.ndarray, across: np.ndarray) -> EdgeSums:
    """Split |diff| (NaN = pair with nodata) into pairs across a border and the others."""
    ok = np.isfinite(diff)
    ad = np.abs(diff)
    b = ok & across
    i = ok & ~across
    return EdgeSums(float(ad[b].sum()), int(np.count_nonzero(b)),
                    float(ad[i].sum()), int(np.count_nonzero(i)))


def edge_sums(pred: np.ndarray, lattice: TileLattice, row_off: int = 0, col_off: int = 0,
              raster_shape: tuple[int, int] | None = None, pair_rows: int | None = None) -> EdgeSums:
    """Edge sums of a window of the prediction whose top-left pixel is (row_off, col_off).

    ``raster_shape`` is the full raster's (height, width): borders are only those strictly inside
    the raster. ``pair_rows`` says the window owns only its first ``pair_rows`` rows (the rest is
    overlap read for the vertical pairs): horizontal pairs are taken on owned rows and vertical
    pairs whose upper pixel is owned, so windows read with one row of overlap count every pair once.
    """
    a = np.asarray(pred, dtype=np.float64)
    h, w = a.shape
    full_h, full_w = raster_shape if raster_shape else (row_off + h, col_off + w)
    cols = tile_border_positions(full_w, lattice.size, lattice.stride, lattice.origin_col,
                                 lattice.count_col)
    rows = tile_border_positions(full_h, lattice.size, lattice.stride, lattice.origin_row,
                                 lattice.count_row)
    owned = h if pair_rows is None else min(pair_rows, h)
    out = EdgeSums()
    if w > 1:
        # Pair (c, c+1) in window coordinates crosses a border at raster position col_off + c + 1.
        across = np.isin(col_off + np.arange(1, w), cols)
        out += _pair_sums(a[:owned, 1:] - a[:owned, :-1], np.broadcast_to(across, (owned, w - 1)))
    n = min(owned, h - 1)
    if n > 0:
        across = np.isin(row_off + np.arange(1, n + 1), rows)
        out += _pair_sums(a[1:n + 1] - a[:n], np.broadcast_to(across[:, None], (n, w)))
    return out


def edge_error(pred: np.ndarray, size: int, stride: int, origin_col: int = 0,
               origin_row: int = 0) -> dict[str, float | int]:
    """Edge error = mean |Δ| over adjacent pixel pairs straddling a model-tile border
    ÷ mean |Δ| over adjacent pairs that straddle none (horizontal and vertical pairs together).

    1.0 means seams are invisible; > 1 means height jumps at tile borders. Pairs with a nodata
    (NaN) pixel do not count.
    """
    return edge_sums(pred, TileLattice(size, stride, origin_col, origin_row)).metrics()


def regression_scores(pred: Iterable[float], ref: Iterable[float]) -> dict[str, float | int]:
    """MAE, bias, RMSE, R² and n of two 1-D series (used for GEDI shot comparisons)."""
    p = np.asarray(list(pred) if not isinstance(pred, np.ndarray) else pred, dtype=np.float64)
    y = np.asarray(list(ref) if not isinstance(ref, np.ndarray) else ref, dtype=np.float64)
    pp, yy = valid_pairs(p, y)
    return {"n": int(pp.size), "mae": mae(p, y), "bias": bias(p, y), "rmse": rmse(p, y),
            "r2": r2(p, y)}


# ------------------------------------------------------------------ out-of-distribution score


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for ``positive`` (ties count half); None when a
    class is empty."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(positive, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    from scipy.stats import rankdata

    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class Separation:
    """How well scores separate large errors from small ones, accumulated in bounded memory
    (histograms of the scores of each class, 0.005 wide up to 20, the rest in the last bin):
    AUROC (ties within a bin count half), the share flagged (score > ``outputs.OOD_UNLIKE``) and the mean
    absolute error where flagged and where not."""

    EDGES = np.append(np.arange(0.0, 20.0 + 1e-9, 0.005), np.inf)

    def __init__(self, large_error_m: float = 5.0):
        self.large_error_m = large_error_m
        self.hist = np.zeros((2, self.EDGES.size - 1), np.int64)
        self.err_sum = np.zeros(2)  # |error| summed: not flagged, flagged
        self.count = np.zeros(2, np.int64)

    def add(self, scores: np.ndarray, abs_err: np.ndarray) -> None:
        ok = np.isfinite(scores) & np.isfinite(abs_err)
        s, e = np.clip(scores[ok], 0, None), abs_err[ok]
        large = e > self.large_error_m
        for cls in (0, 1):
            self.hist[cls] += np.histogram(s[large == bool(cls)], bins=self.EDGES)[0]
        flagged = s > outputs.OOD_UNLIKE
        for f in (0, 1):
            self.err_sum[f] += float(e[flagged == bool(f)].sum())
            self.count[f] += int((flagged == bool(f)).sum())

    def result(self) -> dict:
        neg, pos = self.hist
        n_pos, n_neg = int(pos.sum()), int(neg.sum())
        auc = None
        if n_pos and n_neg:
            below = np.cumsum(neg) - neg  # negatives in lower bins
            auc = float((pos * below).sum() + 0.5 * (pos * neg).sum()) / (n_pos * n_neg)
        n = int(self.count.sum())
        return {"large_error_m": self.large_error_m, "n": n, "auroc_large_error": auc,
                "large_error_share": n_pos / n if n else None,
                "flagged_share": int(self.count[1]) / n if n else None,
                "mae_flagged": self.err_sum[1] / self.count[1] if self.count[1] else None,
                "mae_not_flagged": self.err_sum[0] / self.count[0] if self.count[0] else None}
