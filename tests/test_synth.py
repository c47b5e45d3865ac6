"""Synthetic scenes: determinism, exact CHM, physically oriented shadows, GEDI-like shots, files."""

import math

import numpy as np
import pytest
import rasterio

from canopy.errors import InputError, OutputError
from canopy.synth import (
    BUILDING, FIELD, ROAD, TREE, GediConfig, SceneLayout, Trees, gedi_like_shots, make_scene,
    plan_layout, scene_transform, synth_scene)
from data_catalog.gedi import footprint_percentiles


@pytest.fixture(scope="module")
def scene():
    """A 300 × 300 m procedural scene at 1 m (small enough to be fast, big enough to hold a bit
    of everything)."""
    return make_scene(300, 300, gsd=1.0, seed=5)


def test_same_seed_same_scene_other_seed_other_scene(scene):
    again = make_scene(300, 300, gsd=1.0, seed=5)
    assert np.array_equal(scene.rgb, again.rgb)
    assert np.array_equal(scene.chm, again.chm)
    other = make_scene(300, 300, gsd=1.0, seed=6)
    assert not np.array_equal(scene.chm, other.chm)


def test_rendering_does_not_depend_on_block_size(scene):
    # Textures hash world position and halos hold shadows, so 64-px blocks give the same pixels.
    small_blocks = make_scene(300, 300, gsd=1.0, seed=5, block_size=64)
    assert np.array_equal(scene.rgb, small_blocks.rgb)
    assert np.array_equal(scene.chm, small_blocks.chm)
    assert np.array_equal(scene.layers["shadow"], small_blocks.layers["shadow"])


def test_scene_contents_and_chm_conventions(scene):
    rgb, chm, layers = scene
    assert rgb.shape == (3, 300, 300) and rgb.dtype == np.uint8
    assert chm.shape == (300, 300) and chm.dtype == np.float32
    lc = layers["landcover"]
    assert {TREE, FIELD, ROAD}.issubset(set(np.unique(lc).tolist()))
    assert chm.min() >= 0
    assert np.all(chm[lc == ROAD] == 0)
    assert np.all(chm[lc == FIELD] <= 1.5)
    if (lc == BUILDING).any():  # canopy height is vegetation only: 0 on roofs, roofs in the DSM
        assert np.all(chm[lc == BUILDING] == 0)
        assert np.all(layers["dsm"][lc == BUILDING] >= 3.0)
    assert 0.02 < layers["shadow"].mean() < 0.6


def test_crown_tops_are_exact_for_every_isolated_tree():
    layout = plan_layout(300, 300, 1.0, seed=5)
    s = make_scene(300, 300, gsd=1.0, seed=5, layout=layout)
    t = layout.trees
    d = np.hypot(t.x[:, None] - t.x[None, :], t.y[:, None] - t.y[None, :])
    overlap = d < (t.crown_radius[:, None] + t.crown_radius[None, :])
    np.fill_diagonal(overlap, False)
    isolated = np.flatnonzero(~overlap.any(axis=1))
    assert isolated.size >= 5
    rows = np.floor(t.y[isolated]).astype(int)
    cols = np.floor(t.x[isolated]).astype(int)
    assert np.array_equal(s.chm[rows, cols], t.height[isolated].astype(np.float32))
    # And no pixel anywhere is taller than the tallest tree.
    assert s.chm.max() <= t.height.max() + 1e-5


def _one_tree_scene(height, sun_elevation=45.0, sun_azimuth=135.0, gsd=0.5):
    layout = SceneLayout(120.0, 120.0, trees=Trees.single(60.25, 60.25, height, crown_radius=3.0,
                                                          conifer=True))
    return make_scene(240, 240, gsd=gsd, seed=1, sun_elevation=sun_elevation,
                      sun_azimuth=sun_azimuth, layout=layout)


def _ground_shadow_geometry(s, gsd=0.5, centre=(60.25, 60.25)):
    """Offsets (m, x east / y north) of shadowed ground pixels from the tree's foot."""
    ground_shadow = s.layers["shadow"] & (s.chm == 0)
    r, c = np.nonzero(ground_shadow)
    dx = (c + 0.5) * gsd - centre[0]
    dy_north = -((r + 0.5) * gsd - centre[1])
    return dx, dy_north


