"""The bundled default model v2 (issue #16): it ships small with its OOD reference, its card
quotes its own evaluation, no fold trained on the site it was judged on, the Kootenay numbers
come back from the shipped weights, and its out-of-distribution score tells water from its own
training plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio

from canopy.model.checkpoints import DEFAULT_MODEL_DIR, load_model
from tests.conftest import shared


@pytest.fixture(scope="module")
def evaluation() -> dict:
    return json.loads((DEFAULT_MODEL_DIR / "evaluation.json").read_text())


def test_default_model_ships_small_with_its_reference_and_a_true_card(evaluation):
    files = {p.name: p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir()}
    assert "model.safetensors" in files and "ood.safetensors" in files
    assert sum(files.values()) <= 50e6
    model = load_model("default")
    assert model.cfg.trained and model.cfg.name == "canopy_default" and model.ood is not None
    card = (DEFAULT_MODEL_DIR / "MODEL_CARD.md").read_text()
    chosen = evaluation["leave_one_site_out"][evaluation["variant"]]
    for name in ("model", "own_mean", "train_mean", "gbm"):  # the card quotes these numbers
        assert f"{chosen['pooled'][name]['mae']:.2f}" in card
        assert f"{evaluation['kootenay']['scores'][name]['mae']:.2f}" in card
    for site, scores in chosen["folds"].items():
        assert f"| {site} | **this recipe** | {scores['model']['mae']:.2f} |" in card
    assert f"{chosen['ood']['auroc_large_error']:.2f}" in card
    assert "python -m canopy.train.default_model" in card and "CC0" in card
    # the shipped record names files, not paths on the machine that trained it
    record = (DEFAULT_MODEL_DIR / "evaluation.json").read_text()
    assert "/tmp/" not in record and "/tmp/" not in card
    assert evaluation["recipe"]["backbone"] == "dinov2_vit_tiny_overhead_no_osbs.safetensors"
    from canopy.train.default_model import Recipe

    trained = Recipe(backbone="/scratch/run/pretrain/run/backbone.safetensors")
    assert trained.recorded()["backbone"] == "backbone.safetensors"
    assert Recipe(**trained.recorded()).key() == trained.key()  # the card is remade from it


def test_no_fold_trained_on_the_site_it_was_judged_on(evaluation):
    """Each leave-one-site-out row was made by a model that saw none of that site's plots
    (plot names carry their NEON site code), and the shipped model never saw Kootenay (GPL)."""
    for variant in evaluation["leave_one_site_out"].values():
        for site, fold in variant["trained_on"].items():
            assert fold and not any(site in plot for plot in fold), (site, fold)
            assert not any("kootenay" in plot.lower() for plot in fold)
    assert not any("kootenay" in p.lower() for p in evaluation["trained_on"])
    assert {"TEAK", "OSBS", "BART"} <= {p.split("_")[0] for p in evaluation["trained_on"]}


def test_kootenay_numbers_come_back_from_the_shipped_weights(tmp_path, evaluation):
    """Kootenay (never trained on) predicted with the shipped weights and scored with
    `canopy evaluate` against its CHM: the card's pixel count and MAE/bias come out, and the
    OOD share tag matches the card."""
    from canopy.evaluate import evaluate
    from canopy.io.outputs import OOD_UNLIKE_SHARE
    from canopy.predict.options import PredictOptions
    from canopy.predict.raster import predict_raster

    image = shared("rgb_chm_pairs", "kootenay_bc_drone", "kootenayOrtho_from_rda.tif")
    chm = shared("rgb_chm_pairs", "kootenay_bc_drone", "kootenayCHM.tif")
    pred = predict_raster(image, tmp_path / "k.tif", load_model("default"),
                          PredictOptions(precision="fp32", device="cpu"))
    o = evaluate(pred, [chm], tmp_path / "eval")["pooled"]["overall"]
    card = evaluation["kootenay"]["scores"]["model"]
    assert o["n"] == card["n"]
    assert o["mae"] == pytest.approx(card["mae"], abs=0.02)
    assert o["bias"] == pytest.approx(card["bias"], abs=0.02)
    with rasterio.open(pred) as ds:
        share = float(ds.tags()[OOD_UNLIKE_SHARE])
    assert share == pytest.approx(evaluation["kootenay"]["ood"]["unlike_share"], abs=0.02)


def test_the_score_calls_a_lake_unlike_and_a_training_plot_alike(tmp_path):
    """Trained weights, real imagery: the Lake Zürich image (mostly water, never seen) has most
    of its pixels scored unlike the training data; NEON TEAK_049, a plot the model trained on,
    has none."""
    from canopy.io.outputs import OOD_UNLIKE as UNLIKE
    from canopy.model.ood import score_map
    from data_catalog.raster import read_rgb_on_grid

    model = load_model("default")
    lake = read_rgb_on_grid(shared("overhead_rgb", "swissimage_lake_zurich_ref-img.tif"),
                            model.cfg.gsd)
    plot = read_rgb_on_grid(shared("rgb_chm_pairs", "neon_teak", "neon_TEAK_049.tif"),
                            model.cfg.gsd)
    s_lake = score_map(model, lake.rgb, lake.valid)
    s_plot = score_map(model, plot.rgb, plot.valid)
    assert np.mean(s_lake[np.isfinite(s_lake)] > UNLIKE) > 0.5
    assert np.mean(s_plot[np.isfinite(s_plot)] > UNLIKE) == 0.0
