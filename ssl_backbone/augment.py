"""Multi-crop views of overhead imagery for DINOv2 (spec ../shared/specs/ssl.md §1.5).

Two global crops and ``n_local`` local crops of one uint8 [3, H, W] window, as DINOv2 makes
them, with two changes for overhead imagery:

* orientation: no image has an "up", so every crop gets one of the 8 dihedral transforms
  (90° rotations × flips) instead of DINOv2's horizontal flip only;
* blur probabilities as DINOv2 *meant* them (global 1: always, global 2: 0.1, locals: 0.5),
  a deliberate deviation: the official wrapper inverted them (never / 0.9 / 0.5; DINOv2 PR
  #411, DINOv3 #286). Tested by rates on constant images.

Every random draw comes from the ``torch.Generator`` passed in (torchvision's random transforms
use the global stream), so views are a pure function of the loader's seed and resume exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ssl_backbone.config import from_dict as config_from_dict
from ssl_backbone.config import to_dict as config_to_dict
from ssl_backbone.errors import ConfigError
from ssl_backbone.vit import per_band

# HighResCanopyHeight's input normalisation (the height models' default), on 0..1 RGB
OVERHEAD_MEAN = (0.420, 0.411, 0.296)
OVERHEAD_STD = (0.213, 0.156, 0.143)


def check_band_stats(mean, std, what: str) -> None:
    """Refuse a normalisation that is not one value per band (3 for RGB, 4 with near-infrared:
    a 4th value normalises the NIR band, else :func:`per_band` gives it the RGB average) or a
    std that is not positive, naming the field."""
    for name, values in (("mean", mean), ("std", std)):
        if len(values) not in (3, 4):
            raise ConfigError(f"{what} {name} needs 3 values (R,G,B) or 4 (R,G,B,NIR), got "
                              f"{len(values)}", field=name)
    if min(std) <= 0:
        raise ConfigError(f"{what} std must be > 0, got {list(std)}", field="std")


def band_stats(mean, std, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalisation mean and std as [n, 1, 1] tensors (:func:`per_band`)."""
    return (torch.tensor(per_band(mean, n)).view(n, 1, 1),
            torch.tensor(per_band(std, n)).view(n, 1, 1))


@dataclass
class CropConfig:
    global_size: int = 224
    global_scale: tuple[float, float] = (0.32, 1.0)
    n_local: int = 8
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.32)
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global 1, global 2, locals
    solarize_p: float = 0.2  # global 2 only
    mean: tuple[float, ...] = OVERHEAD_MEAN  # per band, 0..1: R,G,B (+ NIR; else their average)
    std: tuple[float, ...] = OVERHEAD_STD

    def __post_init__(self):
        check_band_stats(self.mean, self.std, "crops")

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CropConfig":
        return config_from_dict(cls, d, what="crops config")


def _u(gen: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def random_resized_crop(img: torch.Tensor, size: int, scale: tuple[float, float],
                        gen: torch.Generator, ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's RandomResizedCrop (10 tries, then a centre crop), bicubic, antialiased."""
    _, h, w = img.shape
    area = h * w
    for _ in range(10):
        target = area * _u(gen, *scale)
        r = math.exp(_u(gen, math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * r))), int(round(math.sqrt(target / r)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(_u(gen) * (h - ch + 1))
            left = int(_u(gen) * (w - cw + 1))
            break
    else:
        ch, cw = min(h, w), min(h, w)
        top, left = (h - ch) // 2, (w - cw) // 2
    return TF.resized_crop(img, top, left, ch, cw, [size, size],
                           interpolation=InterpolationMode.BICUBIC, antialias=True)


def dihedral(img: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    k = int(torch.randint(4, (), generator=gen))
    img = torch.rot90(img, k, dims=(-2, -1))
    return img.flip(-1) if _u(gen) < 0.5 else img


def colour(img: torch.Tensor, cfg: CropConfig, gen: torch.Generator) -> torch.Tensor:
    """Colour jitter (with probability ``jitter_p``; factors as torchvision's ColorJitter, in
    a random order) and random grayscale, on a float [3, h, w] image in 0..1."""
    if _u(gen) < cfg.jitter_p:
        ops = [(TF.adjust_brightness, cfg.brightness), (TF.adjust_contrast, cfg.contrast),
               (TF.adjust_saturation, cfg.saturation)]
        factors = [_u(gen, max(0.0, 1 - s), 1 + s) for _, s in ops]
        hue = _u(gen, -cfg.hue, cfg.hue)
        for i in torch.randperm(4, generator=gen).tolist():
            if i < 3:
                img = ops[i][0](img, factors[i])
            elif cfg.hue > 0:
                img = TF.adjust_hue(img, hue)
        img = img.clamp(0, 1)
    if _u(gen) < cfg.grayscale_p:
        img = TF.rgb_to_grayscale(img, num_output_channels=3)
    return img


def blur(img: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    if _u(gen) < p:
        sigma = _u(gen, 0.1, 2.0)
        return TF.gaussian_blur(img, [9, 9], [sigma, sigma])
    return img


def multi_crop(img: torch.Tensor, cfg: CropConfig, gen: torch.Generator
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """uint8 [C, H, W] (C = 3, RGB, or 4, RGB + near-infrared) → (2 global, ``n_local``
    local) normalised float crops. Colour jitter and grayscale change the RGB bands only; crops,
    orientations, blur and solarisation apply to every band alike."""
    if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] not in (3, 4):
        raise ValueError(f"multi_crop takes a uint8 [3 or 4, H, W] tensor, got {img.dtype} "
                         f"{tuple(img.shape)}")
    mean, std = band_stats(cfg.mean, cfg.std, img.shape[0])

    def view(size, scale, blur_p, solarize_p=0.0):
        x = dihedral(random_resized_crop(img, size, scale, gen), gen).float() / 255.0
        x = torch.cat([colour(x[:3], cfg, gen), x[3:]])
        x = blur(x, blur_p, gen)
        if solarize_p and _u(gen) < solarize_p:
            x = TF.solarize(x, 0.5)
        return (x - mean) / std

    globals_ = [view(cfg.global_size, cfg.global_scale, cfg.blur_p[0]),
                view(cfg.global_size, cfg.global_scale, cfg.blur_p[1], cfg.solarize_p)]
    locals_ = [view(cfg.local_size, cfg.local_scale, cfg.blur_p[2]) for _ in range(cfg.n_local)]
    return globals_, locals_
