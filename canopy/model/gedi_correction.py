"""The GEDI correction network: a small CNN that rescales decoder heights, block by block, to GEDI.

HighResCanopyHeight rescales its decoder output with "a convolutional network trained on GEDI"
that "outputs a single value correction factor"; that code is unreleased. This is our design
of it (docs/gedi_correction.md):

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

The network, its configuration, what it sees of a block (:func:`downsample_block`,
:func:`cut_block`, :func:`scalar_features`) and its file format live here, beside the height
model: prediction (``canopy.predict.correction``) and fitting (``canopy.train.gedi_correction``)
both import them, so the two see the same pixels and prediction never imports training code.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, LayerScale, LayerScale2d, Mlp
from torch import nn

from canopy.errors import CheckpointError, InputError, OptionError, OutputError
from canopy.model.config import HRCH_MEAN, HRCH_STD
from data_catalog.gedi import FOOTPRINT_DIAMETER_M
from ssl_backbone.checkpoints import save_safetensors
from ssl_backbone.config import from_dict as config_from_dict
from ssl_backbone.config import to_dict as config_to_dict

FORMAT = "canopy-gedi-correction"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
REPORT_FILE = "metrics.json"
RH_METRICS = {"rh95": 95.0, "rh98": 98.0}
STEM_STRIDE = 16  # four stride-2 convolutions
INTERPOLATIONS = ("bilinear", "bicubic")  # of log-factors between block centres
SCALAR_WIDTHS = {"latlon": 3, "sun": 1}  # features each optional scalar input adds


# ---------------------------------------------------------------------------------------------
# configuration


@dataclass
class CorrectionConfig:
    """Everything needed to rebuild and apply a correction model (saved as config.json)."""

    block_px: int = 1024            # block side, in pixels of the height map
    input_px: int = 256             # the block is averaged down to this before the CNN
    gsd: float = 0.6                # metres per pixel of the height map it corrects
    rh_metric: str = "rh95"         # GEDI metric matched; the footprint percentile follows it
    footprint_diameter_m: float = FOOTPRINT_DIAMETER_M
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
            raise OptionError("rh_metric", f"must be one of {', '.join(RH_METRICS)}, "
                                           f"got '{self.rh_metric}'")
        if self.interpolation not in INTERPOLATIONS:
            raise OptionError("interpolation", f"must be one of {', '.join(INTERPOLATIONS)}, "
                                               f"got '{self.interpolation}'")
        unknown = [s for s in self.scalars if s not in SCALAR_WIDTHS]
        if unknown:
            raise OptionError("scalars", f"'{unknown[0]}' is unknown (known: "
                                         f"{', '.join(SCALAR_WIDTHS)})")
        if self.input_px <= 0 or self.input_px % STEM_STRIDE or self.block_px % self.input_px:
            raise OptionError("block_px", f"{{block_px}} {self.block_px} must be a multiple of "
                                          f"{{input_px}} {self.input_px}, itself a multiple of "
                                          f"{STEM_STRIDE}")
        if len(self.widths) != 4:
            raise OptionError("widths", "give four stem widths")
        if self.widths[-1] % self.heads:
            raise OptionError("heads", f"{self.heads} do not divide the token width "
                                       f"{self.widths[-1]}")

    @property
    def percentile(self) -> float:
        return RH_METRICS[self.rh_metric]

    @property
    def n_scalars(self) -> int:
        return sum(SCALAR_WIDTHS[s] for s in self.scalars)

    def to_dict(self) -> dict:
        return config_to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "CorrectionConfig":
        return config_from_dict(cls, d, what="correction config")


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
# block inputs (shared with training, so the model sees the same pixels in both)


def downsample_block(rgb: np.ndarray, valid: np.ndarray, input_px: int) -> tuple[np.ndarray, np.ndarray]:
    """A ``3×P×P`` uint8 block → ``3×S×S`` uint8 means over valid pixels and an ``S×S`` mask.

    Integer arithmetic, so the result is exact and identical wherever it is computed. An output
    pixel is valid when at least half of the pixels it averages are; invalid ones hold 0.
    """
    p = rgb.shape[-1]
    k = p // input_px
    if rgb.shape != (3, p, p) or k * input_px != p or valid.shape != (p, p):
        raise ValueError(f"block {rgb.shape} cannot be averaged down to {input_px} px")
    v = valid.reshape(input_px, k, input_px, k)
    count = v.sum(axis=(1, 3), dtype=np.int64)
    sums = (rgb.astype(np.int64) * valid).reshape(3, input_px, k, input_px, k).sum(axis=(2, 4))
    ok = 2 * count >= k * k
    mean = (2 * sums + count) // np.maximum(2 * count, 1)  # round half up, in integers
    return np.where(ok[None], mean, 0).astype(np.uint8), ok


def cut_block(rgb: np.ndarray, valid: np.ndarray, origin: tuple[int, int], block: tuple[int, int],
              block_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Block ``(br, bc)`` of an image whose upper-left pixel is at global ``origin``; the part
    outside the image is invalid."""
    p = block_px
    r0, c0 = block[0] * p - origin[0], block[1] * p - origin[1]
    h, w = valid.shape
    out = np.zeros((3, p, p), np.uint8)
    ok = np.zeros((p, p), bool)
    rs, re_ = max(r0, 0), min(r0 + p, h)
    cs, ce = max(c0, 0), min(c0 + p, w)
    if rs < re_ and cs < ce:
        out[:, rs - r0:re_ - r0, cs - c0:ce - c0] = rgb[:, rs:re_, cs:ce]
        ok[rs - r0:re_ - r0, cs - c0:ce - c0] = valid[rs:re_, cs:ce]
    return out, ok


