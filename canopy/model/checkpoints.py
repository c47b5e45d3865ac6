"""One place that maps checkpoint files to a :class:`HeightModel` (timm's ``checkpoint_filter_fn`` idea).

Formats:

* **HRCH v1 float** (``SSLhuge_satellite.pth``): ``{'state_dict': {backbone.*, decode_head.*}}``,
  loaded strictly.
* **HRCH v1 compressed** (``compressed_SSLlarge.pth``, ``compressed_SSLhuge*.pth``): a state dict
  of a ``quantize_dynamic`` model: every ``nn.Linear`` is stored as packed int8 params
  (``…_packed_params._packed_params`` = (qweight, bias), plus ``scale``/``zero_point``). We
  dequantise those to float ``weight``/``bias`` so the model also runs on GPU and in bf16.
* **native**: a folder with ``model.safetensors`` + ``config.json`` (+ ``MODEL_CARD.md``), or a
  single ``.safetensors`` whose metadata holds the config.
* **CHMv2, Hugging Face layout** (``facebook/dinov3-vitl16-chmv2-dpt-head``): a folder with
  ``config.json`` (``"model_type": "chmv2"``, the architecture) + ``model.safetensors``
  (``backbone.*`` in ``DINOv3ViTModel`` names, ``head.*`` in ``CHMv2Head`` names) and perhaps
  ``preprocessor_config.json`` (the input normalisation; the processor's defaults otherwise).
* **CHMv2, DINOv3 repository layout**: a folder holding the SAT-493M backbone file
  (``dinov3_vitl16_pretrain_sat493m-*.pth``, told apart by its ``storage_tokens``) and the
  decoder file (``dinov3_vitl16_chmv2_dpt_head-*.pth``), whose keys are read as DINOv2's DPT
  head names, the ones v1 uses (not checked against the real file, which is gated: a mismatch
  is the strict load's one error listing the keys).

The architecture is read from the tensors' shapes, never from the file name. The backbone part
of every format goes through :mod:`ssl_backbone.checkpoints` (reader, wrapper prefixes, ViT
architecture from shapes, strict load), so a ViT is read one way whether it arrives alone
(``canopy train --backbone``) or inside a height model; this module adds only what is about
height models: the decoder's shapes, int8 dequantisation and the native format's config.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from dataclasses import replace

import torch

from canopy.errors import CheckpointError, NoDefaultModelError
from canopy.model.config import (
    CHMV2_MEAN, CHMV2_STD, DINOV3_LICENCE, HRCH_LICENCE, MAXAR_GSD, HeightModelConfig, chmv2_decoder,
    chmv2_config, chmv2_micro_config, hrch_config, micro_config)
from canopy.model.dpt import DPTConfig
from canopy.model import ood
from canopy.model.height_model import HeightModel
from ssl_backbone.checkpoints import (
    filter_backbone_state_dict, load_state_dict_strict, read_state_dict, save_safetensors,
    strip_prefixes, unwrap_containers, vit_config_from_state_dict)
from ssl_backbone.vit import ViTConfig

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
DEFAULT_MODEL_DIR = WEIGHTS_DIR / "default"

# Random-weight variants, for plumbing and speed tests only (config.trained is False).
RANDOM_VARIANTS = {
    "micro": micro_config,
    "chmv2_micro": chmv2_micro_config,
    "hrch_v1_large_random": lambda: _untrained(hrch_config("large")),
    "hrch_v1_huge_random": lambda: _untrained(hrch_config("huge")),
    "chmv2_random": lambda: _untrained(chmv2_config()),
}


def _untrained(cfg: HeightModelConfig) -> HeightModelConfig:
    cfg.trained = False
    cfg.name += "_random"
    return cfg


def file_sha256(path: str | os.PathLike, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# state-dict filters


def dequantize_state_dict(sd: dict) -> dict:
    """Turn dynamic-int8 Linear entries into float ``weight``/``bias``; leave everything else."""
    out = {}
    for key, value in sd.items():
        if key.endswith("._packed_params._packed_params"):
            base = key[: -len("._packed_params._packed_params")]
            weight, bias = value[0], value[1]
            out[f"{base}.weight"] = weight.dequantize() if weight.is_quantized else weight.float()
            if bias is not None:
                out[f"{base}.bias"] = bias.float()
        elif key.endswith("._packed_params.dtype") or re.search(r"\.(scale|zero_point)$", key):
            continue  # quantisation bookkeeping of a packed Linear: no float counterpart
        elif isinstance(value, torch.Tensor) and value.is_quantized:
            out[key] = value.dequantize()
        else:
            out[key] = value
    return out


def infer_config(sd: dict, source: str = "") -> HeightModelConfig:
    """Build the architecture from tensor shapes (HRCH layout)."""
    try:
        missing = next((k for k in ("backbone.cls_token", "backbone.pos_embed",
                                     "backbone.patch_embed.proj.weight",
                                     "backbone.blocks.0.mlp.fc1.weight") if k not in sd), None)
        if missing:
            raise KeyError(missing)
        heads_w = sd["decode_head.conv_depth.head.4.weight"]
        hidden_w = sd["decode_head.conv_depth.head.2.weight"]
        fusion_w = sd["decode_head.project.conv.weight"]
        post = tuple(int(sd[f"decode_head.reassemble_blocks.projects.{i}.conv.weight"].shape[0])
                     for i in range(4))
    except KeyError as exc:
        raise CheckpointError(
            f"{source or 'checkpoint'}: not a canopy height model (missing key {exc.args[0]}); "
            "expected backbone.* and decode_head.* entries"
        ) from None
    backbone = vit_config_from_state_dict(
        {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")},
        source or "checkpoint")
    embed_dim, depth = backbone.embed_dim, backbone.depth
    decoder = DPTConfig(
        post_process_channels=post, channels=int(fusion_w.shape[0]),
        head_hidden=int(hidden_w.shape[0]), n_bins=int(heads_w.shape[0]),
    )
    size = {1024: "large", 1280: "huge"}.get(embed_dim)
    name = f"hrch_v1_{size}" if size and depth in (24, 32) else f"vit{embed_dim}x{depth}_dpt"
    return HeightModelConfig(name=name, version="1", backbone=backbone, decoder=decoder,
                             source=source,
                             licence=HRCH_LICENCE if name.startswith("hrch_v1") else "")


# ---------------------------------------------------------------------------------------------
# CHMv2: Hugging Face and DINOv3-repository layouts

#: Hugging Face ``CHMv2Head`` names → ours (``decode_head.*``, the v1 names; see canopy.model.dpt)
HF_HEAD_NAMES = (
    (r"reassemble_stage\.layers\.(\d)\.projection\.", r"reassemble_blocks.projects.\1.conv."),
    (r"reassemble_stage\.layers\.(\d)\.resize\.", r"reassemble_blocks.resize_layers.\1."),
    (r"reassemble_stage\.readout_projects\.", "reassemble_blocks.readout_projects."),
    (r"convs\.(\d)\.weight$", r"convs.\1.conv.weight"),
    (r"fusion_layers\.(\d)\.projection\.", r"fusion_blocks.\1.project.conv."),
    (r"fusion_layers\.(\d)\.residual_layer(\d)\.convolution(\d)\.",
     r"fusion_blocks.\1.res_conv_unit\2.conv\3.conv."),
    (r"conv_depth\.head\.", "conv_depth.head."),
)


def is_hf_chmv2(path: Path) -> bool:
    """A folder whose config.json is a Hugging Face CHMv2 config."""
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.exists()):
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "chmv2"
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _dinov3_repo_files(path: Path) -> tuple[Path, Path] | None:
    """(backbone, decoder) .pth files of a folder in the DINOv3 repository's layout, or None."""
    if not path.is_dir():
        return None
    files = sorted(p for p in path.iterdir() if p.suffix in (".pth", ".pt"))
    backbone = [p for p in files if "sat493m" in p.name or "pretrain" in p.name]
    decoder = [p for p in files if "chmv2" in p.name or "dpt_head" in p.name]
    if len(backbone) == 1 and len(decoder) == 1 and backbone != decoder:
        return backbone[0], decoder[0]
    return None


