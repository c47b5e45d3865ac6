"""The height model's typed configuration: architecture, input normalisation, ground sample distance.

The normalisation lives here, not with the caller: a model file carries everything needed to
turn uint8 RGB into metres. Unknown keys are errors (a config from a newer version says so).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from canopy.model.dpt import DPTConfig
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
        d = asdict(self)
        d["backbone"] = self.backbone.to_dict()
        d["decoder"] = self.decoder.to_dict()
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "HeightModelConfig":
        d = dict(d)
        if d.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ValueError(
                f"model config format {d['format_version']} is newer than this version "
                f"understands ({FORMAT_VERSION}); upgrade canopy-height"
            )
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        d["backbone"] = ViTConfig.from_dict(d.get("backbone", {}))
        d["decoder"] = DPTConfig.from_dict(d.get("decoder", {}))
        for k in ("mean", "std"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)


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
