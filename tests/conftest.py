"""Shared fixtures: the real data folder beside the checkout, a tiny model, small rasters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()


def shared(*parts) -> Path:
    """A file from ../shared/data; the test is skipped (with the reason) if it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


@pytest.fixture(autouse=True, scope="session")
def canopy_cache(tmp_path_factory):
    """What canopy caches (precision probes, converted checkpoints) goes to a folder of this
    test session, not the user's ~/.cache."""
    import os

    folder = tmp_path_factory.mktemp("canopy-cache")
    old = os.environ.get("CANOPY_CACHE_DIR")
    os.environ["CANOPY_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("CANOPY_CACHE_DIR", None)
    else:
        os.environ["CANOPY_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def micro_model():
    from canopy.model.checkpoints import load_model

    return load_model("micro")


def write_raster(path, data, *, crs="EPSG:32617", transform=None, nodata=None, dtype=None):
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    transform = transform or Affine(0.6, 0, 400000.0, 0, -0.6, 3280000.0)
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1],
                       count=data.shape[0], dtype=dtype or data.dtype.name, crs=crs,
                       transform=transform, nodata=nodata) as ds:
        ds.write(data.astype(dtype or data.dtype))
    return Path(path)


@pytest.fixture
def rgb_array():
    rng = np.random.default_rng(0)

    def make(h, w):
        # smooth-ish texture rather than white noise, so resampling has something to keep
        base = rng.integers(0, 255, size=(3, h // 8 + 1, w // 8 + 1)).astype(np.uint8)
        return np.repeat(np.repeat(base, 8, axis=1), 8, axis=2)[:, :h, :w].copy()

    return make
