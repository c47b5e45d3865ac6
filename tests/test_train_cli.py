"""``canopy train`` end to end (on a fresh Typer app), bad inputs, and ``--backbone`` files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import torch
import typer
from affine import Affine
from shapely.geometry import Point
from typer.testing import CliRunner

from canopy.errors import USER_ERRORS, CheckpointError
from tests.conftest import shared, write_raster

SMALL = ["--arch", "vit_micro", "--n-bins", "64", "--gsd", "0.5", "--chip-size", "64",
         "--threads", "1", "--quiet"]


def run_cli(args: list[str]):
    """Run ``train`` as the main CLI does: a user error is one line on stderr and exit code 2."""
    from canopy.train.cli import register

    app = typer.Typer()
    register(app)
    app.command("version")(lambda: None)  # a second command keeps 'train' a subcommand
    result = CliRunner().invoke(app, ["train", *args])
    if isinstance(result.exception, USER_ERRORS):
        from canopy.console import flag_for
        from canopy.errors import OptionError

        exc = result.exception  # shown as the main CLI shows it: options by their flags
        message = exc.render(flag_for) if isinstance(exc, OptionError) else str(exc)
        if getattr(exc, "remedy", None):
            message += f" (use {flag_for(exc.remedy)} to go on with it)"
        return 2, f"error: {message}", message
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output, None


def assert_one_line_error(args, *fragments):
    code, text, message = run_cli(args)
    assert code == 2, text
    assert "\n" not in message
    for f in fragments:
        assert f in message, message
    out = Path(args[args.index("-o") + 1]) if "-o" in args else None
    if out is not None and out.name == "o":
        assert not out.exists()  # a bad input leaves no run folder behind
    return message


# runs that keep the random micro backbone frozen say so; that is expected here
pytestmark = pytest.mark.filterwarnings("ignore:the vit_micro backbone has random weights")

@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A small synthetic scene on disk (RGB + exact CHM + GEDI-like shots), 0.5 m."""
    from canopy.synth import synth_scene

    out = tmp_path_factory.mktemp("scene")
    return synth_scene(out / "s", area_km2=0.0144, gsd=0.5, seed=2)


def make_catalog(path, imagery=(), chms=()):
    from data_catalog.catalog import Catalog

    cat = Catalog.open(path)
    if imagery:
        cat.add("imagery", [str(p) for p in imagery])
    if chms:
        cat.add("chm", [str(p) for p in chms])
    cat.save()
    return path


