"""Augmentations for overhead imagery, applied identically to image, masks, target and GEDI shots.

Overhead scenes have no "up": the eight rotations/reflections of the square (90° turns and a
flip) are all plausible views, so they are used with equal probability. Photometric jitter
(brightness, contrast, per-channel gain) mimics sensor and illumination differences between
flights; it touches the image only. No scaling or arbitrary-angle rotation: they would change the
ground sample distance or resample the lidar target.

Optional, off unless set (the default model's recipe sets them), for imagery unlike the training
flights: *coarser imagery* (the image averaged down to a GSD up to ``1 + gsd_coarsen`` times the
model's and interpolated back, as `canopy predict` upsamples coarse input: the footprint and the
target stay), *sensor colour* (a random 3×3 channel mix near the identity and a gamma: other
cameras' spectral responses and tone curves) and *haze* (a blend towards a bluish grey).

Randomness comes from an explicit ``torch.Generator`` (seeded per sample by the dataset), so an
augmented sample depends only on (seed, epoch, index): this is what makes resume exact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class AugmentConfig:
    dihedral: bool = True      # random 90° rotation and horizontal flip (8 views)
    brightness: float = 0.08   # additive offset, ± this share of 255
    contrast: float = 0.15     # gain about the chip mean, 1 ± this
    colour: float = 0.05       # per-channel gain, 1 ± this
    p_photometric: float = 0.8
    gsd_coarsen: float = 0.0   # up to this much coarser (factor 1 + x), with probability 0.5
    sensor: float = 0.0        # channel mix off-diagonals ± this, gamma 1 ± this
    haze: float = 0.0          # blend up to this share towards haze, with probability 0.3

    def to_dict(self) -> dict:
        return asdict(self)


NO_AUGMENT = AugmentConfig(dihedral=False, brightness=0.0, contrast=0.0, colour=0.0,
                           p_photometric=0.0)


def _uniform(gen: torch.Generator, lo: float, hi: float, n: int = 1) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def rot90_points(points: torch.Tensor, k: int, height: int, width: int) -> torch.Tensor:
    """Continuous (row, col) points under ``torch.rot90(x, k, dims=(-2, -1))`` of an H×W grid.

    One counter-clockwise turn sends pixel (r, c) to (W − 1 − c, r), so a continuous point
    (r, c) goes to (W − c, r) and the grid becomes W×H.
    """
    pts = points.clone()
    h, w = height, width
    for _ in range(k % 4):
        r, c = pts[:, 0].clone(), pts[:, 1].clone()
        pts[:, 0], pts[:, 1] = w - c, r
        h, w = w, h
    return pts


def flip_points(points: torch.Tensor, width: int) -> torch.Tensor:
    """Continuous (row, col) points under a left-right flip (``torch.flip(x, dims=(-1,))``)."""
    pts = points.clone()
    pts[:, 1] = width - pts[:, 1]
    return pts


def dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Rotate the last two axes by k·90° (counter-clockwise), then flip left-right if asked."""
    x = torch.rot90(x, k, dims=(-2, -1)) if k % 4 else x
    return torch.flip(x, dims=(-1,)) if flip else x


def dihedral_points(points: torch.Tensor, k: int, flip: bool, height: int, width: int) -> torch.Tensor:
    pts = rot90_points(points, k, height, width)
    w_after = width if k % 2 == 0 else height
    return flip_points(pts, w_after) if flip else pts


def photometric(image: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Brightness, contrast and per-channel gain on a float [C,H,W] image in 0..255 (a band
    past RGB, near-infrared, takes the mean of the RGB gains: exposure, not colour)."""
    x = image.float()
    gains = _uniform(gen, 1 - cfg.colour, 1 + cfg.colour, 3).view(3, 1, 1)
    if x.shape[0] > 3:
        gains = torch.cat([gains, gains.mean().expand(x.shape[0] - 3, 1, 1)])
    contrast = float(_uniform(gen, 1 - cfg.contrast, 1 + cfg.contrast))
    offset = float(_uniform(gen, -cfg.brightness, cfg.brightness)) * 255.0
    mean = x.mean()
    x = (x * gains - mean) * contrast + mean + offset
    return x.clamp(0.0, 255.0)


def augment(image: torch.Tensor, valid: torch.Tensor, target: torch.Tensor,
            shots: torch.Tensor | None, gen: torch.Generator, cfg: AugmentConfig):
    """One random view of a sample. ``target`` may be on a coarser grid than the image: both
    cover the same square footprint, so the same dihedral move applies to each at its own size.
    ``shots`` [n,3] = (row, col, rh) in image pixels. Returns (image float, valid, target, shots).
    """
    # draw every random number in a fixed order, whatever is enabled, so views are reproducible
    k = int(torch.randint(0, 4, (1,), generator=gen))
    flip = bool(torch.rand(1, generator=gen) < 0.5)
    do_photo = bool(torch.rand(1, generator=gen) < cfg.p_photometric)
    h, w = image.shape[-2:]
    if cfg.dihedral:
        image, valid, target = (dihedral(t, k, flip) for t in (image, valid, target))
        if shots is not None and len(shots):
            shots = torch.cat([dihedral_points(shots[:, :2], k, flip, h, w), shots[:, 2:]], dim=1)
    image = photometric(image, gen, cfg) if do_photo else image.float()
    if cfg.gsd_coarsen or cfg.sensor or cfg.haze:  # drawn after the above: older views unchanged
        image = appearance(image, gen, cfg)
    return image, valid, target, shots


def appearance(image: torch.Tensor, gen: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """Coarser GSD, sensor colour and haze (module docstring) on a float [C,H,W] in 0..255;
    the sensor's colour mix and haze change the RGB bands only (near-infrared sees through
    thin haze). Every random number is drawn whether or not its step applies (reproducible
    views)."""
    import torch.nn.functional as F

    coarse = bool(torch.rand(1, generator=gen) < 0.5)
    factor = float(_uniform(gen, 1.0, 1.0 + cfg.gsd_coarsen))
    mix = torch.eye(3) + _uniform(gen, -cfg.sensor, cfg.sensor, 9).view(3, 3) * (1 - torch.eye(3))
    gamma = float(_uniform(gen, 1 - cfg.sensor, 1 + cfg.sensor))
    hazy = bool(torch.rand(1, generator=gen) < 0.3)
    amount = float(_uniform(gen, 0.0, cfg.haze))
    level = float(_uniform(gen, 150.0, 230.0))
    x = image
    h, w = x.shape[-2:]
    if coarse and cfg.gsd_coarsen and factor > 1.01:
        small = (max(1, round(h / factor)), max(1, round(w / factor)))
        x = F.interpolate(x[None], size=small, mode="area")
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)[0]
    if cfg.sensor:
        mix = mix / mix.sum(1, keepdim=True)  # rows sum to 1: a grey stays grey
        rgb = torch.einsum("ij,jhw->ihw", mix, x[:3]).clamp(0.0, 255.0)
        x = 255.0 * (torch.cat([rgb, x[3:]]) / 255.0) ** gamma
    if hazy and cfg.haze:
        tint = torch.tensor([1.0, 1.02, 1.06]).view(3, 1, 1) * level
        x = torch.cat([x[:3] * (1 - amount) + tint * amount, x[3:]])
    return x.clamp(0.0, 255.0)