def chmv2_config_from_hf(hf: dict, preprocessor: dict | None, source: str) -> HeightModelConfig:
    """Our config for a Hugging Face ``CHMv2Config`` dict (and its image processor's)."""
    def need(ok: bool, field: str, what: str):
        if not ok:
            raise CheckpointError(f"{source}: {field} = {what} is not supported")

    bb = hf.get("backbone_config") or {}
    get = bb.get
    need(bb.get("model_type", "dinov3_vit") == "dinov3_vit", "backbone_config.model_type",
         repr(bb.get("model_type")))
    need(not get("use_gated_mlp", False), "backbone_config.use_gated_mlp", "true (SwiGLU)")
    need(get("hidden_act", "gelu") == "gelu", "backbone_config.hidden_act", repr(get("hidden_act")))
    need(get("apply_layernorm", True), "backbone_config.apply_layernorm", "false")
    need(get("return_class_token", True), "backbone_config.return_class_token", "false")
    need(hf.get("readout_type", "project") == "project", "readout_type",
         repr(hf.get("readout_type")))
    need([float(f) for f in hf.get("reassemble_factors", [4, 2, 1, 0.5])] == [4.0, 2.0, 1.0, 0.5],
         "reassemble_factors", str(hf.get("reassemble_factors")))
    bins = hf.get("bins_strategy", "chmv2_mixlog"), hf.get("norm_strategy", "chmv2_mixlog")
    need(bins in {("chmv2_mixlog", "chmv2_mixlog"), ("linear", "linear"), ("log", "linear")},
         "bins_strategy/norm_strategy", "/".join(bins))
    width, depth = int(get("hidden_size", 1024)), int(get("num_hidden_layers", 24))
    heads = int(get("num_attention_heads", 16))
    taps = [int(i) for i in get("out_indices", [6, 12, 18, 24])]
    need(len(taps) == 4 and all(1 <= i <= depth for i in taps), "backbone_config.out_indices",
         str(taps))
    patch = get("patch_size", 16)
    need(isinstance(patch, int) and patch == int(hf.get("patch_size", patch)),
         "backbone_config.patch_size", repr(patch))
    backbone = ViTConfig(
        embed_dim=width, depth=depth, num_heads=heads, patch_size=int(patch),
        mlp_ratio=int(get("intermediate_size", 4 * width)) / width,
        qkv_bias=bool(get("query_bias", True) or get("key_bias", False) or get("value_bias", True)),
        layerscale_init=float(get("layerscale_value", 1.0)),
        out_indices=tuple(i - 1 for i in taps),  # Hugging Face counts the embeddings as stage 0
        family="dinov3", reg_tokens=int(get("num_register_tokens", 0)),
        rope_theta=float(get("rope_theta", 100.0)), norm_eps=float(get("layer_norm_eps", 1e-5)),
        tap_norm=True)
    post = tuple(int(c) for c in hf.get("post_process_channels", [128, 256, 512, 1024]))
    dec = dict(post_process_channels=post, channels=int(hf.get("fusion_hidden_size", 256)),
               head_hidden=int(hf.get("head_hidden_size", 128)),
               n_bins=int(hf.get("number_output_channels", 256)),
               min_depth=float(hf.get("min_depth", 0.001)), max_depth=float(hf.get("max_depth", 96.0)))
    decoder = chmv2_decoder(**dec)
    if bins[0] != "chmv2_mixlog":  # HF's linear/log bins: the range in metres, no ×8
        decoder = replace(decoder, max_depth=dec["max_depth"], output_scale=1.0,
                          bin_spacing=bins[0], bin_eps=0.1)
    mean, std = CHMV2_MEAN, CHMV2_STD
    if preprocessor:
        need(abs(float(preprocessor.get("rescale_factor", 1 / 255)) * 255 - 1) < 1e-6
             and preprocessor.get("do_rescale", True), "preprocessor rescale",
             "anything but 1/255")
        mean = tuple(float(v) for v in preprocessor.get("image_mean", mean))
        std = tuple(float(v) for v in preprocessor.get("image_std", std))
        need(len(mean) == 3 and len(std) == 3, "preprocessor image_mean/image_std", "not RGB")
    release = width == 1024 and depth == 24 and decoder.n_bins == 256
    return HeightModelConfig(
        name="chmv2" if release else f"chmv2_like_vit{width}x{depth}", version="2",
        backbone=backbone, decoder=decoder, mean=mean, std=std, gsd=MAXAR_GSD,
        source=source, licence=DINOV3_LICENCE)


