"""RGB + near-infrared input (issue 14 item 3, issue 17 item 5): a 3-band backbone grows a 4th
input channel (RGB kernels kept, the new one their mean), every pretraining method and
`canopy train` / `canopy predict --bands 1,2,3,4` take such a backbone end to end, and a
band count that does not fit the model is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch

from ssl_backbone.checkpoints import (
    grow_input_channels, load_backbone, save_safetensors, vit_config_from_state_dict)
from ssl_backbone.errors import CheckpointError
from ssl_backbone.vit import build_vit, per_band
from tests.conftest import shared
from tests.test_predict import run_cli

OSBS = ("rgb_chm_pairs", "neon_osbs_029")


def rgbn_from_real_rgb(path, out, nir=None, tag_nir=True):
    """A 4-band GeoTIFF from real NEON RGB plus a derived band (green excess, a crude
    vegetation signal standing in for near-infrared; or the constant ``nir``), band 4 tagged
    undefined as NAIP's is (``tag_nir=False``: left as GDAL tags a 4th uint8 band, alpha)."""
    with rasterio.open(path) as src:
        rgb = src.read().astype(np.int16)
        profile = src.profile
    band = (np.clip(2 * rgb[1] - rgb[0] - rgb[2] + 96, 0, 255) if nir is None
            else np.full(rgb.shape[1:], nir)).astype(np.uint8)
    profile.update(count=4, **({"photometric": "MINISBLACK"} if tag_nir else {}))
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(np.concatenate([rgb.astype(np.uint8), band[None]]))
        if tag_nir:
            dst.colorinterp = [rasterio.enums.ColorInterp.red, rasterio.enums.ColorInterp.green,
                               rasterio.enums.ColorInterp.blue, rasterio.enums.ColorInterp.undefined]
    return out


def test_a_grown_backbone_keeps_its_rgb_kernels_and_reads_a_neutral_fourth_band_as_before():
    torch.manual_seed(0)
    vit = build_vit("vit_micro").eval()
    grown = grow_input_channels(vit, 4).eval()
    w3, w4 = vit.patch_embed.proj.weight, grown.patch_embed.proj.weight
    assert grown.cfg.in_chans == 4 and w4.shape[1] == 4
    assert torch.equal(w4[:, :3], w3) and torch.allclose(w4[:, 3], w3.mean(dim=1))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # a 4th band at its normalisation mean (0) adds nothing
        a = vit.forward_taps(x)
        b = grown.forward_taps(torch.cat([x, torch.zeros(2, 1, 64, 64)], dim=1))
    flat = [(t, u) for pa, pb in zip(a, b) for t, u in zip(pa, pb)]
    assert len(flat) == 8 and all(torch.allclose(t, u, atol=1e-5) for t, u in flat)
    assert per_band((0.3, 0.6, 0.9), 4) == pytest.approx((0.3, 0.6, 0.9, 0.6))


def test_band_counts_are_read_from_the_weights_and_mismatches_refused(tmp_path):
    torch.manual_seed(0)
    rgb = tmp_path / "rgb.safetensors"
    save_safetensors(build_vit("vit_micro").state_dict(), rgb)
    vit, cfg = load_backbone(rgb, in_chans=4)  # grown on load
    assert cfg.in_chans == 4
    rgbn = tmp_path / "rgbn.safetensors"
    save_safetensors(vit.state_dict(), rgbn)
    assert load_backbone(rgbn)[1].in_chans == 4
    with pytest.raises(CheckpointError, match="takes 4 input bands, not 3"):
        load_backbone(rgbn, in_chans=3)
    sd = dict(vit.state_dict())
    sd["patch_embed.proj.weight"] = torch.zeros(128, 5, 16, 16)
    with pytest.raises(CheckpointError, match=r"3 \(RGB\) or 4 \(RGB \+ near-infrared\) bands"):
        vit_config_from_state_dict(sd)


class FourBands:
    """Synthetic 4-band windows (RGB fields plus a 4th band), for plumbing only."""

    window_px, channels = 64, 4

    def __len__(self):
        return 16

    def window(self, index, gen):
        g = torch.Generator().manual_seed(index)
        base = torch.rand(4, 4, 4, generator=g)
        up = torch.nn.functional.interpolate(base[None], size=(64, 64), mode="bicubic")[0]
        return (up.clamp(0, 1) * 255).to(torch.uint8)


