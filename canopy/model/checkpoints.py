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

import torch

from canopy.errors import CheckpointError, NoDefaultModelError
from canopy.model.config import HeightModelConfig, hrch_config, micro_config
from canopy.model.dpt import DPTConfig
from canopy.model.height_model import HeightModel
from ssl_backbone.checkpoints import (
    load_state_dict_strict, read_state_dict, save_safetensors, strip_prefixes, unwrap_containers,
    vit_config_from_state_dict)

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
DEFAULT_MODEL_DIR = WEIGHTS_DIR / "default"

# Random-weight variants, for plumbing and speed tests only (config.trained is False).
RANDOM_VARIANTS = {
    "micro": micro_config,
    "hrch_v1_large_random": lambda: _untrained(hrch_config("large")),
    "hrch_v1_huge_random": lambda: _untrained(hrch_config("huge")),
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
                             source=source)


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
    return model_from_state_dict(cfg, sd, str(weights), device)


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
    if path.is_dir() or path.suffix == ".safetensors":
        return load_native(path, device)
    return load_hrch_checkpoint(path, device)


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
