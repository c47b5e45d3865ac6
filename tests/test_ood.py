"""The out-of-distribution score (canopy.model.ood): its definition, that a map's score band
and share tag do not depend on how the raster is cut into windows, and how a user sees it
(tag, one-line warning, a clear refusal where it is not available). Plumbing is tested with
random weights; what the shipped model's score says about real imagery is in
tests/test_default_model.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import rasterio
import torch

from canopy.errors import OptionError
from canopy.evaluate.metrics import Separation, auroc
from canopy.io import outputs
from canopy.model import ood
from canopy.predict.options import PredictOptions
from canopy.predict.raster import OOD_WARN_SHARE, ood_message, predict_raster
from data_catalog.raster import read_rgb_on_grid
from tests.conftest import shared

TILE = 64


def teak(name: str):
    return shared("rgb_chm_pairs", "neon_teak", f"neon_TEAK_{name}.tif")


@pytest.fixture(scope="module")
def model_with_reference(micro_model):
    """The micro model (random weights) with a reference of three TEAK plots at its GSD."""
    model = copy.deepcopy(micro_model)
    images = []
    for name in ("043", "044", "045"):
        g = read_rgb_on_grid(teak(name), model.cfg.gsd)
        images.append((g.rgb, g.valid, name))
    model.ood = ood.build_reference(model, images, k=2, tile=TILE)
    return model, images


def test_scale_is_the_95th_percentile_of_distances_to_other_images(model_with_reference):
    """The scale is the 95th percentile of each training tile's distance to the *other* images'
    tiles (computed here independently), and a tile's distance to itself is zero: scored against the whole
    reference (itself included, k=1) every training tile is at 0."""
    model, images = model_with_reference
    ref = model.ood
    embs, owners = [], []
    for rgb, valid, name in images:
        e, _ = ood.tile_embeddings(model, rgb, valid, TILE)
        embs.append(e)
        owners += [name] * len(e)
    emb = torch.cat(embs)
    assert torch.allclose(emb, ref.embeddings, atol=1e-6)
    owners = np.array(owners)
    d = (1 - emb @ emb.T).numpy()
    d[owners[:, None] == owners[None, :]] = np.inf
    nearest = np.sort(d, 1)[:, :2].mean(1)  # k = 2 as built
    assert ref.scale == pytest.approx(float(np.percentile(nearest, 95)), rel=1e-5)
    assert np.mean(nearest / ref.scale > 1.0) <= 0.1  # most training tiles score ≤ 1
    self_scores = ood.OodReference(ref.embeddings, 1, ref.scale, TILE).score(emb)
    assert float(self_scores.abs().max()) < 1e-3  # fp32 rounding of 1 − cos, ÷ a small scale


def test_reference_round_trips_through_the_model_folder(model_with_reference, tmp_path):
    from canopy.model.checkpoints import load_model, save_native

    model, images = model_with_reference
    save_native(model, tmp_path / "m")
    assert (tmp_path / "m" / ood.FILE_NAME).exists()
    again = load_model(tmp_path / "m")
    rgb, valid, _ = images[0]
    a = ood.score_map(model, rgb, valid)
    b = ood.score_map(again, rgb, valid)
    np.testing.assert_allclose(a, b, atol=2e-3, equal_nan=True)  # stored as float16


def test_score_band_and_share_tag_do_not_depend_on_windows(model_with_reference, tmp_path):
    """A 400×400 px TEAK plot predicted whole and in 96-px windows (OOD tiles of 64 px cross
    window edges): the same score band, and a tag equal to the band's share above 1. A corner
    without imagery has neither heights nor scores."""
    model, _ = model_with_reference
    src = tmp_path / "holed.tif"
    with rasterio.open(teak("047")) as s:
        data, profile = s.read(), s.profile
    data[:, :120, :160] = 0
    with rasterio.open(src, "w", **{**profile, "nodata": 0}) as d:
        d.write(data)
    opts = PredictOptions(precision="fp32", device="cpu", ood_band=True)
    whole = predict_raster(src, tmp_path / "whole.tif", model, opts)
    cut = predict_raster(src, tmp_path / "cut.tif", model, opts, window_px=40)
    with rasterio.open(whole) as a, rasterio.open(cut) as b:
        assert a.descriptions[-1] == outputs.OOD_BAND and a.count == 2
        assert a.units[0] == "m" and not a.units[1]  # a score, not metres
        sa, sb = a.read(2), b.read(2)
        np.testing.assert_array_equal(sa, sb)
        ok = np.isfinite(sa)
        assert 0.8 < ok.mean() < 0.95
        # scored where the map has a height, nodata where it has none (as a state run's band)
        np.testing.assert_array_equal(ok, np.isfinite(a.read(1)))
        share = float((sa[ok] > outputs.OOD_UNLIKE).mean())
        assert float(a.tags()[outputs.OOD_UNLIKE_SHARE]) == pytest.approx(share, abs=1e-4)
        assert a.tags()[outputs.OOD_UNLIKE_SHARE] == b.tags()[outputs.OOD_UNLIKE_SHARE]
        # one score per OOD tile: no more distinct values than tiles
        n_tiles = len(ood.tile_starts(sa.shape[0], TILE)) * len(ood.tile_starts(sa.shape[1], TILE))
        assert 1 < len(np.unique(sa[ok])) <= n_tiles


def test_a_map_unlike_the_training_data_warns_in_one_line(model_with_reference, tmp_path):
    """A reference scaled so every tile scores above 1: the tag says 1.0 and the progress
    callback gets one warning line; the band is only written when asked."""
    model, _ = model_with_reference
    strict = copy.deepcopy(model)
    strict.ood = ood.OodReference(model.ood.embeddings, model.ood.k, 1e-9, TILE)
    events = []
    out = predict_raster(teak("047"), tmp_path / "w.tif", strict,
                         PredictOptions(precision="fp32", device="cpu"), progress=events.append)
    with rasterio.open(out) as ds:
        assert ds.count == 1 and float(ds.tags()[outputs.OOD_UNLIKE_SHARE]) == 1.0
    warnings = [e.message for e in events if e.message and "unlike" in e.message]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "100%" in warnings[0]
    assert ood_message(OOD_WARN_SHARE / 2) is None


def test_ood_band_needs_a_model_with_a_reference_and_float_output(micro_model,
                                                                   model_with_reference, tmp_path):
    with pytest.raises(OptionError, match="ood_band"):
        predict_raster(teak("047"), tmp_path / "x.tif", micro_model,
                       PredictOptions(precision="fp32", device="cpu", ood_band=True))
    with pytest.raises(OptionError, match="float32"):  # whole-metre bytes would round it to 0/1
        predict_raster(teak("047"), tmp_path / "x.tif", model_with_reference[0],
                       PredictOptions(precision="fp32", device="cpu", ood_band=True,
                                      dtype="uint8"))
    assert not (tmp_path / "x.tif").exists()


def test_cli_refuses_ood_band_with_aoi_for_a_model_without_a_reference(tmp_path, capsys):
    from tests.test_predict import run_cli

    code, _, err = run_cli("predict", "--aoi", "0,0,1,1", "--imagery", tmp_path, "--ood-band",
                           "--checkpoint", "micro", "-o", tmp_path / "run", capsys=capsys)
    assert code == 2 and "--ood-band" in err and "no out-of-distribution reference" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_auroc_matches_its_definition():
    """Ties count half; perfect separation 1, reversed 0, None with one class."""
    rng = np.random.default_rng(0)
    s = rng.normal(size=300)
    y = rng.random(300) < 0.3
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
    assert auroc(s, y) == pytest.approx(np.mean(pairs))
    assert auroc([1, 2, 3], [False, True, True]) == 1.0
    assert auroc([3, 2, 1], [False, True, True]) == 0.0
    assert auroc([1, 1], [True, True]) is None


def test_separation_histograms_give_the_exact_auroc_and_shares():
    """The bounded-memory sums `canopy evaluate` keeps agree with the exact AUROC (scores on a
    0.005 grid, so no two classes share a bin without tying) and with direct shares/means."""
    rng = np.random.default_rng(1)
    scores = np.round(rng.gamma(2.0, 0.5, 5000) / 0.005) * 0.005 + 0.0025
    err = np.abs(rng.normal(0, 3, 5000)) + 4 * (scores > 1.2)
    sep = Separation(5.0)
    sep.add(scores[:2000], err[:2000])
    sep.add(scores[2000:], err[2000:])
    r = sep.result()
    large, flagged = err > 5.0, scores > 1.0
    assert r["auroc_large_error"] == pytest.approx(auroc(scores, large), abs=1e-9)
    assert r["flagged_share"] == pytest.approx(flagged.mean())
    assert r["mae_flagged"] == pytest.approx(err[flagged].mean())
    assert r["mae_not_flagged"] == pytest.approx(err[~flagged].mean())
    assert r["large_error_share"] == pytest.approx(large.mean()) and r["n"] == 5000


def test_evaluate_reports_how_the_score_separates_large_errors(model_with_reference, tmp_path,
                                                              capsys):
    """`canopy evaluate` on a map with the score band: the separation sums over the pixels it
    scored (same count as the height metrics), computed here from the two bands directly."""
    from canopy.evaluate.report import align_reference
    from canopy.train.sites import derive_chm, shippable_pairs
    from tests.test_predict import run_cli

    model, _ = model_with_reference
    pair = next(p for p in shippable_pairs() if p.name == "TEAK_047")
    chm = derive_chm(pair, tmp_path, 1.0)
    pred = predict_raster(pair.imagery, tmp_path / "p.tif", model,
                          PredictOptions(precision="fp32", device="cpu", ood_band=True))
    code, out, _ = run_cli("evaluate", pred, chm, "--reference-crs", "EPSG:32611", "-o",
                           tmp_path / "ev", capsys=capsys)
    assert code == 0 and "out-of-distribution score: AUROC" in out
    import json

    result = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    with rasterio.open(pred) as src:
        pair_ = align_reference(src, str(pred), chm, "EPSG:32611")
        from canopy.evaluate.report import _band_on_pair

        scores = _band_on_pair(src, 2, pair_)
    err = np.abs(pair_.pred - pair_.ref)
    ok = np.isfinite(err) & np.isfinite(scores)
    assert result["ood"]["n"] == int(ok.sum()) == result["pooled"]["overall"]["n"]
    assert result["ood"]["flagged_share"] == pytest.approx(float((scores[ok] > 1).mean()))
