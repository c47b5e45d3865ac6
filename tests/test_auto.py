"""``auto`` device and precision (canopy.model.auto): resolved as documented on each kind of
machine (probes mocked where the machine is not this one), cached, recorded in outputs."""

from __future__ import annotations

import json

import numpy as np
import rasterio
import torch

from canopy.model import auto
from canopy.model.checkpoints import load_model
from canopy.predict.options import PredictOptions


def fake_timer(seconds: dict):
    calls = []

    def timer(model, precision, batch_size=8):
        calls.append(precision)
        return seconds[precision]

    return timer, calls


def test_cpu_auto_takes_the_fastest_probe_and_caches_it(micro_model, monkeypatch, tmp_path):
    monkeypatch.setenv("CANOPY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(auto, "cpu_candidates", lambda: ("fp32", "bf16", "int8"))
    timer, calls = fake_timer({"fp32": 1.0, "bf16": 0.4, "int8": 0.6})
    choice = auto.choose_precision(micro_model, "auto", timer=timer)
    assert choice.precision == "bf16" and sorted(calls) == ["bf16", "fp32", "int8"]
    assert "precision auto → bf16" in choice.reason and "measured now" in choice.reason
    # the second time nothing is timed: the probe is cached per architecture and machine
    again = auto.choose_precision(micro_model, "auto", timer=fake_timer({})[0])
    assert again.precision == "bf16" and "measured earlier" in again.reason
    # a model of another architecture is probed on its own (ViT-L and ViT-Ti differ: int8
    # wins for one and loses for the other on the same CPU)
    other = load_model("hrch_v1_large_random")
    timer, calls = fake_timer({"fp32": 2.0, "bf16": 1.0, "int8": 0.7})
    assert auto.choose_precision(other, "auto", timer=timer).precision == "int8" and calls
    # an explicit precision is kept as asked, without a probe
    assert auto.choose_precision(micro_model, "fp32", timer=fake_timer({})[0]).precision == "fp32"


def test_int8_is_no_candidate_without_the_int8_ops(micro_model, monkeypatch, tmp_path):
    from canopy.model import int8

    monkeypatch.setenv("CANOPY_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(int8, "available", lambda: False)
    assert auto.cpu_candidates() == ("fp32", "bf16")
    timer, calls = fake_timer({"fp32": 1.0, "bf16": 2.0, "int8": 0.1})
    assert auto.choose_precision(micro_model, "auto", timer=timer).precision == "fp32"
    assert "int8" not in calls


def test_gpu_auto_is_bf16_where_the_card_has_it(monkeypatch):
    class FakeModel:
        device = torch.device("cuda")

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "H200")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert auto.choose_precision(FakeModel(), "auto").precision == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert auto.choose_precision(FakeModel(), "auto").precision == "fp32"


def test_device_auto_is_a_gpu_when_there_is_one(monkeypatch):
    from canopy.model.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_the_real_probe_times_every_candidate(micro_model):
    for precision in auto.cpu_candidates():
        assert 0 < auto.probe_seconds_per_tile(micro_model, precision, batch_size=2) < 5
    assert not micro_model.is_int8  # int8 is timed on a copy


def test_predict_raster_records_the_choice_and_leaves_the_model_alone(tmp_path, rgb_array,
                                                                      monkeypatch):
    """With the defaults the output's tags name the precision auto chose, the choice is
    reported once, and a caller's model is not quantised in place when int8 wins."""
    from canopy.predict.raster import predict_raster
    from tests.conftest import write_raster

    monkeypatch.setenv("CANOPY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(auto, "cpu_candidates", lambda: ("fp32", "bf16", "int8"))
    monkeypatch.setattr(auto, "probe_seconds_per_tile",
                        lambda m, p, b=8: {"fp32": 1.0, "bf16": 0.9, "int8": 0.5}[p])
    model = load_model("micro")
    src = write_raster(tmp_path / "in.tif", rgb_array(300, 300))
    events = []
    out = predict_raster(src, tmp_path / "out.tif", model, PredictOptions(),
                         progress=events.append)
    with rasterio.open(out) as ds:
        assert ds.tags()["CANOPY_PRECISION"] == "int8"
        h = ds.read(1)
    assert [e.message for e in events if e.message][0].startswith("precision auto → int8")
    assert not model.is_int8
    ref = predict_raster(src, tmp_path / "int8.tif", load_model("micro"),
                         PredictOptions(precision="int8"))
    with rasterio.open(ref) as ds:
        np.testing.assert_array_equal(ds.read(1), h)


def test_a_state_run_records_what_auto_chose_and_keeps_it_on_resume(tmp_path, monkeypatch):
    from distributed import Client, LocalCluster

    from canopy.predict.engine import predict_aoi
    from tests.conftest import shared

    monkeypatch.setenv("CANOPY_CACHE_DIR", str(tmp_path / "cache"))
    src = shared("rgb_chm_pairs", "neon_osbs_029", "OSBS_029.tif")
    aoi = "-81.9900,29.6924,-81.9897,29.69265"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=40) as cluster, Client(cluster) as client:
        events = []
        predict_aoi(aoi, src, tmp_path / "run", "micro", PredictOptions(),
                    cell_px=64, client=client, progress=events.append)
        run = json.loads((tmp_path / "run" / "run.json").read_text())
        assert run["asked"] == {"device": "auto", "precision": "auto", "batch_size": None}
        assert run["batch_size"] == auto.CPU_BATCH
        assert run["precision"] in auto.CPU_CANDIDATES and run["device"] == "cpu"
        assert any((e.message or "").startswith("precision auto →") for e in events)
        # the same command again is the same run, whatever a new probe would say
        (tmp_path / "cache").rename(tmp_path / "old_cache")
        events = []
        again = predict_aoi(aoi, src, tmp_path / "run", "micro", PredictOptions(),
                            cell_px=64, client=client, progress=events.append)
        assert again.cells_skipped == again.cells_total - again.cells_empty
        assert any("as this run started" in (e.message or "") for e in events)
    with rasterio.open(next((tmp_path / "run" / "cells").glob("*.tif"))) as ds:
        assert ds.tags()["CANOPY_PRECISION"] == run["precision"]


def test_the_batch_size_follows_the_device_unless_given():
    """A GPU is given 64 tiles per forward pass (8 left an H200 mostly idle), a CPU 8."""
    assert auto.batch_size_for("cpu", None) == auto.CPU_BATCH == 8
    assert auto.batch_size_for(torch.device("cuda", 1), None) == auto.GPU_BATCH == 64
    assert auto.batch_size_for("cuda", 16) == 16 and auto.batch_size_for("cpu", 3) == 3
