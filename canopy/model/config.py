"""The height model's typed configuration: architecture, input normalisation, ground sample distance.

The normalisation lives here, not with the caller: a model file carries everything needed to
turn uint8 RGB into metres. Files are read by the project's one strict reader
(:func:`ssl_backbone.config.from_dict`): unknown keys, wrong types and a ``format_version``
newer than :data:`FORMAT_VERSION` are errors naming the field, so a config from a newer version
says so instead of being half-read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

from canopy.model.bins import MIXLOG_EPS
from canopy.model.dpt import DPTConfig
from ssl_backbone.config import from_dict as config_from_dict
from ssl_backbone.config import to_dict as config_to_dict
from ssl_backbone.errors import ConfigError
from ssl_backbone.vit import VARIANTS, ViTConfig, per_band

# inference.py of the HRCH release (its notebook's 0.430 red mean is a slip: decimetres of change)
HRCH_MEAN = (0.420, 0.411, 0.296)
HRCH_STD = (0.213, 0.156, 0.143)
# CHMv2: the Transformers image processor's defaults (and the CHMv2 notebook's CHMV2_MEAN) are
# HRCH's values; the DINOv3 README's SAT-493M mean (0.430 red) is the backbone's pretraining one.
CHMV2_MEAN, CHMV2_STD = HRCH_MEAN, HRCH_STD
# Neither release states a GSD in code: both backbones were pretrained on Maxar imagery at 0.6 m
# (SAT-493M: 493 M tiles at 0.6 m, DINOv3 paper) and v1's notebook asks for 0.6 m input.
MAXAR_GSD = 0.6

HRCH_LICENCE = "Apache-2.0 (HighResCanopyHeight)"
DINOV3_LICENCE = "DINOv3 License (https://ai.meta.com/resources/models-and-libraries/dinov3-license/)"

# 2: backbone family/registers/RoPE, decoder bin spacing and CHMv2 head options, licence
FORMAT_VERSION = 2


@dataclass
class HeightModelConfig:
    name: str = "unnamed"
    version: str = "0"
    backbone: ViTConfig = field(default_factory=ViTConfig)
    decoder: DPTConfig = field(default_factory=DPTConfig)
    mean: tuple[float, ...] = HRCH_MEAN  # per input band, 0..1 (R, G, B[, NIR])
    std: tuple[float, ...] = HRCH_STD
    gsd: float = MAXAR_GSD  # metres per pixel the model was trained at
    tile_size: int = 256
    trained: bool = True  # False for randomly initialised variants: outputs mean nothing
    source: str = ""  # where the weights came from
    licence: str = ""  # the weights' licence, written into every map's tags
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        # one normalisation value per input band: RGB's three extend to a near-infrared band by
        # the rule the grown backbone's kernel follows (ssl_backbone.vit.per_band)
        n = self.backbone.in_chans if isinstance(self.backbone, ViTConfig) else 3
        for name in ("mean", "std"):
            values = tuple(getattr(self, name))
            if len(values) == 3 and n > 3:
                values = per_band(values, n)
            if len(values) != n:
                raise ConfigError(f"model config {name} has {len(values)} values for a backbone "
                                  f"of {n} input bands", field=name)
            object.__setattr__(self, name, values)

    def to_dict(self) -> dict:
        return config_to_dict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "HeightModelConfig":
        """Refuses unknown keys and a ``format_version`` newer than :data:`FORMAT_VERSION`."""
        return config_from_dict(cls, d, what="model config")


def hrch_config(size: str) -> HeightModelConfig:
    """The released v1 architectures: 'large' (ViT-L/16) or 'huge' (ViT-H/16)."""
    if size == "large":
        return HeightModelConfig(
            name="hrch_v1_large", version="1", backbone=replace(VARIANTS["vit_large"]),
            decoder=DPTConfig(post_process_channels=(128, 256, 512, 1024)),
            licence=HRCH_LICENCE,
        )
    if size == "huge":
        return HeightModelConfig(
            name="hrch_v1_huge", version="1", backbone=replace(VARIANTS["vit_huge"]),
            decoder=DPTConfig(post_process_channels=(160, 320, 640, 1280)),
            licence=HRCH_LICENCE,
        )
    raise ValueError(f"unknown HRCH size '{size}' (large or huge)")


def chmv2_decoder(post_process_channels=(128, 256, 512, 1024), channels: int = 256,
                  head_hidden: int = 128, n_bins: int = 256, min_depth: float = 0.001,
                  max_depth: float = 96.0) -> DPTConfig:
    """CHMv2's head in our terms. Its ``max_depth`` (96 m) is the top of the range in metres:
    the mixlog bins run from ``min_depth`` to ``max_depth / 8`` and the expectation is
    multiplied by 8 (canopy.model.bins)."""
    return DPTConfig(post_process_channels=tuple(post_process_channels), channels=channels,
                     head_hidden=head_hidden, n_bins=n_bins, min_depth=min_depth,
                     max_depth=max_depth / 8.0, output_scale=8.0, bin_spacing="mixlog",
                     bin_eps=MIXLOG_EPS, fusion_project=False, residual_bias=True)


def chmv2_config() -> HeightModelConfig:
    """CHMv2 (Meta/WRI 2026): DINOv3 SAT-493M ViT-L/16 tapped at blocks 5/11/17/23 (final norm
    applied) + its DPT head with 256 mixlog bins up to 96 m."""
    return HeightModelConfig(
        name="chmv2", version="2", backbone=replace(VARIANTS["dinov3_vit_large"]),
        decoder=chmv2_decoder(), mean=CHMV2_MEAN, std=CHMV2_STD, gsd=MAXAR_GSD,
        licence=DINOV3_LICENCE,
    )


def micro_config() -> HeightModelConfig:
    """A tiny random-weight model for tests and plumbing (never for heights)."""
    return HeightModelConfig(
        name="micro", version="0", backbone=replace(VARIANTS["vit_micro"]),
        decoder=DPTConfig(post_process_channels=(16, 32, 64, 128), channels=32, head_hidden=16,
                          n_bins=64),
        trained=False,
    )


def chmv2_micro_config() -> HeightModelConfig:
    """CHMv2's architecture at micro size (dinov3 backbone, CHMv2 head), random weights."""
    return HeightModelConfig(
        name="chmv2_micro", version="0", backbone=replace(VARIANTS["dinov3_vit_micro"]),
        decoder=chmv2_decoder(post_process_channels=(16, 32, 64, 128), channels=32,
                              head_hidden=16, n_bins=64),
        trained=False,
    )