@pytest.mark.parametrize("azimuth", [135.0, 270.0])
def test_shadow_points_away_from_the_sun_and_grows_with_height(azimuth):
    lengths = {}
    for h in (8.0, 16.0):
        s = _one_tree_scene(h, sun_azimuth=azimuth)
        assert s.chm.max() == np.float32(h)
        dx, dy = _ground_shadow_geometry(s)
        assert dx.size > 20
        # Direction of the shadow's centre of mass: the anti-solar azimuth.
        shadow_az = math.degrees(math.atan2(dx.mean(), dy.mean())) % 360
        expected = (azimuth + 180.0) % 360
        assert abs((shadow_az - expected + 180) % 360 - 180) < 5.0
        # Length: the apex at h casts the farthest shadow, at h / tan(45°) = h.
        ux, uy = math.sin(math.radians(expected)), math.cos(math.radians(expected))
        lengths[h] = float((dx * ux + dy * uy).max())
        assert lengths[h] == pytest.approx(h, abs=1.0)
        # Shadowed ground is clearly darker than lit ground.
        lum = s.rgb.astype(float).mean(axis=0)
        ground = s.chm == 0
        assert lum[ground & s.layers["shadow"]].mean() < 0.7 * lum[ground & ~s.layers["shadow"]].mean()
    assert lengths[16.0] > 1.8 * lengths[8.0]


def test_lower_sun_casts_longer_shadows():
    dx45, dy45 = _ground_shadow_geometry(_one_tree_scene(10.0, sun_elevation=45.0))
    dx30, dy30 = _ground_shadow_geometry(_one_tree_scene(10.0, sun_elevation=30.0))
    reach45 = np.hypot(dx45, dy45).max()
    reach30 = np.hypot(dx30, dy30).max()
    assert reach30 == pytest.approx(10.0 / math.tan(math.radians(30)), abs=1.0)
    assert reach30 > 1.5 * reach45


def test_noise_on_grids_and_at_points_agree():
    # Trees are placed with the point version and the ground painted with the grid version of
    # the same position hash: both must give the same field.
    from canopy.synth import _fractal_grid, _fractal_points

    x = np.arange(90) * 0.6 + 0.3
    y = np.arange(70) * 0.6 + 0.3
    xx, yy = np.meshgrid(x, y)
    grid = _fractal_grid(x, y, (30.0, 7.0, 1.3), 99)
    points = _fractal_points(xx, yy, (30.0, 7.0, 1.3), 99)
    assert np.allclose(grid, points, atol=1e-6)
    assert 0.0 <= grid.min() and grid.max() < 1.0 and grid.std() > 0.05


def test_bad_sun_elevation_is_an_input_error():
    with pytest.raises(InputError, match="sun_elevation"):
        make_scene(50, 50, 1.0, 0, sun_elevation=2.0)


def test_footprint_percentiles_match_brute_force():
    rng = np.random.default_rng(0)
    chm = rng.uniform(0, 30, (100, 100)).astype(np.float32)
    x, y = np.array([50.0, 31.3]), np.array([50.0, 70.7])
    got = footprint_percentiles(chm, scene_transform(1.0), x, y, (95, 50))
    cx, cy = np.meshgrid(np.arange(100) + 0.5, np.arange(100) + 0.5)
    for i in range(2):
        inside = (cx - x[i]) ** 2 + (cy - y[i]) ** 2 <= 12.5 ** 2
        assert inside.sum() > 450  # ≈ π·12.5² pixels
        assert got[i, 0] == pytest.approx(np.percentile(chm[inside], 95))
        assert got[i, 1] == pytest.approx(np.percentile(chm[inside], 50))


def test_gedi_rh95_is_chm_percentile_plus_noise(scene):
    cfg = GediConfig(track_spacing_m=40.0, rh_sigma_m=1.5, geolocation_sigma_m=10.0)
    shots = gedi_like_shots(scene.chm, 1.0, seed=2, config=cfg)
    n = shots["x"].size
    assert n >= 30
    # Along-track spacing ~60 m within a track.
    first = shots["beam"] == shots["beam"][0]
    step = np.hypot(np.diff(shots["true_x"][first]), np.diff(shots["true_y"][first]))
    assert np.allclose(step, 60.0)
    # Truth columns are the exact percentile at the true position.
    exact = footprint_percentiles(scene.chm, scene_transform(1.0), shots["true_x"],
                                  shots["true_y"], 95)
    assert np.allclose(shots["true_rh95"], exact)
    # RH noise N(0, 1.5 m): pooled over a few seeds for a sample that can test it.
    noise = np.concatenate([
        (lambda g: g["rh95"] - g["true_rh95"])(gedi_like_shots(scene.chm, 1.0, seed=k, config=cfg))
        for k in range(2, 8)])
    assert abs(noise.mean()) < 4 * 1.5 / math.sqrt(noise.size)
    assert 1.2 < noise.std() < 1.8
    assert np.all(shots["rh98"] >= shots["rh95"])
    # Reported positions are off by the geolocation error (radial RMS ≈ 10 m).
    offset = np.hypot(shots["x"] - shots["true_x"], shots["y"] - shots["true_y"])
    assert 6.0 < math.sqrt((offset ** 2).mean()) < 14.0
    # Footprints lie wholly inside the scene.
    assert shots["true_x"].min() >= 12.5 and shots["true_x"].max() <= 300 - 12.5


