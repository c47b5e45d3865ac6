"""CHMv2 and the DINOv3 backbone family (#20): parity with Hugging Face Transformers and timm,
the release's checkpoint layouts, and maps from ``canopy predict`` as with v1.

No weights can be downloaded here: each oracle is built with seeded random weights in the
released layout and written as the release writes it (``save_pretrained`` for Transformers), so
what is compared is the architecture, the key mapping and the post-processing to metres.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from canopy.errors import CheckpointError
from canopy.model.checkpoints import load_config, load_model
from ssl_backbone.checkpoints import load_backbone

transformers = pytest.importorskip("transformers")

SAMPLE = Path(__file__).resolve().parents[1] / "canopy" / "data" / "sample_osbs_029.tif"
TOL_M = 1e-4  # the parity tolerance, metres


def real_tiles(n: int = 2, size: int = 256) -> torch.Tensor:
    """``n`` crops of the bundled real NEON ortho, uint8 [n, 3, size, size]."""
    with rasterio.open(SAMPLE) as ds:
        rgb = ds.read()
    tiles = [rgb[:, r:r + size, c:c + size] for r, c in ((0, 0), (144, 144), (0, 144))[:n]]
    return torch.from_numpy(np.stack(tiles).copy())


def randomise(model: torch.nn.Module, seed: int, logit_std: float = 0.05) -> None:
    """Seeded random weights for every tensor (biases, norms and LayerScale too), so that a
    tensor mapped to the wrong place changes the output. ``logit_std`` widens the last conv so
    heights vary by metres between pixels (a wrong bin spacing or tap shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
                p.copy_(1.0 + 0.2 * noise)
            elif "lambda1" in name or "gamma" in name:
                p.copy_(0.3 + 0.1 * noise)
            elif p.ndim > 1:
                p.copy_(noise * (p[0].numel() ** -0.5))
            else:
                p.copy_(0.1 * noise)
        last = dict(model.named_parameters()).get("head.conv_depth.head.4.weight")
        if last is not None:
            last.mul_(logit_std / last.std())


def hf_chmv2(folder: Path, seed: int = 0, size: str = "micro"):
    """A Transformers CHMv2ForDepthEstimation with seeded weights, saved as the Hub folder is
    (config.json, model.safetensors, preprocessor_config.json)."""
    from transformers import CHMv2Config, CHMv2ForDepthEstimation, CHMv2ImageProcessor

    if size == "release":
        cfg = CHMv2Config()  # the release: DINOv3 ViT-L/16 SAT-493M, taps 6/12/18/24, 256 bins
    else:
        cfg = CHMv2Config(
            backbone_config=dict(model_type="dinov3_vit", hidden_size=128, intermediate_size=512,
                                 num_attention_heads=2, num_hidden_layers=4,
                                 num_register_tokens=4, key_bias=True, out_indices=[1, 2, 3, 4],
                                 reshape_hidden_states=True, apply_layernorm=True,
                                 return_class_token=True, layer_norm_eps=1e-5),
            post_process_channels=[16, 32, 64, 128], fusion_hidden_size=32, head_hidden_size=16,
            number_output_channels=64)
    torch.manual_seed(seed)
    model = CHMv2ForDepthEstimation(cfg).eval()
    randomise(model, seed, logit_std=2.0)
    model.save_pretrained(folder)
    CHMv2ImageProcessor().save_pretrained(folder)
    return model


def transformers_heights(model, rgb: torch.Tensor) -> torch.Tensor:
    """What a Transformers user gets: the image processor, the model, its post-processing."""
    from transformers import CHMv2ImageProcessor

    proc = CHMv2ImageProcessor()
    inputs = proc(images=list(rgb), return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    sizes = [tuple(rgb.shape[-2:])] * rgb.shape[0]
    return torch.stack([d["predicted_depth"] for d in
                        proc.post_process_depth_estimation(out, target_sizes=sizes)])


@pytest.fixture(scope="module")
def micro_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chmv2_micro")
    return folder, hf_chmv2(folder)


# --------------------------------------------------------------------------- parity


def test_heights_equal_transformers_chmv2_on_real_imagery(micro_folder):
    folder, hf = micro_folder
    rgb = real_tiles()
    ref = transformers_heights(hf, rgb)
    model = load_model(folder)
    ours = model.predict_tensor(rgb, "fp32")
    assert ref.std() > 1.0  # heights vary by metres: a misplaced tensor would show
    assert (ours - ref).abs().max() <= TOL_M
    # the bin distribution's spread comes from the same mixlog distribution (finite, > 0)
    h, s = model.predict_tensor(rgb, "fp32", with_std=True)
    assert torch.equal(h, ours) and bool((s > 0).all()) and bool(torch.isfinite(s).all())


def test_the_release_architecture_loads_as_chmv2_and_matches(tmp_path):
    """The released shapes (ViT-L/16, 4 registers, taps 5/11/17/23 after the final norm, 256
    mixlog bins to 96 m) are read from the Hub config, and heights match Transformers."""
    hf = hf_chmv2(tmp_path, seed=3, size="release")
    cfg = load_config(tmp_path)
    assert (cfg.name, cfg.backbone.family, cfg.backbone.reg_tokens) == ("chmv2", "dinov3", 4)
    assert cfg.backbone.out_indices == (5, 11, 17, 23) and cfg.backbone.tap_norm
    assert (cfg.decoder.n_bins, cfg.decoder.max_depth * cfg.decoder.output_scale) == (256, 96.0)
    assert cfg.gsd == 0.6 and "DINOv3 License" in cfg.licence
    rgb = real_tiles(1)
    ref = transformers_heights(hf, rgb)
    del hf
    ours = load_model(tmp_path).predict_tensor(rgb, "fp32")
    assert ref.std() > 1.0
    assert (ours - ref).abs().max() <= TOL_M


def test_normalisation_is_read_from_the_image_processor_config(micro_folder, tmp_path):
    folder, _ = micro_folder
    copy = tmp_path / "m"
    copy.mkdir()
    for name in ("config.json", "model.safetensors"):
        (copy / name).write_bytes((folder / name).read_bytes())
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    (copy / "preprocessor_config.json").write_text(
        json.dumps({**pre, "image_mean": [0.43, 0.411, 0.296]}))
    assert load_config(copy).mean == (0.43, 0.411, 0.296)
    (copy / "preprocessor_config.json").unlink()  # absent: the processor's defaults
    assert load_config(copy).mean == (0.420, 0.411, 0.296)


def _dinov3_hf_backbone(folder: Path):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    cfg = DINOv3ViTConfig(hidden_size=128, intermediate_size=512, num_attention_heads=2,
                          num_hidden_layers=3, num_register_tokens=4, key_bias=True)
    torch.manual_seed(1)
    model = DINOv3ViTModel(cfg).eval()
    randomise(model, 1)
    model.save_pretrained(folder)
    return model


def test_backbone_equals_transformers_dinov3_vit_model(tmp_path):
    """A Hugging Face DINOv3ViTModel file loads as a dinov3-family backbone (as `canopy train
    --backbone` loads it) whose final-normed tokens are Transformers' last_hidden_state."""
    hf = _dinov3_hf_backbone(tmp_path)
    vit, cfg = load_backbone(tmp_path / "model.safetensors")
    assert (cfg.family, cfg.reg_tokens, cfg.depth, vit.num_prefix_tokens) == ("dinov3", 4, 3, 5)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        tokens, grid = vit.eval().prepare_tokens(x)
        ours = vit.norm(vit.run_blocks(tokens, grid=grid)[0])
    assert ref.shape == ours.shape
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def _timm_dinov3(seed: int = 2):
    import timm

    model = timm.create_model("vit_large_patch16_dinov3_qkvb", pretrained=False, embed_dim=128,
                              depth=4, num_heads=2, global_pool="token").eval()
    randomise(model, seed)
    return model


def test_backbone_equals_timm_and_reads_the_dinov3_release_layout(tmp_path):
    """timm's own DINOv3 ViT and ours agree on the same weights, whether they arrive in timm's
    names or in the DINOv3 repository's (storage_tokens, ls1.gamma, one qkv bias with its key
    part masked by bias_mask, bf16 rope periods)."""
    timm_model = _timm_dinov3()
    sd = timm_model.state_dict()
    torch.save(sd, tmp_path / "timm.pth")
    official = {}
    for k, v in sd.items():
        if k.endswith(".attn.q_bias"):
            pre = k[: -len("q_bias")]
            junk = torch.full_like(v, 7.0)  # the release's key bias is masked out
            official[pre + "qkv.bias"] = torch.cat([v, junk, sd[pre + "v_bias"]])
            official[pre + "qkv.bias_mask"] = torch.cat(
                [torch.ones_like(v), torch.zeros_like(v), torch.ones_like(v)])
        elif k.endswith(".attn.v_bias"):
            continue
        else:
            k = k.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma") \
                 .replace("gamma_2", "ls2.gamma")
            official[k] = v
    official["mask_token"] = torch.zeros(1, 128)
    official["rope_embed.periods"] = timm_model.rope.periods.to(torch.bfloat16)
    official["local_cls_norm.weight"] = torch.ones(128)  # training-only, dropped
    torch.save({"teacher": {f"backbone.{k}": v for k, v in official.items()}},
               tmp_path / "dinov3_vitl16_pretrain_sat493m.pth")
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        ref = timm_model.forward_features(x)
        for name in ("timm.pth", "dinov3_vitl16_pretrain_sat493m.pth"):
            vit, cfg = load_backbone(tmp_path / name)
            assert cfg.rope_theta == 100.0 and cfg.norm_eps == 1e-5
            tokens, grid = vit.eval().prepare_tokens(x)
            ours = vit.norm(vit.run_blocks(tokens, grid=grid)[0])
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5, msg=name)


def test_rope_follows_kept_and_split_tokens():
    """The token API on a RoPE backbone: running the depth in two parts gives forward_taps'
    taps, and encoding only kept patches equals masking the others' attention away — a kept
    token carries its own grid position, not its index in the shortened sequence."""
    from ssl_backbone.vit import build_vit

    vit = build_vit("dinov3_vit_micro").eval()
    randomise(vit, 0)  # LayerScale 1e-5 at init would make every block nearly the identity
    x = torch.randn(2, 3, 64, 48)  # 4×3 patches
    with torch.no_grad():
        ref = vit.forward_taps(x)
        tokens, grid = vit.prepare_tokens(x)
        tokens, first = vit.run_blocks(tokens, 0, 2, taps=(0, 1, 2, 3), grid=grid)
        _, rest = vit.run_blocks(tokens, 2, taps=(0, 1, 2, 3), grid=grid)
        parts = vit.tokens_to_maps([{**first, **rest}[i] for i in range(4)], grid)
        for (a, ca), (b, cb) in zip(ref, parts):
            assert torch.equal(a, b) and torch.equal(ca, cb)
        keep = torch.tensor([[0, 5, 11], [2, 3, 7]])
        kept, _ = vit.prepare_tokens(x, keep=keep)
        out, _ = vit.run_blocks(kept, grid=grid, keep=keep)
        # the same tokens through one block by hand: attention over prefix + kept only
        full, _ = vit.prepare_tokens(x)
        rope = vit.rope.get_embed(shape=grid)
        for b in range(2):
            idx = torch.cat([torch.arange(5), keep[b] + 5])
            t = full[b:b + 1, idx]
            for blk in vit.blocks:
                t = blk(t, rope=rope[keep[b]])
            torch.testing.assert_close(out[b:b + 1], t, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="grid"):
            vit.run_blocks(tokens)


# --------------------------------------------------------------------------- loading errors


def test_a_damaged_or_unsupported_chmv2_is_one_error_naming_what(micro_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = micro_folder
    sd = load_file(str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())

    def write(name, tensors, config):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(config))
        return d

    broken = dict(sd)
    del broken["head.convs.2.weight"]
    broken["head.extra.weight"] = torch.zeros(1)
    broken["backbone.norm.weight"] = torch.zeros(7)
    with pytest.raises(CheckpointError) as err:
        load_model(write("broken", broken, cfg))
    msg = str(err.value)
    assert "missing keys: decode_head.convs.2.conv.weight" in msg
    assert "unexpected keys: decode_head.extra.weight" in msg
    assert "mismatched shapes: backbone.norm.weight (7,)" in msg
    gated = {**cfg, "backbone_config": {**cfg["backbone_config"], "use_gated_mlp": True}}
    with pytest.raises(CheckpointError, match="use_gated_mlp"):
        load_model(write("gated", sd, gated))
    with pytest.raises(CheckpointError, match="readout_type"):
        load_model(write("add", sd, {**cfg, "readout_type": "add"}))


# --------------------------------------------------------------------------- maps


def test_canopy_predict_with_a_chmv2_folder(micro_folder, tmp_path, capsys):
    """`canopy predict -c <chmv2 folder>` on a real scene at every precision and auto: a map
    tagged with the model and its licence; bf16 and int8 near fp32."""
    from tests.test_predict import run_cli

    folder, _ = micro_folder
    maps = {}
    for precision in ("fp32", "bf16", "int8", "auto"):
        out = tmp_path / f"{precision}.tif"
        code, _, err = run_cli("predict", SAMPLE, "-o", out, "-c", folder, "--precision",
                               precision, capsys=capsys)
        assert code == 0, err
        with rasterio.open(out) as ds:
            maps[precision] = ds.read(1)
            tags = ds.tags()
        assert tags["CANOPY_MODEL"] == "chmv2_like_vit128x4"
        assert tags["CANOPY_MODEL_LICENCE"].startswith("DINOv3 License")
        assert "Hugging Face CHMv2" in tags["CANOPY_MODEL_SOURCE"]
    ok = np.isfinite(maps["fp32"])
    assert ok.mean() > 0.9 and np.nanstd(maps["fp32"]) > 0.5
    for precision in ("bf16", "int8"):
        assert np.abs(maps[precision] - maps["fp32"])[ok].mean() < 0.5, precision


def test_the_int8_paths_bf16_attention_core_keeps_rotary_positions():
    """int8 inference swaps each block's attention for a bf16 core; on a RoPE backbone that core
    must rotate q and k as timm's Eva attention does (else positions vanish silently)."""
    from canopy.model.int8 import Bf16CoreAttention, swap_attention
    from ssl_backbone.vit import build_vit

    vit = build_vit("dinov3_vit_micro").eval()
    randomise(vit, 4)
    attn = vit.blocks[1].attn
    x = torch.randn(2, vit.num_prefix_tokens + 12, 128)
    rope = vit.rope.get_embed(shape=(3, 4))
    with torch.no_grad():
        ref = attn(x, rope=rope)
        ours = Bf16CoreAttention(attn)(x, rope=rope)
        unrotated = attn(x)
    err = (ours - ref).abs().max()
    assert err < 0.05 * ref.abs().max() and err < 0.2 * (unrotated - ref).abs().max()
    assert swap_attention(vit) == len(vit.blocks)


def test_training_from_the_dinov3_backbone_and_from_chmv2(tmp_path, micro_folder):
    """`canopy train --backbone <DINOv3 release file>` trains a decoder on the RoPE backbone,
    and `--init-model <chmv2 folder>` fine-tunes CHMv2 (mixlog bins); each saved model predicts
    what training validated, and keeps the DINOv3 licence."""
    from canopy.train.datasets import SyntheticSpec, synthetic_records
    from canopy.train.loop import TrainConfig, TrainForward, train

    timm_model = _timm_dinov3()
    sd = {k.replace("reg_token", "storage_tokens"): v for k, v in timm_model.state_dict().items()}
    torch.save(sd, tmp_path / "dinov3_sat493m.pth")
    tr, _ = synthetic_records(SyntheticSpec(1, scene_px=128, gsd=0.5), 64, 64)
    img = torch.from_numpy(tr[0].image[None].copy())
    runs = {"backbone": dict(backbone_path=str(tmp_path / "dinov3_sat493m.pth"), n_bins=32,
                             gsd=0.5),
            "init": dict(init_model=str(micro_folder[0]), gsd=0.6)}  # CHMv2's GSD
    for name, kw in runs.items():
        cfg = TrainConfig(out_dir=str(tmp_path / name), chip_size=64, batch_size=2,
                          steps=2, threads=1, **kw)
        result = train(cfg, tr, tr[:2])
        assert result.finished
        model = load_model(result.model_dir)
        assert model.cfg.backbone.family == "dinov3"
        assert model.cfg.licence.startswith("DINOv3 License"), name
        with torch.no_grad():
            trained_view = model.heights(TrainForward(model, 2)(model.normalize(img))[0])
        torch.testing.assert_close(model.predict_tensor(img), trained_view, rtol=1e-5, atol=1e-4)
    assert load_model(tmp_path / "init").cfg.decoder.bin_spacing == "mixlog"