def block_centres_lonlat(blocks_r: np.ndarray, blocks_c: np.ndarray, block_px: int, gsd: float,
                         crs) -> tuple[np.ndarray, np.ndarray]:
    """Longitude and latitude (degrees) of block centres on the lattice of ``crs``."""
    from pyproj import CRS, Transformer

    x = (np.asarray(blocks_c, np.float64) + 0.5) * block_px * gsd
    y = -(np.asarray(blocks_r, np.float64) + 0.5) * block_px * gsd
    to_wgs84 = Transformer.from_crs(CRS.from_user_input(crs), CRS.from_epsg(4326), always_xy=True)
    lon, lat = to_wgs84.transform(x, y)
    return np.asarray(lon, np.float64), np.asarray(lat, np.float64)


def scalar_features(names: Sequence[str], lon: np.ndarray, lat: np.ndarray,
                    sun_elevation: float | None) -> np.ndarray:
    """The optional scalar inputs, (n, k) float32. Location is a point on the unit sphere (no
    jump at the antimeridian); sun elevation enters as its sine (shadow length ∝ 1/tan)."""
    lon, lat = np.atleast_1d(lon), np.atleast_1d(lat)
    cols = []
    for name in names:
        if name == "latlon":
            la, lo = np.radians(lat), np.radians(lon)
            cols += [np.sin(la), np.cos(la) * np.sin(lo), np.cos(la) * np.cos(lo)]
        elif name == "sun":
            if sun_elevation is None:
                raise InputError("this GEDI correction model needs the imagery's sun elevation "
                                 "(--sun-elevation DEGREES)")
            cols.append(np.full(lon.shape, math.sin(math.radians(sun_elevation))))
        else:
            raise InputError(f"unknown scalar input '{name}' (known: {', '.join(SCALAR_WIDTHS)})")
    if not cols:
        return np.zeros((lon.size, 0), np.float32)
    return np.stack(cols, axis=1).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# native format: model.safetensors (config in its metadata too) + config.json

def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_correction(model: GediCorrectionNet, out_dir: str | os.PathLike,
                    report: dict | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (+ ``metrics.json``, the fit ``report``)
    into ``out_dir``."""
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
                      lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    save_safetensors(sd, out / WEIGHTS_FILE, metadata={"config": cfg_json, "format": FORMAT})
    return out


def load_correction(path: str | os.PathLike, device="cpu") -> GediCorrectionNet:
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

