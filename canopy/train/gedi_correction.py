"""The GEDI correction model: a small CNN that rescales decoder heights, block by block, to GEDI.

HighResCanopyHeight rescales its decoder output with "a convolutional network trained on GEDI"
that "outputs a single value correction factor"; that code is unreleased
(../shared/specs/hrch_compat.md §1.5). This is our design of it (docs/gedi_correction.md):

* **Input**: a block of imagery at the decoder's GSD (default 1024 px) averaged down to
  ``input_px`` (default 256 px), plus optional scalars (block-centre latitude/longitude, the
  imagery's sun elevation). The block lattice is anchored in the output CRS
  (``canopy.predict.correction``), so a block's factor is a pure function of where it is.
* **Trunk**: four stride-2 3×3 convolutions (16× fewer pixels) and a few residual
  depthwise-separable blocks; each 16×16-pixel cell of the input becomes one feature token.
* **Pooling**: PatchConvNet's learned aggregation (Touvron et al. 2021, arXiv:2112.13692): one
  learned class token attends over the feature tokens (class attention, as in CaiT), so the
  network itself decides which parts of the block matter (stands of tall trees more than fields).
  Tokens over nodata are masked out of the attention.
* **Output**: one log-factor per block, bounded to ±``max_log_factor`` by a scaled tanh;
  factor = exp(log-factor) is positive. The last layer starts at zero (factor 1 everywhere), and
  fitting first sets its bias to the one global factor that best fits the training shots, so the
  network starts from the best constant and learns deviations from it.
* **Objective**: factor × (the decoder's ``p``-th height percentile inside each 25 m GEDI
  footprint) ≈ the shot's RH``p`` (Huber loss over shots, p = 95 or 98).
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, LayerScale, LayerScale2d, Mlp
from torch import nn

from canopy.errors import CheckpointError, InputError, OutputError
from canopy.model.config import HRCH_MEAN, HRCH_STD
from canopy.predict.correction import (
    INTERPOLATIONS, SCALAR_WIDTHS, block_centres_lonlat, cut_block, downsample_block,
    global_origin, scalar_features)

FORMAT = "canopy-gedi-correction"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
REPORT_FILE = "metrics.json"
RH_METRICS = {"rh95": 95.0, "rh98": 98.0}
STEM_STRIDE = 16  # four stride-2 convolutions


# ---------------------------------------------------------------------------------------------
# configuration


@dataclass
class CorrectionConfig:
    """Everything needed to rebuild and apply a correction model (saved as config.json)."""

    block_px: int = 1024            # block side, in pixels of the height map
    input_px: int = 256             # the block is averaged down to this before the CNN
    gsd: float = 0.6                # metres per pixel of the height map it corrects
    rh_metric: str = "rh95"         # GEDI metric matched; the footprint percentile follows it
    footprint_diameter_m: float = 25.0
    scalars: tuple[str, ...] = ()   # optional inputs: "latlon", "sun"
    widths: tuple[int, ...] = (16, 32, 48, 64)  # stem convolutions; the last is the token width
    depth: int = 2                  # residual conv blocks after the stem
    heads: int = 4                  # of the class-attention pooling
    head_hidden: int = 64
    max_log_factor: float = math.log(4.0)  # factors stay within [1/4, 4]
    interpolation: str = "bilinear"  # of log-factors between block centres
    mean: tuple[float, float, float] = HRCH_MEAN
    std: tuple[float, float, float] = HRCH_STD
    decoder: str = ""               # the height model it was fitted on (information)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.scalars = tuple(self.scalars)
        self.widths = tuple(int(w) for w in self.widths)
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        if self.rh_metric not in RH_METRICS:
            raise InputError(f"--rh must be one of {', '.join(RH_METRICS)}, got '{self.rh_metric}'")
        if self.interpolation not in INTERPOLATIONS:
            raise InputError(f"interpolation must be one of {INTERPOLATIONS}, got '{self.interpolation}'")
        unknown = [s for s in self.scalars if s not in SCALAR_WIDTHS]
        if unknown:
            raise InputError(f"unknown scalar input '{unknown[0]}' (known: {', '.join(SCALAR_WIDTHS)})")
        if self.input_px % STEM_STRIDE or self.block_px % self.input_px or self.input_px <= 0:
            raise InputError(f"--block-px {self.block_px} must be a multiple of --input-px "
                             f"{self.input_px}, itself a multiple of {STEM_STRIDE}")
        if len(self.widths) != 4:
            raise InputError("widths: give four stem widths")
        if self.widths[-1] % self.heads:
            raise InputError(f"token width {self.widths[-1]} is not divisible by {self.heads} heads")

    @property
    def percentile(self) -> float:
        return RH_METRICS[self.rh_metric]

    @property
    def n_scalars(self) -> int:
        return sum(SCALAR_WIDTHS[s] for s in self.scalars)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("scalars", "widths", "mean", "std"):
            d[k] = list(d[k])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "CorrectionConfig":
        d = dict(d)
        if d.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(f"correction config format {d['format_version']} is newer than this "
                             f"version understands ({FORMAT_VERSION}); upgrade canopy-height")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown correction config keys: {sorted(unknown)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# the network


class ConvBlock(nn.Module):
    """Pre-norm residual block: 1×1 expand, 3×3 depthwise, 1×1 project (PatchConvNet's column
    block without squeeze-excitation; LayerNorm, not BatchNorm, so a block's output never depends
    on the others in its batch)."""

    def __init__(self, dim: int, expand: int = 2):
        super().__init__()
        hidden = dim * expand
        self.norm = LayerNorm2d(dim)
        self.body = nn.Sequential(
            nn.Conv2d(dim, hidden, 1), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden), nn.GELU(),
            nn.Conv2d(hidden, dim, 1),
        )
        self.scale = LayerScale2d(dim, init_values=1e-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale(self.body(self.norm(x)))


class ClassAttentionPool(nn.Module):
    """Learned aggregation (PatchConvNet): a class token queries ``[cls, tokens]``.

    Only the class token is updated (attention, then an MLP, each residual with layer scale),
    so the cost is linear in the number of tokens. ``token_mask`` (B×N, True = valid) keeps
    nodata out; the class token is always a valid key, so an all-nodata block still yields a
    defined output: the model's prior factor at that place.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls, std=0.02)
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ls1 = LayerScale(dim, init_values=1e-1)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values=1e-1)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        b, n, d = tokens.shape
        h = self.heads
        x = torch.cat([self.cls.expand(b, -1, -1), tokens], dim=1)
        xn = self.norm1(x)
        q = self.q(xn[:, :1]).reshape(b, 1, h, d // h).transpose(1, 2)
        k, v = self.kv(xn).reshape(b, n + 1, 2, h, d // h).permute(2, 0, 3, 1, 4)
        keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=tokens.device), token_mask], 1)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        cls = x[:, :1] + self.ls1(self.proj(attn.transpose(1, 2).reshape(b, 1, d)))
        cls = cls + self.ls2(self.mlp(self.norm2(cls)))
        return self.norm_out(cls[:, 0])


