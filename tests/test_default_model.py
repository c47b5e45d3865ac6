"""The bundled default model (issue #4 item 7): it ships, it is small, its card tells the truth,
and its held-out numbers can be reproduced from the real data in ../shared/data."""

from __future__ import annotations

import json
import math

import pytest

from canopy.model.checkpoints import DEFAULT_MODEL_DIR, load_model
from tests.conftest import SHARED_DATA


@pytest.fixture(scope="module")
def evaluation() -> dict:
    return json.loads((DEFAULT_MODEL_DIR / "evaluation.json").read_text())


def test_default_model_ships_small_with_a_card(evaluation):
    weights = DEFAULT_MODEL_DIR / "model.safetensors"
    assert weights.exists(), f"the bundled default model is missing: {weights}"
    assert weights.stat().st_size <= 50e6
    model = load_model("default")
    assert model.cfg.trained and model.cfg.name == "canopy_default"
    card = (DEFAULT_MODEL_DIR / "MODEL_CARD.md").read_text()
    # the card quotes the numbers of evaluation.json, not others
    for name in ("model", "mean_height", "gbm"):
        assert f"{evaluation['results']['pooled'][name]['mae']:.2f}" in card
    assert "python -m canopy.train.default_model" in card and "SYNTHETIC" in card


def test_held_out_numbers_reproduce_and_beat_the_mean_height(tmp_path, evaluation):
    """Predict every real scene with the shipped model and score it on the held-out part of its
    CHM, as the card does: the same MAE comes out, and it is below the training-set mean height
    predicted everywhere (measured in the same run that trained the model)."""
    if not (SHARED_DATA / "rgb_chm_pairs").exists():
        pytest.skip("real data not available")
    from canopy.evaluate import evaluate
    from canopy.predict.options import PredictOptions
    from canopy.predict.raster import predict_raster
    from canopy.train.default_model import held_out_reference, real_pairs, holdout_split_x

    recipe = evaluation["recipe"]
    assert recipe["holdout"] == "block"
    model = load_model("default")
    total_abs, total_n = 0.0, 0
    for image, chm, chm_crs in real_pairs(tmp_path):
        split_x = holdout_split_x(image, recipe["holdout_share"])
        site = image.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        ref = held_out_reference(chm, chm_crs, split_x, tmp_path / f"{site}_ref.tif")
        pred = predict_raster(image, tmp_path / f"{site}.tif", model, PredictOptions())
        o = evaluate(pred, [ref], tmp_path / f"eval_{site}")["pooled"]["overall"]
        expect = evaluation["results"]["sites"][site]["model"]
        assert o["n"] == expect["n"]
        assert o["mae"] == pytest.approx(expect["mae"], abs=0.05)
        total_abs += o["mae"] * o["n"]
        total_n += o["n"]
    mae = total_abs / total_n
    pooled = evaluation["results"]["pooled"]
    assert mae == pytest.approx(pooled["model"]["mae"], abs=0.05)
    assert mae < pooled["mean_height"]["mae"]
    assert math.isfinite(pooled["gbm"]["mae"])
