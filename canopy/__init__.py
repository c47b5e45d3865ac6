"""Canopy height from RGB imagery: the height model, prediction, outputs and evaluation."""

__version__ = "0.1.0"

from canopy.errors import CanopyError  # noqa: E402


def load_model(path_or_name, device="cpu"):
    """Load a height model from a checkpoint path or a registered name.

    Accepts HighResCanopyHeight v1 checkpoints (``SSLhuge_satellite.pth``, ``compressed_*.pth``),
    the project's native folder/``.safetensors`` format (a ``canopy train`` run folder too),
    ``"default"`` (the bundled demonstration model), or a random-weight variant name:
    ``micro``, ``hrch_v1_large_random``, ``hrch_v1_huge_random`` (plumbing and speed only).
    Returns a :class:`canopy.model.HeightModel`.
    """
    from canopy.model.checkpoints import load_model as _load

    return _load(path_or_name, device=device)


def predict_image(model, rgb, **kwargs):
    """Canopy height (metres) of an ``H×W×3`` uint8 RGB array (``H×W×4`` RGB + NIR for a 4-band
    model), tiled and blended without seams
    as ``canopy predict`` does (:func:`canopy.predict.blend.predict_image`)."""
    from canopy.predict.blend import predict_image as _predict_image

    return _predict_image(model, rgb, **kwargs)


__all__ = ["CanopyError", "load_model", "predict_image", "__version__"]