@pytest.mark.parametrize("method", ["dinov2", "ijepa", "msn", "pmsn"])
def test_every_method_pretrains_a_four_band_backbone_continued_from_an_rgb_one(method, tmp_path):
    """One code path: the trainer builds the backbone for the source's bands, growing --init."""
    from ssl_backbone.methods import config_for
    from ssl_backbone.pretrain import pretrain

    torch.manual_seed(0)
    src = build_vit("vit_micro")
    save_safetensors(src.state_dict(), tmp_path / "rgb.safetensors")
    small = {"dinov2": dict(prototypes=64, head_hidden=32, head_bottleneck=16,
                            crops={"global_size": 64, "local_size": 32, "n_local": 2}),
             "ijepa": dict(image_size=64, predictor_dim=64, predictor_heads=2, predictor_depth=1,
                           min_keep=2),
             "msn": dict(prototypes=16, proj_hidden=32, proj_dim=16,
                         crops={"global_size": 64, "local_size": 32, "n_local": 2}),
             "pmsn": dict(prototypes=16, proj_hidden=32, proj_dim=16,
                          crops={"global_size": 64, "local_size": 32, "n_local": 2})}[method]
    cfg = config_for(method, dict(init=str(tmp_path / "rgb.safetensors"), batch_size=4, epochs=1,
                                  drop_path_rate=0.0, **small))
    result = pretrain(cfg, FourBands(), tmp_path / "run")
    assert result.steps_done == 4 and np.isfinite(result.last["total"])
    vit, vcfg = load_backbone(result.backbone_path)
    assert vcfg.in_chans == 4