class GediCorrectionNet(nn.Module):
    """Block of imagery (+ scalars) → one bounded log-factor."""

    def __init__(self, cfg: CorrectionConfig):
        super().__init__()
        self.cfg = cfg
        layers, c_in = [], 3
        for c_out in cfg.widths:
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GELU()]
            c_in = c_out
        self.stem = nn.Sequential(*layers)
        self.blocks = nn.Sequential(*(ConvBlock(c_in) for _ in range(cfg.depth)))
        self.pool = ClassAttentionPool(c_in, cfg.heads)
        self.head = nn.Sequential(nn.Linear(c_in + cfg.n_scalars, cfg.head_hidden), nn.GELU(),
                                  nn.Linear(cfg.head_hidden, 1))
        nn.init.zeros_(self.head[-1].weight)  # factor 1 before fitting
        nn.init.zeros_(self.head[-1].bias)
        self.register_buffer("pixel_mean", torch.tensor(cfg.mean).view(1, 3, 1, 1) * 255.0,
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.std).view(1, 3, 1, 1) * 255.0,
                             persistent=False)

    def forward(self, rgb: torch.Tensor, valid: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        """uint8-valued RGB (B×3×S×S), valid mask (B×S×S), scalars (B×k) → raw output (B)."""
        valid = valid.to(torch.bool)
        x = (rgb.float() - self.pixel_mean) / self.pixel_std
        x = x * valid[:, None]  # nodata is the mean colour: 0 after normalisation
        feats = self.blocks(self.stem(x))
        tokens = feats.flatten(2).transpose(1, 2)
        share = F.avg_pool2d(valid[:, None].float(), STEM_STRIDE).flatten(1)
        pooled = self.pool(tokens, share >= 0.5)
        if self.cfg.n_scalars:
            pooled = torch.cat([pooled, scalars.float()], dim=1)
        return self.head(pooled)[:, 0]

    def bound(self, raw: torch.Tensor) -> torch.Tensor:
        m = self.cfg.max_log_factor
        return m * torch.tanh(raw / m)

    def log_factor(self, rgb: torch.Tensor, valid: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        return self.bound(self(rgb, valid, scalars))

    def set_constant_factor(self, factor: float) -> float:
        """Make the output ``factor`` while the last layer's weights are zero (fitting's start);
        returns the log-factor set (clipped inside the bounds, where tanh still has a slope)."""
        m = self.cfg.max_log_factor
        log_f = float(np.clip(math.log(max(factor, 1e-6)), -0.9 * m, 0.9 * m))
        with torch.no_grad():
            self.head[-1].bias.fill_(m * math.atanh(log_f / m))
        return log_f


# ---------------------------------------------------------------------------------------------
# training samples: blocks with the GEDI shots inside them


@dataclass
class BlockSample:
    """One block of imagery and the shots whose reported position falls inside it."""

    key: str              # "<source>:<block row>:<block col>"
    rgb: np.ndarray       # 3×S×S uint8, the averaged block
    valid: np.ndarray     # S×S bool
    scalars: np.ndarray   # (k,) float32
    pred: np.ndarray      # (n,) decoder's footprint percentile at each shot (m)
    rh: np.ndarray        # (n,) the shots' GEDI RH (m)


def pixel_coords(transform, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Fractional (col, row) of CRS points on a north-up grid."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return (x - transform.c) / transform.a, (y - transform.f) / transform.e


def footprint_percentiles(height: np.ndarray, transform, x: np.ndarray, y: np.ndarray,
                          diameter_m: float, percentile: float) -> np.ndarray:
    """The ``percentile`` of ``height`` over pixel centres within ``diameter_m``/2 of each point.

    NaN where any pixel of the footprint is outside the raster or nodata: a footprint that is
    only partly seen would not compare like with like.
    """
    h, w = height.shape
    gsd = transform.a
    radius = diameter_m / 2
    half = int(math.ceil(radius / gsd)) + 1
    off = np.arange(-half, half + 1)
    chunk = max(1, 4_000_000 // off.size ** 2)  # shots per pass: ~32 MB per temporary
    cols, rows = pixel_coords(transform, x, y)
    out = np.full(len(cols), np.nan)
    for s in range(0, len(cols), chunk):
        xs, ys = np.asarray(x[s:s + chunk], np.float64), np.asarray(y[s:s + chunk], np.float64)
        cc = np.floor(cols[s:s + chunk]).astype(np.int64)[:, None] + off
        rr = np.floor(rows[s:s + chunk]).astype(np.int64)[:, None] + off
        dx2 = (transform.c + (cc + 0.5) * gsd - xs[:, None]) ** 2
        dy2 = (transform.f - (rr + 0.5) * gsd - ys[:, None]) ** 2
        inside = dy2[:, :, None] + dx2[:, None, :] <= radius * radius
        in_raster = ((rr >= 0) & (rr < h))[:, :, None] & ((cc >= 0) & (cc < w))[:, None, :]
        vals = height[np.clip(rr, 0, h - 1)[:, :, None], np.clip(cc, 0, w - 1)[:, None, :]]
        ok = inside & in_raster & np.isfinite(vals)
        whole = ok.sum(axis=(1, 2)) == inside.sum(axis=(1, 2))
        vals = np.where(ok, vals, np.nan).reshape(len(xs), -1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: shots off the raster
            pct = np.nanpercentile(vals, percentile, axis=1)
        out[s:s + chunk] = np.where(whole, pct, np.nan)
    return out


def usable_shots(shots, rh_metric: str, source: str = "shots"):
    """Quality-filtered shots with a finite RH value (GeoDataFrame, any CRS)."""
    if rh_metric not in shots.columns:
        raise InputError(f"GEDI shots of {source} have no column '{rh_metric}'")
    if shots.crs is None:
        shots = shots.set_crs("EPSG:4326")  # GEDI positions are lon/lat
    keep = np.isfinite(shots[rh_metric].to_numpy(dtype=np.float64))
    if "quality_flag" in shots.columns:
        keep &= shots["quality_flag"].fillna(0).to_numpy(dtype=np.float64) == 1
    if "degrade_flag" in shots.columns:
        keep &= shots["degrade_flag"].fillna(1).to_numpy(dtype=np.float64) == 0
    return shots.loc[keep]


@dataclass
class SceneShots:
    """How the shots of one scene were used (for the report)."""

    source: str
    n_shots: int = 0         # usable shots given for the scene
    n_inside: int = 0        # whose footprint lies wholly on valid heights
    n_blocks: int = 0


def block_samples(rgb: np.ndarray, valid: np.ndarray, height: np.ndarray, transform, crs,
                  shots, cfg: CorrectionConfig, *, sun_elevation: float | None = None,
                  source: str = "scene") -> tuple[list[BlockSample], SceneShots]:
    """Blocks of one scene that hold GEDI shots, with the decoder's footprint percentiles.

    ``rgb`` (3×H×W uint8), ``valid`` and ``height`` (the decoder's output, metres, NaN nodata)
    share the north-up grid ``transform`` in ``crs`` at ``cfg.gsd``. ``shots`` is a GeoDataFrame
    of points with a ``cfg.rh_metric`` column, in any CRS.
    """
    from rasterio.crs import CRS

    if height.shape != rgb.shape[1:] or valid.shape != height.shape:
        raise InputError(f"{source}: heights {height.shape} and imagery {rgb.shape[1:]} differ in size")
    if CRS.from_user_input(crs).is_geographic:
        raise InputError(f"{source}: GEDI correction needs a projected CRS in metres")
    origin = global_origin(transform, cfg.gsd)
    shots = usable_shots(shots, cfg.rh_metric, source)
    report = SceneShots(source, n_shots=len(shots))
    if not len(shots):
        return [], report
    pts = shots.geometry.to_crs(crs)
    x, y = pts.x.to_numpy(), pts.y.to_numpy()
    rh = shots[cfg.rh_metric].to_numpy(dtype=np.float64)
    pred = footprint_percentiles(height, transform, x, y, cfg.footprint_diameter_m, cfg.percentile)
    ok = np.isfinite(pred) & (rh > -5.0) & (rh < 120.0)  # RH beyond these is a processing failure
    report.n_inside = int(ok.sum())
    if not ok.any():
        return [], report
    cols, rows = pixel_coords(transform, x[ok], y[ok])
    g_row = origin[0] + np.floor(rows).astype(np.int64)
    g_col = origin[1] + np.floor(cols).astype(np.int64)
    p = cfg.block_px
    blocks = np.stack([np.floor_divide(g_row, p), np.floor_divide(g_col, p)], axis=1)
    uniq, which = np.unique(blocks, axis=0, return_inverse=True)
    which = which.ravel()
    if cfg.scalars:
        lon, lat = block_centres_lonlat(uniq[:, 0], uniq[:, 1], p, cfg.gsd, crs)
        scal = scalar_features(cfg.scalars, lon, lat, sun_elevation)
    else:
        scal = np.zeros((len(uniq), 0), np.float32)
    samples = []
    for i, (br, bc) in enumerate(uniq):
        block, block_ok = cut_block(rgb, valid, origin, (int(br), int(bc)), p)
        small, small_ok = downsample_block(block, block_ok, cfg.input_px)
        sel = which == i
        samples.append(BlockSample(f"{source}:{br}:{bc}", small, small_ok, scal[i],
                                   pred[ok][sel].astype(np.float32), rh[ok][sel].astype(np.float32)))
    report.n_blocks = len(samples)
    return samples, report


# ---------------------------------------------------------------------------------------------
# fitting


@dataclass
class FitOptions:
    steps: int = 400
    batch_blocks: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    huber_delta_m: float = 2.0      # metres: GEDI RH noise is ~1-2 m, errors beyond are outliers
    # Pull each block's log-factor towards the global one. Blocks whose shots all fall on bare
    # ground (percentile 0) carry no information about the factor, yet their factor is
    # interpolated into neighbouring forest; without this pull it would drift anywhere.
    shrink_to_global: float = 0.1
    val_share: float = 0.2          # of blocks, chosen by a hash of the block key (stable)
    min_val_blocks: int = 2         # fewer than this: no validation split
    augment: bool = True            # 90° rotations and flips (a height factor has no direction)
    seed: int = 0
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_blocks < 1 or not self.lr > 0:
            raise InputError("--steps must be ≥ 0, --batch-blocks ≥ 1 and --lr > 0")
        if not 0 <= self.val_share < 1:
            raise InputError(f"--val-share must be in [0, 1), got {self.val_share}")


@dataclass
class ShotScores:
    n_shots: int
    mae: float              # mean |factor × percentile − RH| (m)
    bias: float             # mean (factor × percentile − RH) (m)
    rmse: float


@dataclass
class FitReport:
    """What fitting did and how well, saved as metrics.json next to the model."""

    n_blocks_train: int
    n_blocks_val: int
    global_factor: float                     # the best single factor for the training shots
    train_before: ShotScores                 # factor 1 (the decoder as is)
    train_global: ShotScores                 # one global factor
    train_after: ShotScores                  # the fitted model
    val_before: ShotScores | None = None
    val_global: ShotScores | None = None
    val_after: ShotScores | None = None
    block_factors: dict = field(default_factory=dict)  # min / median / max over blocks
    steps: int = 0
    seconds: float = 0.0
    loss_log: list = field(default_factory=list)       # [step, loss]
    scenes: list = field(default_factory=list)         # SceneShots as dicts

    def to_dict(self) -> dict:
        return asdict(self)


def split_blocks(samples: Sequence[BlockSample], opts: FitOptions) -> tuple[list[int], list[int]]:
    """Validation blocks by a hash of their key: the same block is always on the same side."""
    cut = int(round(opts.val_share * 10_000))
    val = [i for i, s in enumerate(samples) if zlib.crc32(s.key.encode()) % 10_000 < cut]
    if len(val) < opts.min_val_blocks or len(val) == len(samples):
        return list(range(len(samples))), []
    val_set = set(val)
    return [i for i in range(len(samples)) if i not in val_set], val


def shot_scores(samples: Sequence[BlockSample], factors: np.ndarray) -> ShotScores:
    pred = np.concatenate([s.pred * f for s, f in zip(samples, factors)]).astype(np.float64)
    rh = np.concatenate([s.rh for s in samples]).astype(np.float64)
    e = pred - rh
    return ShotScores(int(e.size), float(np.abs(e).mean()), float(e.mean()),
                      float(np.sqrt((e * e).mean())))


def least_squares_factor(samples: Sequence[BlockSample]) -> float:
    """argmin_f Σ (f·p − rh)²  = Σ p·rh / Σ p² over all shots."""
    p = np.concatenate([s.pred for s in samples]).astype(np.float64)
    rh = np.concatenate([s.rh for s in samples]).astype(np.float64)
    den = float((p * p).sum())
    return float((p * rh).sum() / den) if den > 0 else 1.0


def _batch(samples: Sequence[BlockSample], idx: Sequence[int], rng: np.random.Generator | None,
           device) -> tuple[torch.Tensor, ...]:
    rgb, valid, scal, pred, rh, owner = [], [], [], [], [], []
    for j, i in enumerate(idx):
        s = samples[i]
        img, ok = s.rgb, s.valid
        if rng is not None:  # same rotation/flip for image and mask
            k = int(rng.integers(4))
            img, ok = np.rot90(img, k, axes=(1, 2)), np.rot90(ok, k)
            if rng.random() < 0.5:
                img, ok = img[:, :, ::-1], ok[:, ::-1]
        rgb.append(np.ascontiguousarray(img))
        valid.append(np.ascontiguousarray(ok))
        scal.append(s.scalars)
        pred.append(s.pred)
        rh.append(s.rh)
        owner.append(np.full(len(s.pred), j))
    t = [torch.from_numpy(np.stack(rgb)), torch.from_numpy(np.stack(valid)),
         torch.from_numpy(np.stack(scal)), torch.from_numpy(np.concatenate(pred)),
         torch.from_numpy(np.concatenate(rh)), torch.from_numpy(np.concatenate(owner))]
    return tuple(v.to(device) for v in t)


@torch.no_grad()
def predict_block_factors(model: GediCorrectionNet, samples: Sequence[BlockSample],
                          device="cpu") -> np.ndarray:
    """The fitted factor of each block, one block at a time (as apply_correction runs them)."""
    model.eval()
    out = np.empty(len(samples))
    for i in range(len(samples)):
        rgb, valid, scal, *_ = _batch(samples, [i], None, device)
        out[i] = float(torch.exp(model.log_factor(rgb, valid, scal))[0])
    return out


def _lr_at(step: int, opts: FitOptions) -> float:
    if step < opts.warmup_steps:
        return opts.lr * (step + 1) / opts.warmup_steps
    span = max(1, opts.steps - opts.warmup_steps)
    return opts.lr * 0.5 * (1 + math.cos(math.pi * (step - opts.warmup_steps) / span))


def fit_correction(samples: Sequence[BlockSample], cfg: CorrectionConfig,
                   opts: FitOptions = FitOptions(), *, device="cpu",
                   log: Callable[[str], None] | None = None) -> tuple[GediCorrectionNet, FitReport]:
    """Fit a correction model so that factor × footprint percentile matches GEDI RH."""
    if not samples:
        raise InputError("no block holds a usable GEDI shot: nothing to fit the correction on")
    t0 = time.time()
    train_idx, val_idx = split_blocks(samples, opts)
    train = [samples[i] for i in train_idx]
    val = [samples[i] for i in val_idx]
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(opts.seed)
        model = GediCorrectionNet(cfg).to(device)
    g = least_squares_factor(train)
    log_g = model.set_constant_factor(g)
    rng = np.random.default_rng(opts.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "cls" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "cls" not in n)]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=opts.lr)
    loss_log = []
    model.train()
    for step in range(opts.steps):
        for group in optim.param_groups:
            group["lr"] = _lr_at(step, opts)
        replace = len(train) < opts.batch_blocks
        idx = rng.choice(len(train), size=opts.batch_blocks, replace=replace)
        rgb, valid, scal, pred, rh, owner = _batch(train, idx, rng if opts.augment else None, device)
        log_f = model.log_factor(rgb, valid, scal)
        loss = F.huber_loss(torch.exp(log_f)[owner] * pred, rh, delta=opts.huber_delta_m)
        loss = loss + opts.shrink_to_global * ((log_f - log_g) ** 2).mean()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        if step % opts.log_every == 0 or step == opts.steps - 1:
            loss_log.append([step, round(float(loss.detach()), 4)])
            if log:
                log(f"step {step}/{opts.steps}: loss {float(loss.detach()):.3f}")
    model.eval()
    f_train = predict_block_factors(model, train, device)
    report = FitReport(
        n_blocks_train=len(train), n_blocks_val=len(val), global_factor=g,
        train_before=shot_scores(train, np.ones(len(train))),
        train_global=shot_scores(train, np.full(len(train), g)),
        train_after=shot_scores(train, f_train), steps=opts.steps, loss_log=loss_log)
    all_f = f_train
    if val:
        f_val = predict_block_factors(model, val, device)
        report.val_before = shot_scores(val, np.ones(len(val)))
        report.val_global = shot_scores(val, np.full(len(val), g))
        report.val_after = shot_scores(val, f_val)
        all_f = np.concatenate([f_train, f_val])
    report.block_factors = {"min": float(all_f.min()), "median": float(np.median(all_f)),
                            "max": float(all_f.max())}
    report.seconds = round(time.time() - t0, 2)
    return model, report


# ---------------------------------------------------------------------------------------------
# native format: model.safetensors (config in its metadata too) + config.json


def check_run_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a non-empty output folder unless ``overwrite`` (checked before any compute)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"output '{out}' exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"output folder '{out}' is not empty (use --overwrite to replace it)")
    return out


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_correction(model: GediCorrectionNet, out_dir: str | os.PathLike,
                    report: FitReport | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ ``metrics.json``) into ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder '{out}': {exc.strerror}") from None
    cfg_json = model.cfg.to_json()
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # config and report first: a folder with weights is always a complete model
    _atomic_write(out / CONFIG_FILE, lambda p: p.write_text(cfg_json + "\n"))
    if report is not None:
        _atomic_write(out / REPORT_FILE,
                      lambda p: p.write_text(json.dumps(report.to_dict(), indent=2) + "\n"))
    _atomic_write(out / WEIGHTS_FILE, lambda p: save_file(
        sd, str(p), metadata={"config": cfg_json, "format": FORMAT}))
    return out


def load_correction_model(path: str | os.PathLike, device="cpu") -> GediCorrectionNet:
    """A correction model from its folder or its ``.safetensors`` file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise CheckpointError(f"GEDI correction '{path}' not found (expected a folder with {WEIGHTS_FILE})")
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(str(weights))
    except Exception as exc:  # truncated or foreign files
        raise CheckpointError(f"{weights}: cannot read safetensors ({str(exc).splitlines()[0]})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{weights}: not a GEDI correction model (format "
                              f"'{meta.get('format', 'unknown')}')")
    cfg_path = weights.with_name(CONFIG_FILE)
    try:
        cfg_dict = json.loads(cfg_path.read_text()) if cfg_path.is_file() else json.loads(meta["config"])
        cfg = CorrectionConfig.from_dict(cfg_dict)
    except (ValueError, TypeError, KeyError, InputError) as exc:
        raise CheckpointError(f"{cfg_path}: {exc}") from None
    model = GediCorrectionNet(cfg)
    missing = sorted(set(model.state_dict()) ^ set(sd))
    if missing:
        raise CheckpointError(f"{weights}: weights do not match its config (key {missing[0]})")
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights}: weights do not match its config "
                              f"({str(exc).splitlines()[-1].strip()})") from None
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# from files or a catalog to a fitted model


@dataclass
class TrainingScene:
    """One imagery raster with the GEDI shots over it."""

    imagery: str
    shots: object                    # GeoDataFrame of points, any CRS
    heights: str | None = None       # the decoder's heights on the imagery grid (skips the decoder)
    sun_elevation: float | None = None


def read_shots_file(path: str | os.PathLike, bbox: Sequence[float] | None = None):
    """GEDI shots from a GeoParquet/GeoJSON file or a ``catalog add gedi`` partition folder,
    optionally limited to ``bbox`` (lon/lat)."""
    import geopandas as gpd

    p = Path(path)
    if not p.exists():
        raise InputError(f"GEDI shots '{path}' do not exist")
    if p.is_dir():
        from data_catalog.gedi import shots_in_bbox

        return shots_in_bbox(p, bbox if bbox is not None else (-180, -90, 180, 90))
    try:
        shots = gpd.read_parquet(p) if p.suffix.lower() in (".parquet", ".geoparquet") else gpd.read_file(p)
    except Exception as exc:  # any reader failure is a bad input file
        raise InputError(f"GEDI shots '{path}' cannot be read: {str(exc).splitlines()[0]}") from None
    if shots.crs is None:
        shots = shots.set_crs("EPSG:4326")
    if bbox is not None and len(shots):
        lonlat = shots.geometry.to_crs("EPSG:4326")
        x, y = lonlat.x.to_numpy(), lonlat.y.to_numpy()
        shots = shots.loc[(x >= bbox[0]) & (x <= bbox[2]) & (y >= bbox[1]) & (y <= bbox[3])]
    return shots


def raster_bbox_wgs84(path: str) -> tuple[float, float, float, float]:
    from rasterio.warp import transform_bounds

    from canopy.io.imagery import open_raster

    with open_raster(path) as ds:
        if ds.crs is None:
            raise InputError(f"'{path}' has no CRS; GEDI shots cannot be placed on it")
        return transform_bounds(ds.crs, "EPSG:4326", *ds.bounds, densify_pts=21)


def _sun_tag(path: str) -> float | None:
    import rasterio

    with rasterio.open(path) as ds:
        value = ds.tags().get("CANOPY_SUN_ELEVATION")
    return float(value) if value else None


def scenes_from_files(imagery: Sequence[str], gedi: Sequence[str],
                      heights: Sequence[str] | None = None) -> list[TrainingScene]:
    """Every GEDI file applies to every imagery raster; shots are cut to each raster's bbox."""
    if not imagery:
        raise InputError("give --imagery (one or more RGB rasters) or --catalog")
    if not gedi:
        raise InputError("give --gedi (GEDI shots: GeoParquet, GeoJSON or an ingest folder)")
    if heights and len(heights) != len(imagery):
        raise InputError(f"give one --heights raster per --imagery raster "
                         f"({len(heights)} for {len(imagery)})")
    import pandas as pd

    scenes = []
    for i, path in enumerate(imagery):
        bbox = raster_bbox_wgs84(str(path))
        parts = [read_shots_file(g, bbox) for g in gedi]
        parts = [p.to_crs("EPSG:4326") for p in parts if len(p)]
        shots = pd.concat(parts, ignore_index=True) if parts else read_shots_file(gedi[0]).iloc[0:0]
        scenes.append(TrainingScene(str(path), shots, str(heights[i]) if heights else None,
                                    _sun_tag(str(path))))
    return scenes


def scenes_from_catalog(catalog_path: str | os.PathLike) -> list[TrainingScene]:
    """Imagery rows of a catalog, each with the shots of the 'gedi' rows over it."""
    from data_catalog.catalog import Catalog
    from data_catalog.gedi import shots_in_bbox

    cat = Catalog.open(catalog_path, must_exist=True)
    imagery = cat.query(kinds="imagery")
    if not len(imagery):
        raise InputError(f"catalog '{catalog_path}' has no imagery (kind 'imagery')")
    if not len(cat.query(kinds="gedi")):
        raise InputError(f"catalog '{catalog_path}' has no GEDI shots (add granules with "
                         "`canopy catalog add gedi ...`)")
    scenes = []
    for path, geom in zip(imagery["path"], imagery.geometry):
        rows = cat.query(geometry=geom, kinds="gedi")
        if not len(rows):
            continue
        shots = shots_in_bbox(list(rows["path"]), geom.bounds)
        scenes.append(TrainingScene(str(path), shots, None, _sun_tag(str(path))))
    if not scenes:
        raise InputError(f"no GEDI shot of catalog '{catalog_path}' lies over its imagery")
    return scenes


def _read_heights(path: str, img, source: str) -> np.ndarray:
    from canopy.io.imagery import open_raster

    with open_raster(path) as ds:
        same = (ds.crs == img.crs and ds.transform.almost_equals(img.transform)
                and (ds.height, ds.width) == img.valid.shape)
        if not same:
            raise InputError(f"heights '{path}' are not on the grid of imagery '{source}' as read at "
                             f"{img.transform.a:g} m (predict them from that imagery)")
        data = ds.read(1, masked=True).astype(np.float32)
    return np.ma.filled(data, np.nan)


def decoder_gsd(decoder, heights: str | None) -> tuple[float, str]:
    """The GSD and name of what produced the heights: the decoder model, else the heights raster."""
    if decoder is not None:
        from canopy.model.checkpoints import load_config

        cfg = decoder.cfg if hasattr(decoder, "cfg") else load_config(decoder)
        return float(cfg.gsd), cfg.name
    if heights is None:
        raise InputError("give --model (the decoder whose heights are corrected) or --heights")
    from canopy.io.imagery import open_raster

    with open_raster(heights) as ds:
        return float(abs(ds.transform.a)), Path(heights).name


def samples_from_scenes(scenes: Sequence[TrainingScene], cfg: CorrectionConfig, *, decoder=None,
                        device="cpu", precision: str = "fp32", batch_size: int = 8,
                        sun_elevation: float | None = None,
                        log: Callable[[str], None] | None = None
                        ) -> tuple[list[BlockSample], list[SceneShots]]:
    """Read each scene on the correction's grid, predict (or read) heights, cut blocks."""
    from canopy.io.imagery import read_rgb_on_grid
    from canopy.predict.blend import predict_array

    model = None
    if decoder is not None and any(s.heights is None for s in scenes):
        from canopy.model.checkpoints import load_model

        model = decoder if hasattr(decoder, "predict_tensor") else load_model(decoder, device=device)
    samples, reports = [], []
    n_shots = 0
    for scene in scenes:
        n_shots += len(scene.shots)
        if not len(scene.shots):
            reports.append(SceneShots(Path(scene.imagery).name))
            continue
        img = read_rgb_on_grid(scene.imagery, cfg.gsd)
        if scene.heights is not None:
            height = _read_heights(scene.heights, img, scene.imagery)
        elif model is not None:
            if log:
                log(f"predicting heights for {Path(scene.imagery).name}")
            height, _ = predict_array(model, img.rgb, img.valid, precision=precision,
                                      batch_size=batch_size)
        else:
            raise InputError("give --model (the decoder whose heights are corrected) or --heights")
        sun = scene.sun_elevation if scene.sun_elevation is not None else sun_elevation
        s, rep = block_samples(img.rgb, img.valid, height, img.transform, img.crs, scene.shots,
                               cfg, sun_elevation=sun, source=Path(scene.imagery).name)
        samples += s
        reports.append(rep)
    if not samples:
        names = ", ".join(Path(s.imagery).name for s in scenes[:3]) + (" ..." if len(scenes) > 3 else "")
        if n_shots == 0:
            raise InputError(f"no GEDI shot lies within the bounds of the imagery ({names})")
        raise InputError(f"none of the {n_shots} GEDI shots lies wholly on the imagery ({names})")
    return samples, reports


def train_gedi_correction(scenes: Sequence[TrainingScene], out_dir: str | os.PathLike,
                          cfg: CorrectionConfig, opts: FitOptions = FitOptions(), *, decoder=None,
                          device="cpu", precision: str = "fp32", batch_size: int = 8,
                          sun_elevation: float | None = None, overwrite: bool = False,
                          log: Callable[[str], None] | None = None) -> FitReport:
    """``canopy train-gedi-correction``: blocks from ``scenes``, fit, save into ``out_dir``."""
    check_run_dir(out_dir, overwrite)
    gsd, name = decoder_gsd(decoder, next((s.heights for s in scenes if s.heights), None))
    cfg.gsd, cfg.decoder = gsd, name
    samples, reports = samples_from_scenes(
        scenes, cfg, decoder=decoder, device=device, precision=precision, batch_size=batch_size,
        sun_elevation=sun_elevation, log=log)
    if log:
        log(f"{len(samples)} blocks, {sum(len(s.rh) for s in samples)} shots; fitting {opts.steps} steps")
    model, report = fit_correction(samples, cfg, opts, device=device, log=log)
    report.scenes = [asdict(r) for r in reports]
    save_correction(model, out_dir, report)
    return report


# ---------------------------------------------------------------------------------------------
# measured effect on synthetic scenes (docs/gedi_correction.md)

BIAS_SCENARIOS = ("uniform", "cover")


def biased_decoder(chm: np.ndarray, gsd: float, scenario: str) -> np.ndarray:
    """A stand-in for a decoder with a known bias, made from the exact CHM (synthetic only).

    * ``uniform``: 0.7 × CHM everywhere (the factor to learn is 1/0.7 ≈ 1.43).
    * ``cover``: under-estimates more where the canopy is closed, as RGB models do in dense tall
      forest: CHM × (0.95 − 0.5 × canopy cover within ~100 m). The right factor depends on what
      the imagery shows, which one global factor cannot follow.
    """
    if scenario == "uniform":
        return (0.7 * chm).astype(np.float32)
    if scenario == "cover":
        from scipy import ndimage

        cover = ndimage.gaussian_filter((chm > 2.0).astype(np.float32), sigma=100.0 / gsd,
                                        mode="reflect", truncate=3.0)
        return (chm * (0.95 - 0.5 * cover)).astype(np.float32)
    raise InputError(f"unknown bias scenario '{scenario}' (one of {', '.join(BIAS_SCENARIOS)})")


def _synthetic_scene(seed: int, side_px: int, gsd: float, scenario: str, track_spacing_m: float):
    import geopandas as gpd
    from affine import Affine

    from canopy.synth import DEFAULT_ORIGIN, GediConfig, gedi_like_shots, make_scene

    scene = make_scene(side_px, side_px, gsd, seed, layers=())
    shots = gedi_like_shots(scene.chm, gsd, seed, GediConfig(track_spacing_m=track_spacing_m))
    # scenes side by side, 10 km apart, on the model's pixel lattice
    x0 = round((DEFAULT_ORIGIN[0] + 10_000.0 * seed) / gsd) * gsd
    y0 = round(DEFAULT_ORIGIN[1] / gsd) * gsd
    transform = Affine(gsd, 0, x0, 0, -gsd, y0)
    gdf = gpd.GeoDataFrame({"rh95": shots["rh95"], "rh98": shots["rh98"]},
                           geometry=gpd.points_from_xy(x0 + shots["x"], y0 - shots["y"]),
                           crs="EPSG:32617")
    return scene, biased_decoder(scene.chm, gsd, scenario), transform, gdf


def _map_scores(pred: np.ndarray, chm: np.ndarray) -> dict:
    e = pred.astype(np.float64) - chm
    trees = chm >= 2.0
    return {"mae": float(np.abs(e).mean()), "bias": float(e.mean()),
            "mae_trees": float(np.abs(e[trees]).mean()), "bias_trees": float(e[trees].mean())}


def synthetic_benchmark(scenario: str = "cover", n_train: int = 12, n_test: int = 4,
                        area_km2: float = 4.0, gsd: float = 0.6, cfg: CorrectionConfig | None = None,
                        opts: FitOptions | None = None, track_spacing_m: float = 150.0,
                        log: Callable[[str], None] | None = None) -> dict:
    """Fit on ``n_train`` synthetic scenes with a biased stand-in decoder; score ``n_test`` others.

    Scores on the test scenes: GEDI MAE (footprint percentile of the map vs the shots' noisy RH,
    at their mis-located reported positions) and map MAE vs the exact CHM, for the decoder as is,
    one global factor, and the fitted model applied with :func:`apply_correction`.
    """
    from canopy.predict.correction import apply_correction

    cfg = cfg or CorrectionConfig(gsd=gsd, decoder=f"synthetic-{scenario}")
    opts = opts or FitOptions()
    side = int(round(math.sqrt(area_km2 * 1e6) / gsd))
    t0 = time.time()
    samples = []
    for seed in range(1, n_train + 1):
        scene, height, transform, shots = _synthetic_scene(seed, side, gsd, scenario, track_spacing_m)
        s, _ = block_samples(scene.rgb, np.ones(height.shape, bool), height, transform,
                             "EPSG:32617", shots, cfg, source=f"train{seed}")
        samples += s
        if log:
            log(f"train scene {seed}: {len(s)} blocks, {sum(len(b.rh) for b in s)} shots")
    model, report = fit_correction(samples, cfg, opts, log=log)
    g = report.global_factor
    # "exact_chm" scores the true CHM itself: the floor GEDI noise and geolocation error leave
    names = ("decoder", "global_factor", "corrected", "exact_chm")
    scores = {k: {"gedi": [], "map": []} for k in names}
    for seed in range(1000 + 1, 1000 + n_test + 1):
        scene, height, transform, shots = _synthetic_scene(seed, side, gsd, scenario, track_spacing_m)
        corrected = apply_correction(height, scene.rgb, transform, "EPSG:32617", model)
        pts = shots.geometry
        rh = shots[cfg.rh_metric].to_numpy()
        maps = (("decoder", height), ("global_factor", g * height), ("corrected", corrected),
                ("exact_chm", scene.chm))
        for name, m in maps:
            pct = footprint_percentiles(m, transform, pts.x.to_numpy(), pts.y.to_numpy(),
                                        cfg.footprint_diameter_m, cfg.percentile)
            ok = np.isfinite(pct)
            scores[name]["gedi"].append(np.abs(pct[ok] - rh[ok]))
            scores[name]["map"].append((_map_scores(m, scene.chm), m.size))
        if log:
            log(f"test scene {seed} scored")
    summary = {}
    for name, parts in scores.items():
        gedi_err = np.concatenate(parts["gedi"])
        weights = np.array([w for _, w in parts["map"]], np.float64)
        map_keys = parts["map"][0][0].keys()
        summary[name] = {
            "gedi_mae": float(gedi_err.mean()), "n_gedi_shots": int(gedi_err.size),
            **{f"chm_{k}": float(np.average([d[k] for d, _ in parts["map"]], weights=weights))
               for k in map_keys},
        }
    return {"scenario": scenario, "n_train_scenes": n_train, "n_test_scenes": n_test,
            "area_km2_per_scene": area_km2, "gsd": gsd, "config": cfg.to_dict(),
            "fit_options": asdict(opts), "fit": report.to_dict(), "test": summary,
            "seconds": round(time.time() - t0, 1)}


def _main(argv: Sequence[str] | None = None) -> None:
    """``python -m canopy.train.gedi_correction benchmark``: the numbers of docs/gedi_correction.md."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m canopy.train.gedi_correction")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("benchmark", help="fit and score on synthetic scenes")
    bench.add_argument("--scenario", choices=BIAS_SCENARIOS, default="cover")
    bench.add_argument("--train-scenes", type=int, default=12)
    bench.add_argument("--test-scenes", type=int, default=4)
    bench.add_argument("--area-km2", type=float, default=4.0)
    bench.add_argument("--steps", type=int, default=FitOptions.steps)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    bench.add_argument("-o", "--output", type=Path, help="write the result JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # a command-line entry point: its own process
    result = synthetic_benchmark(args.scenario, args.train_scenes, args.test_scenes, args.area_km2,
                                 opts=FitOptions(steps=args.steps, seed=args.seed),
                                 log=lambda m: print(m, flush=True))
    text = json.dumps(result, indent=2)
    if args.output:
        args.output.write_text(text + "\n")
    print(json.dumps(result["test"], indent=2))


if __name__ == "__main__":
    _main()
