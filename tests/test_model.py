"""The height model: HRCH v1 state-dict layout, architecture from shapes, the three loaders."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from canopy.errors import CheckpointError, NoDefaultModelError
from canopy.model import HeightModel, hrch_config, micro_config
from benchmarks.hrch_reference import released_decoder, released_heights, released_taps
from canopy.model.checkpoints import (infer_config, load_model, save_native)


def meta_state_dict(cfg):
    with torch.device("meta"):
        return HeightModel(cfg).state_dict()


@pytest.mark.parametrize("size,D,c,depth", [("large", 1024, (128, 256, 512, 1024), 24),
                                            ("huge", 1280, (160, 320, 640, 1280), 32)])
def test_state_dict_matches_released_layout(size, D, c, depth):
    sd = meta_state_dict(hrch_config(size))
    expect = {
        "backbone.cls_token": (1, 1, D), "backbone.pos_embed": (1, 197, D),
        "backbone.mask_token": (1, D), "backbone.patch_embed.proj.weight": (D, 3, 16, 16),
        "backbone.blocks.0.attn.qkv.weight": (3 * D, D), "backbone.blocks.0.attn.qkv.bias": (3 * D,),
        "backbone.blocks.0.ls1.gamma": (D,), "backbone.blocks.0.ls2.gamma": (D,),
        "backbone.blocks.0.mlp.fc1.weight": (4 * D, D), "backbone.blocks.0.mlp.fc2.weight": (D, 4 * D),
        f"backbone.blocks.{depth - 1}.norm2.bias": (D,), "backbone.norm.weight": (D,),
        "decode_head.reassemble_blocks.readout_projects.0.0.weight": (D, 2 * D),
        "decode_head.reassemble_blocks.projects.3.conv.weight": (c[3], D, 1, 1),
        "decode_head.reassemble_blocks.resize_layers.0.weight": (c[0], c[0], 4, 4),
        "decode_head.reassemble_blocks.resize_layers.1.weight": (c[1], c[1], 2, 2),
        "decode_head.reassemble_blocks.resize_layers.3.weight": (c[3], c[3], 3, 3),
        "decode_head.convs.2.conv.weight": (256, c[2], 3, 3),
        "decode_head.fusion_blocks.0.project.conv.weight": (256, 256, 1, 1),
        "decode_head.fusion_blocks.1.res_conv_unit1.conv1.conv.weight": (256, 256, 3, 3),
        "decode_head.fusion_blocks.3.res_conv_unit2.conv2.conv.weight": (256, 256, 3, 3),
        "decode_head.project.conv.weight": (256, 256, 3, 3),
        "decode_head.conv_depth.head.0.weight": (128, 256, 3, 3),
        "decode_head.conv_depth.head.2.weight": (32, 128, 3, 3),
        "decode_head.conv_depth.head.4.weight": (256, 32, 1, 1),
    }
    for key, shape in expect.items():
        assert tuple(sd[key].shape) == shape, key
    # what the release does not have
    assert "decode_head.fusion_blocks.0.res_conv_unit1.conv1.conv.weight" not in sd
    assert "decode_head.convs.0.conv.bias" not in sd
    assert not any(k.startswith(("backbone.head", "backbone.fc_norm", "backbone.reg_token")) for k in sd)
    assert "decode_head.reassemble_blocks.resize_layers.2.weight" not in sd
    n_blocks = len({k.split(".")[2] for k in sd if k.startswith("backbone.blocks.")})
    assert n_blocks == depth
    n_params = sum(math.prod(v.shape) for k, v in sd.items() if k.startswith("backbone."))
    assert abs(n_params / 1e6 - {"large": 303, "huge": 631}[size]) < 3


@pytest.mark.parametrize("size", ["large", "huge"])
def test_architecture_is_read_from_shapes(size):
    cfg = infer_config(meta_state_dict(hrch_config(size)), source="renamed.pth")
    ref = hrch_config(size)
    assert cfg.backbone == ref.backbone
    assert cfg.decoder == ref.decoder
    assert cfg.name == ref.name


def test_timm_backbone_computes_the_released_backbone():
    torch.manual_seed(0)
    model = HeightModel(micro_config()).eval()
    with torch.no_grad():
        # every parameter random (timm starts LayerNorm at 1/0, biases at 0, LayerScale at 1:
        # a swapped ls1/ls2 or a dropped bias would pass with those), the pos table large so
        # the interpolation matters
        for p in model.backbone.parameters():
            p.normal_(0, 0.2)
        model.backbone.pos_embed.normal_(0, 1)
        x = torch.randn(2, 3, 256, 256)
        ours = model.backbone.forward_taps(x)
        ref = released_taps(model.backbone.state_dict(), model.cfg.backbone, x)
    for (a, ca), (b, cb) in zip(ours, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(ca, cb, atol=2e-4, rtol=1e-4)


def test_heights_follow_hrch_bins():
    model = HeightModel(micro_config())
    K = model.cfg.decoder.n_bins
    logits = torch.zeros(1, K, 1, 1)
    # all-zero logits: uniform over linspace(0.001, 10) ×10 → ≈ 50 m
    assert model.heights(logits).item() == pytest.approx(10 * (0.001 + 10) / 2, rel=1e-5)
    logits[0, 0] = 1e6  # all mass on the first bin → 0.01 m
    assert model.heights(logits).item() == pytest.approx(0.01, abs=1e-3)
    h, s = model.heights(logits, with_std=True)
    # the +0.1 floor leaves a thin tail over all bins: a confident pixel still spreads ~0.15 m
    assert 0.05 < s.item() < 0.2
    h, s = model.heights(torch.zeros(1, K, 1, 1), with_std=True)
    # uniform over [0.01, 100] m: std = range / sqrt(12)
    assert s.item() == pytest.approx(10 * (10 - 0.001) / math.sqrt(12), rel=0.02)


@pytest.mark.parametrize("patch", [16, 14])
def test_inference_fuses_the_last_conv_with_the_bins_exactly(patch, rgb_array):
    """predict_tensor never builds the per-bin logits (256 values per pixel): the head's last
    1×1 conv is reduced against the bins chunk by chunk. Same heights and spreads as the plain
    logits path, also for 14-px patches where the hidden map, not the logits, is resized."""
    from dataclasses import replace

    from canopy.model.height_model import autocast_context

    cfg = micro_config()
    cfg = replace(cfg, backbone=replace(cfg.backbone, patch_size=patch))
    torch.manual_seed(0)
    model = HeightModel(cfg).eval()
    with torch.no_grad():  # a spread of heights, not the flat ~50 m of a fresh head
        model.decode_head.conv_depth.head[-1].weight.normal_(0, 20)
    x = torch.from_numpy(rgb_array(100, 100))[None].repeat(3, 1, 1, 1)  # 100: not a patch multiple
    for precision in ("fp32", "bf16"):
        with torch.no_grad(), autocast_context(model.device, precision):
            logits = model(model.normalize(x))
        h0, s0 = model.heights(logits, with_std=True)
        h1, s1 = model.predict_tensor(x, precision=precision, with_std=True)
        assert h1.shape == (3, 100, 100) and float(h0.std()) > 0.1
        # bf16 with 14-px patches rounds the resized hidden map, not the resized logits, to
        # bf16: equal to bf16's own precision (2^-8 relative), not bit for bit
        tol = dict(atol=1e-4, rtol=4e-3) if (precision, patch) == ("bf16", 14) else \
            dict(atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(h1, h0, **tol)
        torch.testing.assert_close(s1, s0, **tol)
        torch.testing.assert_close(model.predict_tensor(x, precision=precision), h1)


def test_normalisation_is_part_of_the_model():
    model = load_model("micro")
    assert model.cfg.mean == (0.420, 0.411, 0.296)
    assert model.cfg.std == (0.213, 0.156, 0.143)
    x = torch.full((1, 3, 2, 2), 255 * 0.420)
    assert model.normalize(x)[0, 0].abs().max() < 1e-5


def test_predict_api_numpy_and_tensor(micro_model, rgb_array):
    import canopy

    img = np.moveaxis(rgb_array(300, 280), 0, 2)
    out = canopy.predict_image(micro_model, img)
    assert out.shape == (300, 280) and out.dtype == np.float32 and np.isfinite(out).all()
    t = torch.from_numpy(np.moveaxis(img[:256, :256], 2, 0)[None].copy())
    out_t = micro_model.predict_tensor(t)
    assert tuple(out_t.shape) == (1, 256, 256)
    # one tile, two routes, same numbers (with the same threads: a CPU lane runs on its share
    # of the cores, whose float sums differ in the last bits from a call on all of them)
    np.testing.assert_array_equal(
        canopy.predict_image(micro_model, np.ascontiguousarray(img[:256, :256]), precision="fp32",
                             lanes=1),
        out_t[0].numpy())
    h, s = micro_model.predict_tensor(t, with_std=True)
    assert (s >= 0).all()
    # float images are refused (a [0, 1] float image would give ~50 m everywhere)
    with pytest.raises(TypeError, match="uint8"):
        canopy.predict_image(micro_model, img.astype(np.float32) / 255)
    with pytest.raises(TypeError, match="uint8"):
        micro_model.predict_tensor(t.float() / 255)


def test_float_checkpoint_loads_strictly(tmp_path, micro_model, rgb_array):
    sd = micro_model.state_dict()
    torch.save({"state_dict": sd}, tmp_path / "some_name.pth")
    loaded = load_model(tmp_path / "some_name.pth")
    x = torch.from_numpy(rgb_array(256, 256)[None])
    torch.testing.assert_close(loaded.predict_tensor(x), micro_model.predict_tensor(x), atol=0, rtol=0)


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path, micro_model):
    sd = dict(micro_model.state_dict())
    sd.pop("backbone.blocks.1.attn.proj.bias")
    sd["decode_head.extra.weight"] = torch.zeros(1)
    sd["backbone.mask_token"] = torch.zeros(1, 7)
    torch.save({"state_dict": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "bad.pth")
    msg = str(err.value)
    assert "\n" not in msg
    assert "backbone.blocks.1.attn.proj.bias" in msg
    assert "decode_head.extra.weight" in msg
    assert "backbone.mask_token (1, 7)" in msg


def test_not_a_height_model_checkpoint(tmp_path):
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match="not a canopy height model"):
        load_model(tmp_path / "resnet.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(tmp_path / "junk.pth")


def test_compressed_dynamic_int8_checkpoint(tmp_path, micro_model, rgb_array):
    """The v1 compressed_* files are quantize_dynamic state dicts; we dequantise them to float."""
    quantized = torch.ao.quantization.quantize_dynamic(
        micro_model, {torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d}, dtype=torch.qint8)
    sd = quantized.state_dict()
    assert any(k.endswith("_packed_params._packed_params") for k in sd)
    torch.save(sd, tmp_path / "compressed_SSLsomething.pth")
    loaded = load_model(tmp_path / "compressed_SSLsomething.pth")
    assert "dequantised" in loaded.cfg.source
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.from_numpy(rgb_array(256, 256)[None])
    ref_q = quantized(micro_model.normalize(x))
    ours = loaded(loaded.normalize(x))
    # same int8 weights, float activations: tiny differences from activation quantisation only
    assert (loaded.heights(ours) - micro_model.heights(ref_q)).abs().max() < 0.05
    # and it now runs in bf16 too (the int8 modules themselves are CPU/fp32-only)
    h_bf16 = loaded.predict_tensor(x, precision="bf16")
    assert torch.isfinite(h_bf16).all()


def test_native_roundtrip_and_config(tmp_path, micro_model, rgb_array):
    out = save_native(micro_model, tmp_path / "m", model_card="# micro\n")
    assert (out / "config.json").exists() and (out / "MODEL_CARD.md").exists()
    loaded = load_model(out)
    assert loaded.cfg == micro_model.cfg
    x = torch.from_numpy(rgb_array(256, 256)[None])
    torch.testing.assert_close(loaded.predict_tensor(x), micro_model.predict_tensor(x), atol=0, rtol=0)
    # the single .safetensors file carries its config in its metadata, which wins over a
    # config.json edited (or left from another save) beside it
    (out / "config.json").write_text('{"name": "x", "colour": "blue"}')
    assert load_model(out).cfg == micro_model.cfg
    (out / "config.json").unlink()
    assert load_model(out / "model.safetensors").cfg == micro_model.cfg
    # a file written without our metadata falls back to config.json, validated
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(out / "model.safetensors")), str(out / "model.safetensors"))
    (out / "config.json").write_text('{"name": "x", "colour": "blue"}')
    with pytest.raises(CheckpointError, match="unknown model config keys"):
        load_model(out)


def test_saved_configs_read_back_to_the_same_json():
    """The bundled model's config.json and the config in its weights' metadata read back and
    write out unchanged; a file from a newer format version is refused, not half-read."""
    import json

    from safetensors import safe_open

    from canopy.model.checkpoints import DEFAULT_MODEL_DIR
    from canopy.model.config import HeightModelConfig
    from ssl_backbone.errors import ConfigError

    from canopy.model.config import FORMAT_VERSION

    def same_meaning(old: dict, new: dict) -> None:
        """Every value of an older-format file survives; fields it predates take defaults."""
        for key, value in old.items():
            if key == "format_version":
                continue
            if isinstance(value, dict):
                same_meaning(value, new[key])
            else:
                assert new[key] == value, key

    text = (DEFAULT_MODEL_DIR / "config.json").read_text()
    with safe_open(str(DEFAULT_MODEL_DIR / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()["config"]
    for written in (text, meta):
        cfg = HeightModelConfig.from_dict(json.loads(written))
        same_meaning(json.loads(written), cfg.to_dict())
        current = cfg.to_json()
        assert json.loads(current)["format_version"] == FORMAT_VERSION
        assert HeightModelConfig.from_dict(json.loads(current)).to_json() == current
    with pytest.raises(ConfigError, match="newer") as err:
        HeightModelConfig.from_dict({**json.loads(text), "format_version": 99})
    assert err.value.field == "format_version"
    with pytest.raises(ConfigError, match="unknown decoder config keys") as err:
        HeightModelConfig.from_dict({"decoder": {"bins": 3}})
    assert err.value.field == "decoder.bins"


def test_missing_default_model_says_so_plainly(tmp_path, monkeypatch):
    """An install without the bundled weights (e.g. stripped by a packager) gets a plain message."""
    from canopy.model import checkpoints

    monkeypatch.setattr(checkpoints, "DEFAULT_MODEL_DIR", tmp_path / "none")
    with pytest.raises(NoDefaultModelError, match="no trained default model is bundled"):
        load_model("default")


def test_heights_are_the_released_models_heights():
    """The whole forward, bins included, against the restatement the speed benchmark times as
    the released code: same heights in fp32 (so the benchmark compares like with like)."""
    torch.manual_seed(2)
    model = HeightModel(micro_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    rgb = torch.randint(0, 255, (2, 3, 256, 256), dtype=torch.uint8)
    ref = released_heights(model.state_dict(), model.cfg, rgb)
    assert float(ref.std()) > 0.1  # heights that vary, not a constant both sides agree on
    torch.testing.assert_close(model.predict_tensor(rgb), ref, atol=1e-3, rtol=1e-4)


def test_decoder_computes_the_released_decoder():
    torch.manual_seed(1)
    model = HeightModel(micro_config()).eval()
    with torch.no_grad():
        for p in model.decode_head.parameters():
            p.normal_(0, 0.1)
        D = model.cfg.backbone.embed_dim
        taps = [(torch.randn(2, D, 16, 16), torch.randn(2, D)) for _ in range(4)]
        ours = model.decode_head(taps)
        ref = released_decoder(model.state_dict(), taps)
    assert ours.shape == (2, model.cfg.decoder.n_bins, 256, 256)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_saved_weights_are_readable_like_any_other_file(tmp_path, micro_model):
    """Issue #13: model.safetensors was written 0600 (safetensors' own mode) beside 0644 files;
    a model saved for a team or a server must be readable as the user's umask allows."""
    import os
    import stat

    from canopy.model.checkpoints import save_native
    from canopy.model.gedi_correction import CorrectionConfig, GediCorrectionNet, save_correction

    old = os.umask(0o022)
    try:
        out = save_native(micro_model, tmp_path / "m")
        corr = save_correction(GediCorrectionNet(CorrectionConfig(block_px=256, input_px=64)),
                               tmp_path / "g")
    finally:
        os.umask(old)
    for path in (out / "model.safetensors", out / "config.json", corr / "model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert not list(tmp_path.rglob("*.partial"))


def test_compressed_checkpoints_are_dequantised_once(tmp_path, micro_model, rgb_array,
                                                     monkeypatch):
    """Cold start (#21): the float weights of a compressed checkpoint are cached in canopy's
    cache folder (never beside the checkpoint) and memory-mapped on later loads; a changed file
    is converted again."""
    import os

    from canopy.model import checkpoints

    monkeypatch.setenv("CANOPY_CACHE_DIR", str(tmp_path / "cache"))
    quantized = torch.ao.quantization.quantize_dynamic(micro_model, {torch.nn.Linear},
                                                       dtype=torch.qint8)
    src = tmp_path / "models" / "compressed_micro.pth"
    src.parent.mkdir()
    torch.save(quantized.state_dict(), src)
    first = load_model(src)
    assert list(src.parent.iterdir()) == [src]  # nothing written beside the checkpoint
    assert len(list((tmp_path / "cache" / "checkpoints").glob("*.pt"))) == 1
    calls = []
    real = checkpoints.dequantize_state_dict
    monkeypatch.setattr(checkpoints, "dequantize_state_dict", lambda sd: calls.append(1) or real(sd))
    second = load_model(src)
    assert calls == [] and second.cfg == first.cfg
    x = torch.from_numpy(rgb_array(64, 64)[None])
    torch.testing.assert_close(second.predict_tensor(x), first.predict_tensor(x), atol=0, rtol=0)
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    load_model(src)
    assert calls == [1]  # the file changed: converted again


def test_a_batch_too_large_for_one_pass_runs_in_pieces(micro_model, monkeypatch):
    """A 256-tile ViT-H batch made a 2^31-element head map, which CUDA's upsampling refused
    (found on an H200 with --batch-size 256): such a batch now runs in pieces of at most
    ``max_batch`` tiles and gives the same heights."""
    from canopy.model.checkpoints import load_config

    with torch.device("meta"):  # the ViT-H model's shapes, no memory
        vith = HeightModel(load_config("hrch_v1_huge_random"))
    huge, n = vith.cfg.decoder, vith.max_batch((256, 256))
    assert n * max(huge.channels, huge.head_hidden) * 256 * 256 < 2 ** 31 <= \
        (n + 1) * max(huge.channels, huge.head_hidden) * 256 * 256
    x = torch.randint(0, 255, (5, 3, 64, 64), dtype=torch.uint8)
    whole, whole_std = micro_model.predict_tensor(x, with_std=True)
    seen = []
    real = micro_model.backbone.forward_taps
    monkeypatch.setattr(micro_model.backbone, "forward_taps",
                        lambda t, *a, **k: seen.append(len(t)) or real(t, *a, **k))
    monkeypatch.setattr(micro_model, "max_batch", lambda hw: 2)
    part, part_std = micro_model.predict_tensor(x, with_std=True)
    assert seen == [2, 2, 1]
    np.testing.assert_allclose(part.numpy(), whole.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(part_std.numpy(), whole_std.numpy(), rtol=0, atol=1e-4)