def test_train_and_predict_a_four_band_model_on_real_rgb_plus_a_derived_band(tmp_path, capsys):
    """canopy pretrain --bands 1,2,3,4 (continued from an RGB backbone) → canopy train --bands
    1,2,3,4 → canopy predict --bands 1,2,3,4, on NEON OSBS RGB with a fourth band derived from
    it; the fourth band reaches the heights; wrong band counts are one-line errors."""
    img = rgbn_from_real_rgb(shared(*OSBS, "OSBS_029.tif"), tmp_path / "osbs_rgbn.tif")
    chm = shared(*OSBS, "OSBS_029_CHM.tif")
    torch.manual_seed(0)
    save_safetensors(build_vit("vit_micro").state_dict(), tmp_path / "rgb.safetensors")
    (tmp_path / "p.yaml").write_text(
        "prototypes: 64\nhead_hidden: 32\nhead_bottleneck: 16\nbatch_size: 2\nepochs: 1\n"
        "drop_path_rate: 0.0\ncrops: {global_size: 64, local_size: 32, n_local: 2}\n")
    code, out, err = run_cli("pretrain", "--config", tmp_path / "p.yaml", "--init",
                             tmp_path / "rgb.safetensors", "--imagery", img, "--bands", "1,2,3,4",
                             "--window", 96, "--max-steps", 2, "-o", tmp_path / "pre",
                             "--device", "cpu", "--precision", "fp32", capsys=capsys)
    assert code == 0, err
    code, out, err = run_cli("pretrain", "export", tmp_path / "pre", "-o",
                             tmp_path / "rgbn.safetensors", capsys=capsys)
    assert code == 0 and load_backbone(tmp_path / "rgbn.safetensors")[1].in_chans == 4, err
    train_args = ["train", "--pairs", f"{img}:{chm}:EPSG:32617", "--gsd", "0.5", "--chip-size",
                  "32", "--stride", "16", "--split-fractions", "1,0,0", "--steps", "3",
                  "--batch-size", "2", "--device", "cpu", "--precision", "fp32", "-q"]
    code, out, err = run_cli(*train_args, "--bands", "1,2,3,4", "--backbone",
                             tmp_path / "rgbn.safetensors", "-o", tmp_path / "m", capsys=capsys)
    assert code == 0, err
    model_dir = tmp_path / "m" / "model"
    from canopy.model.checkpoints import load_model

    model = load_model(model_dir)
    assert model.cfg.backbone.in_chans == 4 and len(model.cfg.mean) == 4
    # an RGB backbone given with four bands grows its input at train time too
    code, out, err = run_cli(*train_args, "--bands", "1,2,3,4", "--backbone",
                             tmp_path / "rgb.safetensors", "-o", tmp_path / "m2", capsys=capsys)
    assert code == 0, err
    common = ["--checkpoint", model_dir, "--device", "cpu", "--precision", "fp32"]
    code, out, err = run_cli("predict", img, "-o", tmp_path / "h.tif", "--bands", "1,2,3,4",
                             *common, capsys=capsys)
    assert code == 0, err
    code, out, err = run_cli("predict", img, "-o", tmp_path / "default.tif", *common,
                             capsys=capsys)  # the model's bands by default: R, G, B, then band 4
    assert code == 0, err
    # the same scene with a constant fourth band
    flat = rgbn_from_real_rgb(shared(*OSBS, "OSBS_029.tif"), tmp_path / "flat_nir.tif", nir=128)
    code, out, err = run_cli("predict", flat, "-o", tmp_path / "flat.tif", *common, capsys=capsys)
    assert code == 0, err
    with rasterio.open(tmp_path / "h.tif") as a, rasterio.open(tmp_path / "default.tif") as b, \
            rasterio.open(tmp_path / "flat.tif") as c:
        h, d, f = a.read(1), b.read(1), c.read(1)
    assert np.isfinite(h).all() and np.array_equal(h, d)
    assert np.abs(h - f).max() > 1e-4  # the fourth band is read and used, not dropped
    # the xarray API reads the model's four bands too, as the CLI does (same pixels, same heights)
    import rioxarray  # noqa: F401 - the .rio accessor
    from affine import Affine

    from canopy.predict.options import PredictOptions
    from canopy.predict.raster import predict_raster
    from canopy.xarray import predict as predict_da

    at_gsd = tmp_path / "rgbn_05m.tif"  # the same pixels given the model's 0.5 m
    with rasterio.open(img) as src:
        data, profile = src.read(), src.profile
    profile.update(transform=Affine(0.5, 0, 403200.0, 0, -0.5, 3285600.0), photometric="MINISBLACK")
    with rasterio.open(at_gsd, "w", **profile) as dst:
        dst.write(data)
        dst.colorinterp = rasterio.open(img).colorinterp
    want = rasterio.open(predict_raster(at_gsd, tmp_path / "one.tif", model,
                                        PredictOptions(precision="fp32", batch_size=8))).read(1)
    got = predict_da(rioxarray.open_rasterio(at_gsd), str(model_dir), precision="fp32",
                     batch_size=8).compute().values
    np.testing.assert_array_equal(got, want)
    rgb = shared(*OSBS, "OSBS_029.tif")
    alpha = rgbn_from_real_rgb(rgb, tmp_path / "alpha.tif", tag_nir=False)
    for args, message in [([img, "--bands", "1,2,3"], "--bands gives 3 bands; the model reads 4"),
                          ([rgb], "has 3 band(s); this model reads 4 (R,G,B,NIR)"),
                          ([alpha], "band 4 is tagged alpha (a mask), not imagery")]:
        code, out, err = run_cli("predict", *args, "-o", tmp_path / "bad.tif", *common,
                                 capsys=capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code != 0 and len(lines) == 1 and message in lines[0], err
        assert not (tmp_path / "bad.tif").exists()


def test_curation_with_a_four_band_embedder_feeds_four_band_pretraining(tmp_path, capsys):
    """`canopy pretrain curate` embeds the bands its embedder reads (R,G,B,NIR by default for a
    4-band one); the table keeps them, so pretraining on it builds a 4-band backbone."""
    img = rgbn_from_real_rgb(shared(*OSBS, "OSBS_029.tif"), tmp_path / "osbs_rgbn.tif")
    torch.manual_seed(0)
    save_safetensors(grow_input_channels(build_vit("vit_micro"), 4).state_dict(),
                     tmp_path / "rgbn.safetensors")
    args = ["pretrain", "curate", "--imagery", img, "--embedder", tmp_path / "rgbn.safetensors",
            "--target-size", 4, "--window", 96, "--clusters", "2", "--dedup", 0.999]
    code, out, err = run_cli(*args, "-o", tmp_path / "c.parquet", capsys=capsys)
    assert code == 0, err
    code, out, err = run_cli(*args, "--bands", "1,2,3", "-o", tmp_path / "bad.parquet",
                             capsys=capsys)
    assert code != 0 and "--bands gives 3 bands; the embedder reads 4" in err, err
    assert not (tmp_path / "bad.parquet").exists()
    (tmp_path / "p.yaml").write_text(
        "arch: vit_micro\nprototypes: 64\nhead_hidden: 32\nhead_bottleneck: 16\nbatch_size: 2\n"
        "epochs: 1\ndrop_path_rate: 0.0\ncrops: {global_size: 64, local_size: 32, n_local: 2}\n")
    code, out, err = run_cli("pretrain", "--config", tmp_path / "p.yaml", "--imagery",
                             tmp_path / "c.parquet", "-o", tmp_path / "run", "--device", "cpu",
                             "--precision", "fp32", capsys=capsys)
    assert code == 0, err
    assert load_backbone(tmp_path / "run" / "backbone.safetensors")[1].in_chans == 4


def test_fitting_a_gedi_correction_on_a_four_band_decoder_is_refused_by_name():
    """The correction's scenes are read as RGB: a 4-band decoder is one clear error, not a shape
    error from inside the tiler."""
    from dataclasses import replace

    from canopy.errors import OptionError
    from canopy.model.checkpoints import load_model
    from canopy.model.gedi_correction import CorrectionConfig
    from canopy.model.height_model import HeightModel
    from canopy.train.gedi_samples import TrainingScene, samples_from_scenes

    micro = load_model("micro")
    four = HeightModel(replace(micro.cfg, backbone=replace(micro.cfg.backbone, in_chans=4))).eval()
    scene = TrainingScene(str(shared(*OSBS, "OSBS_029.tif")), shots=None)
    with pytest.raises(OptionError, match="reads 4 bands; fitting a GEDI correction takes an RGB"):
        samples_from_scenes([scene], CorrectionConfig(), decoder=four)


def test_pretraining_refuses_a_fourth_band_tagged_alpha_as_training_and_prediction_do(tmp_path,
                                                                                     capsys):
    """GDAL reads a band tagged alpha as the file's mask: pretraining on it as near-infrared
    would feed the model a mask. The file is left out with the reason, in one line."""
    alpha = rgbn_from_real_rgb(shared(*OSBS, "OSBS_029.tif"), tmp_path / "alpha.tif",
                               tag_nir=False)
    code, out, err = run_cli("pretrain", "--method", "dinov2", "--arch", "vit_micro", "--imagery",
                             alpha, "--bands", "1,2,3,4", "-o", tmp_path / "run", "--device",
                             "cpu", capsys=capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1, err
    assert "band 4 is tagged alpha (a mask), not imagery" in lines[0], err
    assert not (tmp_path / "run").exists()


def test_an_rgb_models_files_stay_readable_by_a_release_without_band_counts(tmp_path,
                                                                           micro_model):
    """The band count was added to the configs after models were first shipped. A 3-band model
    and run write no band-count key, so the release before it (whose strict readers refuse
    unknown keys) still loads them; a 4-band model says its count."""
    import dataclasses
    import json
    import typing

    from canopy.model.checkpoints import save_native
    from canopy.model.height_model import HeightModel
    from canopy.train.loop import TrainConfig
    from ssl_backbone.config import from_dict
    from ssl_backbone.vit import ViTConfig

    def before(cls, drop):  # the same config as the release before the field had it
        hints = typing.get_type_hints(cls)
        fields = [(f.name, hints[f.name], f) for f in dataclasses.fields(cls) if f.name != drop]
        return dataclasses.make_dataclass(cls.__name__, fields)

    OldViT = before(ViTConfig, "in_chans")
    rgb = json.loads((save_native(micro_model, tmp_path / "rgb") / "config.json")
                     .read_text())
    assert from_dict(OldViT, rgb["backbone"], what="backbone config").embed_dim == 128
    assert from_dict(before(TrainConfig, "in_bands"), TrainConfig(out_dir="r").to_dict(),
                     what="train config").out_dir == "r"
    cfg4 = dataclasses.replace(micro_model.cfg,
                               backbone=dataclasses.replace(micro_model.cfg.backbone, in_chans=4))
    four = json.loads((save_native(HeightModel(cfg4), tmp_path / "rgbn") / "config.json")
                      .read_text())
    assert four["backbone"]["in_chans"] == 4
    assert ViTConfig.from_dict(four["backbone"]).in_chans == 4
    assert TrainConfig.from_dict(TrainConfig(out_dir="r", in_bands=4).to_dict()).in_bands == 4


def test_pretraining_takes_a_near_infrared_mean_and_std_of_its_own():
    """A 4th crops mean/std value normalises the NIR band (read from YAML as for any field);
    without one the band takes the RGB average. Other lengths are refused by name."""
    from ssl_backbone.augment import CropConfig, multi_crop
    from ssl_backbone.errors import ConfigError

    img = torch.full((4, 64, 64), 100, dtype=torch.uint8)
    img[3] = 200  # NIR: vegetation is bright in it
    nir_mean, nir_std = 200 / 255, 0.25
    plain = dict(global_size=32, local_size=16, n_local=1, jitter_p=0.0, grayscale_p=0.0,
                 blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)
    cfg = CropConfig.from_dict({**plain, "mean": [0.4, 0.4, 0.3, nir_mean],
                                "std": [0.2, 0.15, 0.15, nir_std]})
    (g, _), _ = multi_crop(img, cfg, torch.Generator().manual_seed(0))
    assert torch.allclose(g[3], torch.zeros(32, 32), atol=1e-5)  # at the NIR mean: 0
    (g, _), _ = multi_crop(img, CropConfig(**plain), torch.Generator().manual_seed(0))
    avg_mean, avg_std = per_band(CropConfig().mean, 4)[3], per_band(CropConfig().std, 4)[3]
    assert torch.allclose(g[3], torch.full((32, 32), (nir_mean - avg_mean) / avg_std), atol=1e-4)
    for bad in ([0.4, 0.4], [0.4] * 5):
        with pytest.raises(ConfigError, match="crops mean needs 3 values"):
            CropConfig.from_dict({"mean": bad})
