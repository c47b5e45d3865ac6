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

from canopy.model.dpt import DPTConfig
from ssl_backbone.config import from_dict as config_from_dict
from ssl_backbone.config import to_dict as config_to_dict
from ssl_backbone.vit import VARIANTS, ViTConfig

# inference.py of the HRCH release (its notebook's 0.430 red mean is a slip: decimetres of change)
HRCH_MEAN = (0.420, 0.411, 0.296)
HRCH_STD = (0.213, 0.156, 0.143)

FORMAT_VERSION = 1


@dataclass
class HeightModelConfig:
    name: str = "unnamed"
    version: str = "0"
    backbone: ViTConfig = field(default_factory=ViTConfig)
    decoder: DPTConfig = field(default_factory=DPTConfig)
    mean: tuple[float, float, float] = HRCH_MEAN
    std: tuple[float, float, float] = HRCH_STD
    gsd: float = 0.6  # metres per pixel the model was trained at
    tile_size: int = 256
    trained: bool = True  # False for randomly initialised variants: outputs mean nothing
    source: str = ""  # where the weights came from
    format_version: int = FORMAT_VERSION

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
        )
    if size == "huge":
        return HeightModelConfig(
            name="hrch_v1_huge", version="1", backbone=replace(VARIANTS["vit_huge"]),
            decoder=DPTConfig(post_process_channels=(160, 320, 640, 1280)),
        )
    raise ValueError(f"unknown HRCH size '{size}' (large or huge)")


def micro_config() -> HeightModelConfig:
    """A tiny random-weight model for tests and plumbing (never for heights)."""
    return HeightModelConfig(
        name="micro", version="0", backbone=replace(VARIANTS["vit_micro"]),
        decoder=DPTConfig(post_process_channels=(16, 32, 64, 128), channels=32, head_hidden=16,
                          n_bins=64),
        trained=False,
    )
