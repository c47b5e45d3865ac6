"""Fixtures for the data_catalog tests: the real files in ../shared/data, copied when a test changes them.

Tests ask for ``shared_data`` and read files as attributes (``shared_data.soap_chm``); a test
whose file is absent is skipped with the path in the reason.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

DATA = (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()

_FILES = {
    "soap_chm": ("chm_tiles", "neon", "NEON_D17_SOAP_DP3_302000_4100000_CHM.tif"),  # -9999, EPSG:32611
    "osbs_tile_chm": ("chm_tiles", "neon", "NEON_D03_OSBS_DP3_399000_3284000_CHM.tif"),  # flight dates in tags
    "abby_chm": ("chm_tiles", "neon", "NEON_D16_ABBY_DP3_559000_5070000_CHM.tif"),  # NaN cells under -9999
    "duc_chm": ("chm_tiles", "brazil_forestgapr", "ALS_CHM_DUC.tif"),  # NaN nodata, no CRS (EPSG:31981)
    "kootenay_chm": ("rgb_chm_pairs", "kootenay_bc_drone", "kootenayCHM.tif"),  # float64, -1.7e308
    "kootenay_rgb": ("rgb_chm_pairs", "kootenay_bc_drone", "kootenayOrtho_from_rda.tif"),
    "osbs_plot_rgb": ("rgb_chm_pairs", "neon_osbs_029", "OSBS_029.tif"),
    "osbs_plot_chm": ("rgb_chm_pairs", "neon_osbs_029", "OSBS_029_CHM.tif"),  # -3.4e38, no CRS (EPSG:32617)
    "osbs_plot_laz": ("rgb_chm_pairs", "neon_osbs_029", "OSBS_029.laz"),  # no CRS (EPSG:32617)
    "mixed_conifer_laz": ("lidar", "lidR", "MixedConifer.laz"),  # EPSG:26912
    "cerrado_las": ("lidar", "rgedi_brazil", "Cerrado.las"),  # not normalised, no ground class
    "bart_rgb": ("rgb_chm_pairs", "neon_bart_041", "BART_041.tif"),  # beside .aux.xml and .laz
    "sjer_rgb": ("rgb_only", "2018_SJER_3_252000_4107000_image_477.tif"),  # non-square pixels
    "gedi_l2a": ("gedi", "rgedi_sub_2019108", "GEDI02_A_2019108080338_O01964_T05337_02_001_01_sub.h5"),
}


def data_file(*parts: str) -> Path:
    """A file from ../shared/data; the calling test is skipped, saying which file, if it is absent."""
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} (expected ../shared/data beside the checkout)")
    return path


class SharedData:
    """The real files the tests use, by role; looking one up skips the test when it is missing."""

    def __getattr__(self, name: str) -> Path:
        if name not in _FILES:
            raise AttributeError(name)
        return data_file(*_FILES[name])


@pytest.fixture
def shared_data() -> SharedData:
    return SharedData()


@pytest.fixture
def catalog_path(tmp_path: Path) -> Path:
    return tmp_path / "catalog.parquet"


@pytest.fixture
def copy_data(tmp_path: Path):
    """Copy a shared file into tmp_path (tests that move, delete or edit files never touch the originals)."""

    def copy(source: Path, name: str | None = None) -> Path:
        target = tmp_path / "copies" / (name or source.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        return target

    return copy