def test_train_from_a_catalog_with_gedi_end_to_end(tmp_path, scene):
    cat = make_catalog(tmp_path / "cat.parquet", [scene["rgb"]], [scene["chm"]])
    out = tmp_path / "run"
    code, text, _ = run_cli(["--catalog", str(cat), "-o", str(out), "--steps", "4",
                             "--batch-size", "4", "--split-fractions", "1,1,0",
                             "--block-size", "32", "--gedi", str(scene["gedi"]),
                             "--gedi-weight", "0.1", *SMALL])
    assert code == 0, text
    assert "trained 4 steps" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["catalog"]["gedi_shots"] > 0
    assert summary["data"]["catalog"]["train_chips"] > 0
    log = (out / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,epoch,kind") and any(",val," in r for r in log)
    # --gedi-weight reached the loss: every training row logs a GEDI term (guards against the
    # option dropped on its way to LossConfig, or the GEDI loss switched off in the loop)
    rows = [r for r in csv.DictReader(open(out / "log.csv")) if r["kind"] == "train"]
    assert rows and all(np.isfinite(float(r["gedi"])) and float(r["gedi"]) > 0 for r in rows)
    assert (out / "model" / "model.safetensors").exists()
    assert "canopy train" in (out / "model" / "MODEL_CARD.md").read_text()
    # the CHM is at the model's grid here: labels are compared pixel for pixel; a rerun into the
    # same folder without --resume is refused, with --resume it finds the run complete
    assert_one_line_error(["--catalog", str(cat), "-o", str(out), "--steps", "4", *SMALL],
                          "not empty", "--resume")


def test_catalog_without_chm(tmp_path, scene):
    cat = make_catalog(tmp_path / "cat.parquet", [scene["rgb"]])
    assert_one_line_error(["--catalog", str(cat), "-o", str(tmp_path / "o"), "--steps", "1", *SMALL],
                          "no CHM", str(cat))


def test_imagery_and_chm_that_do_not_overlap(tmp_path, scene):
    chm = write_raster(tmp_path / "far_chm.tif", np.ones((64, 64), np.float32),
                       transform=Affine(0.5, 0, 600000.0, 0, -0.5, 4100000.0))
    message = assert_one_line_error(
        ["--pairs", f"{scene['rgb']}:{chm}", "-o", str(tmp_path / "o"), "--steps", "1", *SMALL],
        "do not overlap")
    assert "far_chm.tif" in message


def test_chm_all_nodata(tmp_path, scene):
    import rasterio

    with rasterio.open(scene["chm"]) as src:
        transform, shape = src.transform, src.shape
    chm = write_raster(tmp_path / "empty_chm.tif", np.full(shape, -9999.0, np.float32),
                       transform=transform, nodata=-9999.0)
    assert_one_line_error(["--pairs", f"{scene['rgb']}:{chm}", "-o", str(tmp_path / "o"),
                           "--steps", "1", "--split-fractions", "1,0,0", *SMALL],
                          "no valid heights", "empty_chm.tif")


def test_gedi_shots_outside_the_area(tmp_path, scene):
    far = gpd.GeoDataFrame({"rh95": [12.0, 20.0], "rh98": [13.0, 21.0]},
                           geometry=[Point(10.0, 50.0), Point(10.001, 50.0)], crs="EPSG:4326")
    shots = tmp_path / "far_shots.parquet"
    far.to_parquet(shots)
    assert_one_line_error(["--pairs", f"{scene['rgb']}:{scene['chm']}", "-o", str(tmp_path / "o"),
                           "--steps", "1", "--split-fractions", "1,0,0", "--gedi", str(shots),
                           "--gedi-weight", "1", *SMALL],
                          "none of the GEDI shots", "far_shots.parquet")


@pytest.mark.parametrize("args, fragment", [
    (["--pairs", "just_one_file.tif"], "IMAGE.tif:CHM.tif"),
    (["--pairs", "missing.tif:missing_chm.tif"], "not found"),
    ([], "no training data"),
    (["--synthetic", "1", "--cosub"], "--finetune-blocks"),
    (["--synthetic", "1", "--precision", "fp16"], "--precision"),
    (["--synthetic", "1", "--split-fractions", "1,2"], "--split-fractions"),
    (["--synthetic", "1", "--backbone", "nowhere.safetensors"], "--backbone 'nowhere.safetensors': file not found"),
    (["--synthetic", "1", "--lr", "-1"], "--lr must be a positive number"),
    (["--synthetic", "1", "--batch-size", "0"], "--batch-size must be a whole number ≥ 1"),
    (["--synthetic", "1", "--steps", "0"], "--steps must be a whole number ≥ 1"),
])
def test_bad_options(tmp_path, args, fragment):
    steps = [] if "--steps" in args else ["--steps", "1"]
    assert_one_line_error([*args, "-o", str(tmp_path / "o"), *steps, *SMALL], fragment)


def test_rgb_given_as_the_chm_is_named(tmp_path):
    """Issue #13: an RGB image given as the CHM used to end with "every chip fell in the
    validation/test blocks"; it is now refused as what it is."""
    rgb = shared("rgb_chm_pairs", "kootenay_bc_drone", "kootenayOrtho_from_rda.tif")
    assert_one_line_error(["--pairs", f"{rgb}:{rgb}", "-o", str(tmp_path / "o"), "--steps", "1",
                           *SMALL], "RGB imagery, not a canopy height model")


def test_real_pair_with_a_chm_from_laz(tmp_path):
    """NEON BART_041: the CHM is rasterised from the LAZ at 1 m, coarser than the 0.5 m model,
    so labels stay at 1 m (the prediction is averaged onto them)."""
    from canopy.train.datasets import DataSpec, build_data

    img = shared("rgb_chm_pairs", "neon_bart_041", "BART_041.tif")
    laz = shared("rgb_chm_pairs", "neon_bart_041", "BART_041.laz")
    spec = DataSpec(pairs=(f"{img}:{laz}",), gsd=0.5, chip_size=64, stride=16,
                    split_fractions=(1, 0, 0), work_dir=str(tmp_path))
    train, val, summary = build_data(spec)
    assert train and not val
    assert all(r.target.shape == (32, 32) for r in train)  # 64 px × 0.5 m / 1 m cells
    labelled = np.concatenate([r.target[np.isfinite(r.target)] for r in train])
    assert 15 < labelled.max() < 35  # tall closed broadleaf canopy
    assert (tmp_path / "derived_chm" / "BART_041_chm_1m.tif").exists()


# ---------------------------------------------------------------------------- --backbone


def _vit_tensors(dim=64, depth=2, patch=14, grid=37, mlp=4, prefix="", dinov2_chunks=False):
    """Random tensors shaped like a DINOv2 / timm ViT state dict."""
    sd = {f"{prefix}cls_token": torch.randn(1, 1, dim),
          f"{prefix}pos_embed": torch.randn(1, 1 + grid * grid, dim),
          f"{prefix}patch_embed.proj.weight": torch.randn(dim, 3, patch, patch),
          f"{prefix}patch_embed.proj.bias": torch.randn(dim),
          f"{prefix}norm.weight": torch.ones(dim), f"{prefix}norm.bias": torch.zeros(dim)}
    for i in range(depth):
        b = f"{prefix}blocks.0.{i}." if dinov2_chunks else f"{prefix}blocks.{i}."
        for name, shape in {"norm1.weight": (dim,), "norm1.bias": (dim,),
                            "attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,),
                            "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
                            "ls1.gamma": (dim,), "norm2.weight": (dim,), "norm2.bias": (dim,),
                            "mlp.fc1.weight": (mlp * dim, dim), "mlp.fc1.bias": (mlp * dim,),
                            "mlp.fc2.weight": (dim, mlp * dim), "mlp.fc2.bias": (dim,),
                            "ls2.gamma": (dim,)}.items():
            sd[b + name] = torch.randn(*shape)
    return sd


def test_dinov2_official_layout_patch14(tmp_path):
    from ssl_backbone.checkpoints import load_backbone

    sd = _vit_tensors(patch=14, grid=37, dinov2_chunks=True)
    sd["mask_token"] = torch.zeros(1, 64)
    path = tmp_path / "dinov2_vits14_like.pth"
    torch.save(sd, path)
    vit, cfg = load_backbone(path)
    assert (cfg.patch_size, cfg.pos_grid, cfg.embed_dim, cfg.depth, cfg.num_heads) == (14, 37, 64, 2, 1)
    assert torch.equal(vit.blocks[1].mlp.fc1.weight, sd["blocks.0.1.mlp.fc1.weight"])
    taps = vit.forward_taps(torch.randn(1, 3, 70, 70))  # 5×5 tokens of 14 px
    assert taps[-1][0].shape == (1, 64, 5, 5)


def test_timm_and_canopy_layouts(tmp_path):
    from safetensors.torch import save_file

    from ssl_backbone.checkpoints import load_backbone

    timm_sd = _vit_tensors(patch=16, grid=14)
    timm_sd["head.weight"] = torch.randn(10, 64)  # a classifier: dropped
    save_file(timm_sd, str(tmp_path / "timm.safetensors"))
    vit, cfg = load_backbone(tmp_path / "timm.safetensors")
    assert cfg.patch_size == 16 and torch.equal(vit.mask_token, torch.zeros(1, 64))
    ours = {**_vit_tensors(prefix="backbone."), "backbone.mask_token": torch.zeros(1, 64),
            "decode_head.project.conv.weight": torch.randn(8, 8, 3, 3)}
    torch.save({"state_dict": ours}, tmp_path / "model.pth")
    vit, cfg = load_backbone(tmp_path / "model.pth")
    assert torch.equal(vit.pos_embed, ours["backbone.pos_embed"])


def test_backbone_mismatch_is_one_clear_error(tmp_path):
    from ssl_backbone.checkpoints import load_backbone

    sd = _vit_tensors()
    sd["blocks.1.mlp.fc2.weight"] = torch.randn(64, 100)  # wrong width for this block
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="mismatched shapes: blocks.1.mlp.fc2.weight"):
        load_backbone(tmp_path / "bad.pth")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "not_vit.pth")
    with pytest.raises(CheckpointError, match="not a ViT backbone"):
        load_backbone(tmp_path / "not_vit.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_backbone(tmp_path / "junk.pth")


def test_training_with_a_backbone_file_patch14(tmp_path):
    """A patch-14 backbone trains: its DPT output (16/14 of the input) is put back on the
    input grid, and the backbone stays frozen by default."""
    from canopy.train.datasets import SyntheticSpec, synthetic_records
    from canopy.train.loop import TrainConfig, train

    sd = _vit_tensors(dim=64, depth=4, patch=14, grid=8)
    torch.save(sd, tmp_path / "b.pth")
    tr, _ = synthetic_records(SyntheticSpec(1, scene_px=128, gsd=0.5), 56, 56)
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), backbone_path=str(tmp_path / "b.pth"),
                      n_bins=32, gsd=0.5, chip_size=56, batch_size=2, steps=2, threads=1)
    result = train(cfg, tr, tr[:2])
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model"]
    assert torch.equal(ck["backbone.blocks.3.mlp.fc1.weight"], sd["blocks.3.mlp.fc1.weight"])
    assert result.finished and result.final_val["val_pixels"] == 2 * 56 * 56
    # the saved model predicts what training validated: same grid, same values
    from canopy.model.checkpoints import load_model
    from canopy.train.loop import TrainForward

    model = load_model(result.model_dir)
    img = torch.from_numpy(tr[0].image[None].copy())
    with torch.no_grad():
        trained_view = model.heights(TrainForward(model, 4)(model.normalize(img))[0])
    predicted = model.predict_tensor(img)
    assert predicted.shape == (1, 56, 56)
    torch.testing.assert_close(predicted, trained_view, rtol=1e-5, atol=1e-4)
    # the run folder itself works as --checkpoint / --model (its model is in model/)
    torch.testing.assert_close(load_model(tmp_path / "run").predict_tensor(img), predicted)


