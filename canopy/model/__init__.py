"""The height model and its checkpoint formats."""

from canopy.model.config import HeightModelConfig, hrch_config, micro_config
from canopy.model.height_model import HeightModel

__all__ = ["HeightModel", "HeightModelConfig", "hrch_config", "micro_config"]