def test_synth_scene_writes_georeferenced_valid_files(tmp_path):
    import geopandas as gpd

    from canopy.io.cog import cog_problems

    out = tmp_path / "synth"
    paths = synth_scene(out, area_km2=0.04, gsd=1.0, seed=3, crs="EPSG:32617",
                        origin=(400000.0, 3300000.0))
    assert set(paths) == {"rgb", "chm", "gedi", "readme"}
    assert "SYNTHETIC" in paths["readme"].read_text()
    with rasterio.open(paths["rgb"]) as rgb, rasterio.open(paths["chm"]) as chm:
        for src in (rgb, chm):
            assert src.crs.to_epsg() == 32617
            assert src.bounds.left == 400000.0 and src.bounds.top == 3300000.0
            assert src.res == (1.0, 1.0) and (src.width, src.height) == (200, 200)
            assert src.tags()["CANOPY_SYNTHETIC"] == "true"
            assert cog_problems(src.name) == []
        assert rgb.count == 3 and rgb.dtypes[0] == "uint8"
        assert rgb.descriptions == ("red", "green", "blue")
        assert chm.dtypes[0] == "float32" and chm.descriptions == ("canopy_height",)
        assert chm.read(1).max() > 2.0
    shots = gpd.read_parquet(paths["gedi"])
    assert shots.crs.to_epsg() == 4326 and len(shots) > 0
    assert {"shot_number", "rh95", "rh98", "quality_flag", "lat_lowestmode"} <= set(shots.columns)
    assert (shots["quality_flag"] == 1).all() and shots["shot_number"].is_unique
    # Shots sit over the scene (up to the geolocation error).
    pts = shots.to_crs("EPSG:32617").geometry
    assert pts.x.between(400000 - 60, 400200 + 60).all()
    assert pts.y.between(3300000 - 200 - 60, 3300000 + 60).all()

    with pytest.raises(OutputError, match="not empty"):
        synth_scene(out, area_km2=0.04, gsd=1.0, seed=3)
    synth_scene(out, area_km2=0.04, gsd=1.0, seed=4, overwrite=True)


def test_synth_scene_rejects_bad_parameters(tmp_path):
    with pytest.raises(InputError, match="geographic"):
        synth_scene(tmp_path / "a", area_km2=0.04, gsd=1.0, crs="EPSG:4326")
    with pytest.raises(InputError, match="area_km2"):
        synth_scene(tmp_path / "b", area_km2=-1, gsd=1.0)
    with pytest.raises(InputError, match="crs"):
        synth_scene(tmp_path / "c", area_km2=0.04, gsd=1.0, crs="EPSG:not-a-code")


def test_synth_cli_command(tmp_path):
    import typer
    from typer.testing import CliRunner

    from canopy.synth_cli import register

    app = typer.Typer()
    register(app)
    app.command("version")(lambda: None)  # a second command keeps 'synth' a subcommand
    res = CliRunner().invoke(app, ["synth", "--area-km2", "0.01", "--gsd", "1", "--seed", "2",
                                   "--sun-elevation", "40", "--sun-azimuth", "200",
                                   "--origin", "500000", "4000000", "-o", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "s" / "scene_rgb.tif").exists()
    with rasterio.open(tmp_path / "s" / "scene_chm.tif") as src:
        assert src.tags()["CANOPY_SUN_AZIMUTH"] == "200"


def test_a_scene_too_big_for_the_machine_is_refused_at_once(tmp_path):
    """Issue #13: `canopy synth --area-km2 100000` ran silently for 10 minutes towards ~830 GB.
    Now the size is estimated first and what does not fit is refused (nothing written), and a
    scene that does fit reports its rendering progress."""
    import time

    from canopy.errors import OptionError, OutputError
    from canopy.synth import synth_scene

    t0 = time.perf_counter()
    with pytest.raises((OptionError, OutputError), match="needs about"):
        synth_scene(tmp_path / "huge", area_km2=100_000, gsd=0.6)
    assert time.perf_counter() - t0 < 5 and not (tmp_path / "huge").exists()
    events = []
    synth_scene(tmp_path / "small", area_km2=0.01, gsd=1.0, block_size=32, progress=events.append)
    blocks = [e for e in events if e.unit == "blocks"]
    assert blocks[-1].done == blocks[-1].total == 16 and blocks[0].done == 0
