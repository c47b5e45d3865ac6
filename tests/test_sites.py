"""The default model's real data (canopy.train.sites): licences decide what may be trained into
shipped weights, and the per-plot co-registration check sees a misregistered CHM."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import rasterio
from affine import Affine

from canopy.train import sites
from tests.conftest import SHARED_DATA, shared


@pytest.mark.parametrize("text,ok", [
    ("MIT (repo); NEON data CC0", True),
    ("repo MIT; OpenAerialMap imagery CC BY 4.0", True),
    ("repo MIT; IGN BD ORTHO via Geoportail WMTS (Licence Ouverte / Etalab 2.0)", True),
    ("repo AGPL-3.0; OpenAerialMap imagery CC BY 4.0", False),   # held through an AGPL repo
    ("GPL-3", False),
    ("UNKNOWN (no licence in repo)", False),
    ("repo MIT; data source not stated", False),
    ("repo BSD-3-Clause; USGS High Resolution Orthoimagery (US public domain, presumed)", False),
])
def test_licence_rule(text, ok):
    assert sites.is_open(text) is ok


def _rows():
    shared("SOURCES.tsv")
    with open(SHARED_DATA / "SOURCES.tsv", newline="") as f:
        return {r["local_path"]: r["license"] for r in csv.DictReader(f, delimiter="\t")}


def test_no_copyleft_or_unknown_file_reaches_shipped_weights():
    """Read SOURCES.tsv here: every pair and pretraining image the recipe may train on has a
    CC0 / CC BY / public-domain / Licence Ouverte licence and no GPL or unknown one; the GPL-3
    Kootenay pair is evaluation-only; a held-out site's images are left out of pretraining."""
    rows = _rows()
    rel = {str(p): p.relative_to(SHARED_DATA).as_posix() for p in SHARED_DATA.rglob("*")}
    trained = sites.shippable_pairs()
    assert {p.site for p in trained} == {"TEAK", "OSBS", "BART"} and len(trained) >= 18
    for p in trained:
        for f in (p.imagery, p.las or p.chm):
            text = rows[rel[f]].lower()
            assert "cc0" in text and "gpl" not in text, f
    assert [p.site for p in sites.evaluation_only_pairs()] == ["Kootenay"]
    images = sites.pretraining_images()
    assert len(images) > 80
    for f in images:
        text = rows[rel[f]].lower()
        assert "gpl" not in text and "unknown" not in text and "not stated" not in text, f
        assert any(w in text for w in ("cc0", "cc by", "public domain", "licence ouverte")), f
    not_osbs = sites.pretraining_images(exclude_sites=("OSBS",))
    assert not any("OSBS" in f for f in not_osbs) and any("OSBS" in f for f in images)


def test_coregistration_sees_a_chm_moved_by_four_metres(tmp_path):
    """TEAK_049's CHM (from its cloud) against its image, then the same CHM with its transform
    moved 4 m west: the offset at the correlation peak moves by 4 m west, and the site check rejects the
    moved plot among its untouched neighbours."""
    pairs = {p.name: p for p in sites.shippable_pairs() if p.site == "TEAK"}
    if "TEAK_049" not in pairs:
        pytest.skip("NEON TEAK plots not available")
    results = {}
    for name in ("TEAK_043", "TEAK_047", "TEAK_049", "TEAK_051"):
        p = pairs[name]
        results[name] = sites.coregistration(p.imagery, sites.derive_chm(p, tmp_path, 1.0), p.crs)
    chm = sites.derive_chm(pairs["TEAK_049"], tmp_path, 1.0)
    moved = tmp_path / "moved.tif"
    with rasterio.open(chm) as src:
        profile, data = src.profile, src.read()
    profile["transform"] = src.transform * Affine.translation(-4, 0)  # 1 m cells: 4 m west
    with rasterio.open(moved, "w", **profile) as dst:
        dst.write(data)
    shifted = sites.coregistration(pairs["TEAK_049"].imagery, str(moved), "EPSG:32611")
    base = results["TEAK_049"]
    assert shifted["shift_east_m"] - base["shift_east_m"] == pytest.approx(-4.0, abs=1.0)
    assert abs(shifted["shift_north_m"] - base["shift_north_m"]) <= 2.0  # the peak wobbles ~2 m
    checked = sites.check_sites({**results, "TEAK_049": shifted},
                                {k: "TEAK" for k in results}, tolerance_m=2.5)
    assert not checked["TEAK_049"]["accepted"]
    assert np.mean([checked[k]["accepted"] for k in ("TEAK_043", "TEAK_047", "TEAK_051")]) >= 2 / 3