def chmv2_state_dict_from_hf(sd: dict, source: str) -> dict:
    """A Hugging Face CHMv2 state dict in our names (backbone through the one backbone filter)."""
    head = {k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")}
    backbone = filter_backbone_state_dict(
        {k: v for k, v in sd.items() if k.startswith("backbone.")}, source)
    out = {f"backbone.{k}": v for k, v in backbone.items()}
    for k, v in head.items():
        for pattern, repl in HF_HEAD_NAMES:
            if re.match(pattern, k):
                k = re.sub(pattern, repl, k, count=1)
                break
        out[f"decode_head.{k}"] = v
    other = sorted(k for k in sd if not k.startswith(("head.", "backbone.")))
    out.update({k: sd[k] for k in other})  # left for the strict load to name
    return out


def load_hf_chmv2(path: Path, device="cpu", config_only: bool = False):
    from safetensors.torch import load_file

    try:
        hf = json.loads((path / "config.json").read_text())
        pre_path = path / "preprocessor_config.json"
        pre = json.loads(pre_path.read_text()) if pre_path.exists() else None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read its config ({exc})") from None
    weights = path / "model.safetensors"
    cfg = chmv2_config_from_hf(hf, pre, f"{path.name} (Hugging Face CHMv2)")
    if config_only:
        return cfg
    if not weights.exists():
        raise CheckpointError(f"{path}: folder holds no model.safetensors")
    try:
        sd = load_file(str(weights))
    except Exception as exc:
        raise CheckpointError(f"{weights}: cannot read safetensors ({exc})") from None
    ours = chmv2_state_dict_from_hf(sd, str(weights))
    # only masked-image pretraining uses it; an inference-only export may leave it out
    ours.setdefault("backbone.mask_token", torch.zeros(1, cfg.backbone.embed_dim))
    return model_from_state_dict(cfg, ours, str(weights), device)


def load_dinov3_repo_chmv2(path: Path, files: tuple[Path, Path], device="cpu",
                           config_only: bool = False):
    """CHMv2 from the DINOv3 repository's two files (backbone, decoder)."""
    bb_path, dec_path = files
    raw = read_state_dict(bb_path)
    backbone = filter_backbone_state_dict(raw, str(bb_path))
    periods = next((v for k, v in raw.items() if k.endswith("rope_embed.periods")), None)
    vcfg = vit_config_from_state_dict(backbone, str(bb_path), rope_periods=periods)
    if vcfg.family != "dinov3":
        raise CheckpointError(f"{bb_path}: not a DINOv3 backbone (it has learned positions)")
    dec = strip_prefixes(read_state_dict(dec_path), WRAPPER_PREFIXES_DECODER)
    try:
        post = tuple(int(dec[f"reassemble_blocks.projects.{i}.conv.weight"].shape[0])
                     for i in range(4))
        channels = int(dec["convs.0.conv.weight"].shape[0])
        hidden = int(dec["conv_depth.head.2.weight"].shape[0])
        n_bins = int(dec["conv_depth.head.4.weight"].shape[0])
    except KeyError as exc:
        raise CheckpointError(f"{dec_path}: not a DPT decoder in DINOv2's names (missing "
                              f"{exc.args[0]})") from None
    cfg = HeightModelConfig(
        name="chmv2", version="2", backbone=vcfg,
        decoder=chmv2_decoder(post, channels, hidden, n_bins), mean=CHMV2_MEAN, std=CHMV2_STD,
        gsd=MAXAR_GSD, source=f"{bb_path.name} + {dec_path.name} (DINOv3 repository)",
        licence=DINOV3_LICENCE)
    if config_only:
        return cfg
    sd = {f"backbone.{k}": v for k, v in backbone.items()}
    sd.setdefault("backbone.mask_token", torch.zeros(1, vcfg.embed_dim))
    sd.update({f"decode_head.{k}": v for k, v in dec.items()})
    return model_from_state_dict(cfg, sd, f"{bb_path} + {dec_path}", device)


WRAPPER_PREFIXES_DECODER = ("decoder.", "decode_head.", "module.", "model.")


# ---------------------------------------------------------------------------------------------
# readers


def load_hrch_checkpoint(path: Path, device="cpu") -> HeightModel:
    cached = _dequantised_cache(path)
    if cached is not None and cached.exists():
        sd, compressed = read_state_dict(cached, str(path)), True
    else:
        sd = strip_prefixes(read_state_dict(path, tensors_only=False))
        compressed = any("_packed_params" in k for k in sd)
        if compressed:
            sd = dequantize_state_dict(sd)
            _write_cache(cached, sd)
    cfg = infer_config(sd, source=path.name)
    cfg.source = f"{path.name} ({'dynamic-int8, dequantised' if compressed else 'float'})"
    return model_from_state_dict(cfg, sd, str(path), device)


def _dequantised_cache(path: Path) -> Path | None:
    """Where the float weights of a compressed (dynamic int8) checkpoint are kept once
    dequantised: in canopy's cache folder (never beside the checkpoint, which may be read-only
    or shared), under a name made of the file's path, size and modification time, so a changed
    file is converted again. A compressed ViT-H took 12 s to load, dequantising each time; from
    the cache it is memory-mapped (docs/performance.md)."""
    from canopy.model.auto import cache_dir

    try:
        st = path.stat()
    except OSError:
        return None
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / "checkpoints" / f"{path.stem}-{key[:24]}.pt"


def _write_cache(cached: Path | None, sd: dict) -> None:
    """Best effort (a cache that cannot be written only costs the conversion next time);
    atomic, so a killed process never leaves a half file under the final name."""
    if cached is None:
        return
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.partial")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.contiguous() for k, v in sd.items()}, tmp)
        os.replace(tmp, cached)
    except OSError:
        tmp.unlink(missing_ok=True)


def model_from_state_dict(cfg: HeightModelConfig, sd: dict, source: str, device="cpu"
                          ) -> HeightModel:
    """A :class:`HeightModel` holding ``sd``: built on the meta device and given the tensors as
    they are (memory-mapped from the file where it allows), so loading costs what reading the
    weights costs, not an initialisation of ViT-H's 630 M parameters that the file overwrites."""
    with torch.device("meta"):
        model = HeightModel(cfg)
    load_state_dict_strict(model, sd, source, assign=True)
    model.reset_constants()
    return model.to(device).eval()


def _native_paths(path: Path) -> tuple[Path, Path | None]:
    if path.is_dir():
        if not (path / "model.safetensors").exists() and (path / "model" / "model.safetensors").exists():
            path = path / "model"  # a `canopy train` run folder: its model is in model/
        weights = path / "model.safetensors"
        if not weights.exists():
            raise CheckpointError(f"{path}: folder holds no model.safetensors")
        return weights, path / "config.json"
    sibling = path.with_suffix(".json")
    return path, sibling if sibling.exists() else None


def _native_config(weights: Path, config_path: Path | None, meta: dict) -> HeightModelConfig:
    """The config stored inside the weights file travels with them atomically, so it wins;
    config.json beside it is for people and for files other tools wrote without metadata."""
    source = weights
    try:
        if "config" in meta:
            cfg_dict = json.loads(meta["config"])
        elif config_path is not None and config_path.exists():
            source, cfg_dict = config_path, json.loads(config_path.read_text())
        else:
            raise CheckpointError(f"{weights}: no config.json beside it and none in its metadata")
        return HeightModelConfig.from_dict(cfg_dict)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{source}: config is not valid JSON ({exc.msg})") from None
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{source}: {exc}") from None


def load_native(path: Path, device="cpu") -> HeightModel:
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights, config_path = _native_paths(path)
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(str(weights))
    except Exception as exc:
        raise CheckpointError(f"{weights}: cannot read safetensors ({exc})") from None
    cfg = _native_config(weights, config_path, meta)
    model = model_from_state_dict(cfg, sd, str(weights), device)
    ood_path = weights.with_name(ood.FILE_NAME)
    if ood_path.exists():  # the model's out-of-distribution reference (canopy.model.ood)
        try:
            model.ood = ood.OodReference.load(ood_path)
        except Exception as exc:
            raise CheckpointError(f"{ood_path}: cannot read the OOD reference ({exc})") from None
    return model


def save_native(model: HeightModel, out_dir: str | os.PathLike, model_card: str | None = None) -> Path:
    """Write ``model.safetensors`` (config also in its metadata) + ``config.json`` (+ card)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_json = model.cfg.to_json()
    # config and card first: a folder with weights in it is always a complete model
    (out / "config.json").write_text(cfg_json + "\n")
    if model_card:
        (out / "MODEL_CARD.md").write_text(model_card)
    save_safetensors(model.state_dict(), out / "model.safetensors",
                     metadata={"config": cfg_json, "format": "canopy-height"})
    if getattr(model, "ood", None) is not None:
        model.ood.save(out)
    return out


def load_model(path_or_name, device="cpu") -> HeightModel:
    """Checkpoint path (HRCH .pth, native folder or .safetensors) or a registered name."""
    if isinstance(path_or_name, str) and path_or_name in RANDOM_VARIANTS:
        with torch.random.fork_rng(devices=[]):  # reproducible plumbing, caller's RNG untouched
            torch.manual_seed(0)
            return HeightModel(RANDOM_VARIANTS[path_or_name]()).to(device).eval()
    if path_or_name in (None, "default"):
        if (DEFAULT_MODEL_DIR / "model.safetensors").exists():
            return load_native(DEFAULT_MODEL_DIR, device)
        raise NoDefaultModelError(
            "no trained default model is bundled with this install; pass --checkpoint PATH "
            "(e.g. the HighResCanopyHeight v1 SSLhuge_satellite.pth or compressed_SSLlarge.pth)"
        )
    path = Path(path_or_name)
    if not path.exists():
        names = ", ".join(sorted(RANDOM_VARIANTS))
        raise CheckpointError(f"checkpoint '{path}' not found (random-weight variants: {names})")
    if is_hf_chmv2(path):
        return load_hf_chmv2(path, device)
    if (files := _dinov3_repo_files(path)) is not None:
        return load_dinov3_repo_chmv2(path, files, device)
    if path.is_dir() or path.suffix == ".safetensors":
        return load_native(path, device)
    return load_hrch_checkpoint(path, device)


def has_ood_reference(path_or_name) -> bool:
    """Whether loading this checkpoint gives a model with an out-of-distribution reference (an
    ``ood.safetensors`` beside native weights), without loading it."""
    if isinstance(path_or_name, str) and path_or_name in RANDOM_VARIANTS:
        return False
    if path_or_name in (None, "default"):
        path_or_name = DEFAULT_MODEL_DIR
    path = Path(path_or_name)
    if not (path.is_dir() or path.suffix == ".safetensors") or not path.exists():
        return False
    if is_hf_chmv2(path) or _dinov3_repo_files(path) is not None:
        return False
    return _native_paths(path)[0].with_name(ood.FILE_NAME).exists()


def load_config(path_or_name) -> HeightModelConfig:
    """The model's configuration without building the model (cheap for any size)."""
    if isinstance(path_or_name, str) and path_or_name in RANDOM_VARIANTS:
        return RANDOM_VARIANTS[path_or_name]()
    if path_or_name in (None, "default"):
        path_or_name = DEFAULT_MODEL_DIR if (DEFAULT_MODEL_DIR / "config.json").exists() else None
        if path_or_name is None:
            load_model("default")  # raises the plain "no trained default model" error
    path = Path(path_or_name)
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' not found")
    if is_hf_chmv2(path):
        return load_hf_chmv2(path, config_only=True)
    if (files := _dinov3_repo_files(path)) is not None:
        return load_dinov3_repo_chmv2(path, files, config_only=True)
    if path.is_dir() or path.suffix == ".safetensors":
        from safetensors import safe_open

        weights, config_path = _native_paths(path)
        try:
            with safe_open(str(weights), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as exc:
            raise CheckpointError(f"{weights}: cannot read safetensors ({exc})") from None
        return _native_config(weights, config_path, meta)
    try:  # mmap: shapes only, the tensors are not read
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        obj = None
    if obj is None:
        return load_hrch_checkpoint(path).cfg
    sd = strip_prefixes(unwrap_containers(obj))
    if any("_packed_params" in k for k in sd):
        sd = dequantize_state_dict(sd)
    return infer_config(sd, source=path.name)