def test_lidar_imagery_date_mismatch_masks_the_pair(scene):
    """Where the catalog knows both dates, a pair flown too far apart gives no labels."""
    from data_catalog.chips import ChipSampler

    from canopy.train.datasets import date_gap_days, records_from_sampler

    assert date_gap_days("2018-06-01T00:00:00Z", "2021-06-01") == pytest.approx(1096.0)
    assert date_gap_days(None, "2021-06-01") is None
    sampler = ChipSampler([(str(scene["rgb"]), str(scene["chm"]))], chip_size=64, gsd=0.5,
                          split_fractions=(1, 0, 0), chm_mode="native")
    key = (str(scene["rgb"]), str(scene["chm"]))
    recent, rep = records_from_sampler(sampler, "train", pair_dates={key: ("2020-05-01", "2020-09-01")},
                                       max_date_gap_days=730)
    assert recent and rep.chips_date_masked == 0
    with pytest.warns(UserWarning, match="days apart"):
        old, rep = records_from_sampler(sampler, "train", pair_dates={key: ("2020-05-01", "2012-05-01")},
                                        max_date_gap_days=730)
    assert old == [] and rep.chips_date_masked == len(recent)


def test_main_cli_prints_one_line_and_exits_2(tmp_path, scene):
    """Through the real ``canopy`` entry point (once canopy/cli.py registers ``train``)."""
    import subprocess
    import sys

    import canopy.cli

    names = {c.name or c.callback.__name__ for c in canopy.cli.app.registered_commands}
    assert "train" in names
    cat = make_catalog(tmp_path / "cat.parquet", [scene["rgb"]])
    run = subprocess.run([sys.executable, "-m", "canopy.cli", "train", "--catalog", str(cat),
                          "-o", str(tmp_path / "o"), "--steps", "1", *SMALL],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no CHM" in lines[0], run.stderr
