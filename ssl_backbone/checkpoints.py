"""Weights files → a backbone of :mod:`ssl_backbone.vit`: reading, key mapping, architecture from shapes, strict load.

Accepted files: ``.safetensors`` or ``.pth``/``.pt`` holding a state dict (possibly under
``state_dict``, ``model`` or ``teacher``) in one of these namings, all mapped by one filter
(timm's ``checkpoint_filter_fn`` idea), :func:`filter_backbone_state_dict`:

* **DINOv2 official** (``dinov2_vits14_pretrain.pth``): ``cls_token``, ``pos_embed``,
  ``mask_token``, ``patch_embed.proj.*``, ``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,
  mlp.fc1,mlp.fc2,ls2.gamma}``, ``norm.*``; FSDP-chunked files say ``blocks.C.N.*`` instead.
* **timm** (``vit_small_patch14_dinov2``): the same names (timm mirrors DINOv2), no
  ``mask_token`` (filled with zeros), perhaps a classifier ``head.*`` (dropped).
* **canopy / SSL runs**: the ``backbone.*`` entries of a height model or of a pretraining run
  (prefix stripped; ``decode_head.*`` and SSL heads are ignored).
* **DINOv3 official** (``dinov3_vitl16_pretrain_sat493m-*.pth``): DINOv2's names plus
  ``storage_tokens`` (registers), ``rope_embed.periods`` (from which the RoPE base is read),
  ``qkv.bias_mask`` (applied to ``qkv.bias``) and ``local_cls_norm`` (training only, dropped).
* **Hugging Face** ``DINOv3ViTModel`` (and the ``backbone.*`` of ``CHMv2ForDepthEstimation``):
  ``embeddings.*``, ``layer.N.attention.{q,k,v,o}_proj``, ``layer_scale{1,2}.lambda1``,
  ``mlp.{up,down}_proj``; q/k/v are joined into one ``qkv`` (a bias the config leaves out is
  zero, which is what leaving it out means).
* **timm Eva** (``vit_large_patch16_dinov3``): ``reg_token``, ``gamma_{1,2}``, separate
  ``q_bias``/``v_bias`` (key bias zero).

The ``dinov3`` family (no ``pos_embed``: positions are rotary) is told apart from ``dinov2`` by
the tensors, not the file name.

Wrappers that training tools put around every key (DDP's ``module.``, Lightning's
``chm_module_.``, ``model.``, ``teacher.``…) are one list, :data:`WRAPPER_PREFIXES`, used here
and by the height-model reader in ``canopy.model.checkpoints``.

Invariant: a file either loads into a backbone whose every tensor comes from the file (only a
missing ``mask_token`` is filled with zeros, and absent q/k/v/proj biases of a Hugging Face file
with zeros) or raises one :class:`~ssl_backbone.errors.CheckpointError` naming the file and what
does not fit.
Why it holds: the architecture is read from tensor shapes, never from the file name
(:func:`vit_config_from_state_dict`: width from ``cls_token``, depth from the block indices,
patch size from ``patch_embed.proj.weight`` — 14 for official DINOv2, 16 for HRCH and DINOv3 —
the position grid from ``pos_embed``, registers from ``reg_token``, MLP ratio from ``fc1``, 64
channels per head as in every DINOv2/DINOv3/timm ViT), and the load is strict
(:func:`load_state_dict_strict` lists every missing, unexpected and mis-shaped key at once
instead of loading what happens to fit).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ssl_backbone.errors import CheckpointError
from ssl_backbone.vit import ViTConfig, build_vit, default_out_indices

#: Input band counts a backbone may take: RGB, or RGB + near-infrared.
INPUT_BANDS = (3, 4)
#: Prefixes tools wrap around every key of a state dict; stripped wherever a file is read.
WRAPPER_PREFIXES = ("chm_module_.", "module.", "teacher.", "student.", "model.", "encoder.")
#: Containers a state dict may sit in, tried in this order.
CONTAINER_KEYS = ("state_dict", "model", "teacher")
#: Entries of SSL runs and classifiers that are not part of the backbone.
IGNORED = re.compile(r"^(head\.|fc_norm\.|decode_head\.|dino_head\.|ibot_head\.|dino_loss\.|"
                     r"ibot_patch_loss\.|local_cls_norm\.|features_to_depth\.)")


def read_state_dict(path: str | Path, source: str | None = None, *,
                    tensors_only: bool = True) -> dict:
    """The state dict in a ``.safetensors`` or torch file, unwrapped from its containers.

    ``source`` names the file in errors (default: the path). ``tensors_only=False`` lets
    through non-tensor entries (the packed parameters of dynamically quantised models).
    """
    path = Path(path)
    source = source or str(path)
    if not path.exists():
        raise CheckpointError(f"{source}: file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"{source}: cannot read safetensors ({exc})") from None
    else:
        try:
            # memory-mapped: tensors are read from the file when first touched, not copied up
            # front (3.2 s of a ViT-H checkpoint's load); files in torch's old format cannot be
            # mapped and are read whole
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle errors, truncated files, non-torch files
            raise CheckpointError(f"{source}: cannot read as a PyTorch checkpoint "
                                  f"({type(exc).__name__})") from None
        sd = unwrap_containers(sd)
    if not isinstance(sd, dict) or not sd or (
            tensors_only and not all(isinstance(v, torch.Tensor) for v in sd.values())):
        raise CheckpointError(f"{source}: no state dict{' of tensors' if tensors_only else ''} inside")
    return sd


def unwrap_containers(obj):
    """The state dict inside a training file's containers (``{'state_dict': {...}}`` etc.)."""
    for key in CONTAINER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    return obj


def strip_prefixes(sd: dict, prefixes=WRAPPER_PREFIXES, ignored: re.Pattern | None = None) -> dict:
    """Remove each prefix that every key carries (keys matching ``ignored`` aside), repeatedly,
    since wrappers nest (``module.backbone.*``)."""
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            has = [k.startswith(prefix) for k in sd]
            if any(has) and all(h or (ignored is not None and ignored.match(k))
                                for k, h in zip(sd, has)):
                sd = {k[len(prefix):] if h else k: v for (k, v), h in zip(sd.items(), has)}
                changed = True
    return sd


def filter_backbone_state_dict(sd: dict[str, torch.Tensor], source: str = "backbone"
                               ) -> dict[str, torch.Tensor]:
    """Map any of the namings in the module docstring onto our backbones' keys."""
    # a full canopy model (or a Hugging Face CHMv2 model): keep its backbone only
    if any(k.startswith("backbone.") for k in sd) and any(
            k.startswith(("decode_head.", "head.")) for k in sd):
        sd = {k: v for k, v in sd.items() if k.startswith("backbone.")}
    sd = strip_prefixes(sd, WRAPPER_PREFIXES + ("backbone.",), IGNORED)
    if "embeddings.patch_embeddings.weight" in sd:
        sd = _from_hf_dinov3(sd, source)
    out = {}
    for k, v in sd.items():
        if IGNORED.match(k) or k.endswith(".bias_mask") or k.startswith("rope_embed."):
            continue
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)  # FSDP block chunks
        if k.endswith("attn.qkv.bias") and f"{k}_mask" in sd:
            # DINOv3 masks its key bias (LinearKMaskedBias): the mask is part of the weights
            v = v * sd[f"{k}_mask"].to(v.dtype)
        if k == "storage_tokens":  # DINOv3's registers
            k = "reg_token"
        k = re.sub(r"^(blocks\.\d+\.)ls([12])\.gamma$", r"\1gamma_\2", k) \
            if "pos_embed" not in sd else k  # dinov3 family: timm Eva's LayerScale names
        out[k] = v
    if "pos_embed" not in out:
        _join_eva_qkv_biases(out)
    if "mask_token" in out and out["mask_token"].ndim == 3:  # [1, 1, D] (Hugging Face)
        out["mask_token"] = out["mask_token"].reshape(1, -1)
    return out


def _from_hf_dinov3(sd: dict, source: str) -> dict:
    """Hugging Face ``DINOv3ViTModel`` names → DINOv3/timm names (see the module docstring)."""
    if any(".mlp.gate_proj." in k for k in sd):
        raise CheckpointError(f"{source}: gated (SwiGLU) MLP blocks (DINOv3 ViT-H+/7B) are not "
                              "supported")
    out = {}
    simple = {"embeddings.cls_token": "cls_token", "embeddings.register_tokens": "reg_token",
              "embeddings.mask_token": "mask_token",
              "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
              "embeddings.patch_embeddings.bias": "patch_embed.proj.bias"}
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k in simple:
            out[simple[k]] = v
        elif m := re.match(r"^(?:model\.)?layer\.(\d+)\.(.+)$", k):
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = v
        else:
            out[k] = v  # norm.*, anything else is judged by the strict load
    rename = {"norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
              "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
              "layer_scale1.lambda1": "gamma_1", "layer_scale2.lambda1": "gamma_2",
              "mlp.up_proj.weight": "mlp.fc1.weight", "mlp.up_proj.bias": "mlp.fc1.bias",
              "mlp.down_proj.weight": "mlp.fc2.weight", "mlp.down_proj.bias": "mlp.fc2.bias",
              "attention.o_proj.weight": "attn.proj.weight", "attention.o_proj.bias": "attn.proj.bias"}
    for i, b in blocks.items():
        pre = f"blocks.{i}."
        try:
            q, k_, v = (b.pop(f"attention.{n}_proj.weight") for n in "qkv")
        except KeyError as exc:
            raise CheckpointError(f"{source}: layer {i} lacks {exc.args[0]}") from None
        out[pre + "attn.qkv.weight"] = torch.cat([q, k_, v])
        biases = [b.pop(f"attention.{n}_proj.bias", None) for n in "qkv"]
        if any(x is not None for x in biases):
            out[pre + "attn.qkv.bias"] = torch.cat(
                [x if x is not None else q.new_zeros(q.shape[0]) for x in biases])
        if "attention.o_proj.bias" not in b:
            b["attention.o_proj.bias"] = b["attention.o_proj.weight"].new_zeros(
                b["attention.o_proj.weight"].shape[0])
        for name, v in b.items():
            out[pre + rename.get(name, name)] = v
    return out


def _join_eva_qkv_biases(sd: dict) -> None:
    """timm Eva's separate ``q_bias``/``v_bias`` (key bias fixed at zero) → one ``qkv.bias``."""
    for k in [k for k in sd if k.endswith(".attn.q_bias")]:
        pre = k[: -len("q_bias")]
        q = sd.pop(k)
        v = sd.pop(pre + "v_bias", torch.zeros_like(q))
        sd[pre + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])


def vit_config_from_state_dict(sd: dict[str, torch.Tensor], source: str = "backbone",
                               rope_periods: torch.Tensor | None = None) -> ViTConfig:
    """The ViT architecture implied by the tensors' shapes (our keys, after
    :func:`filter_backbone_state_dict`, no ``backbone.`` prefix): one reader for height-model
    checkpoints, native files and backbone weights. ``rope_periods`` (a DINOv3 file's
    ``rope_embed.periods``) gives the RoPE base; without it DINOv3's 100 is assumed."""
    if any(".mlp.w12." in k or ".mlp.w3." in k for k in sd):
        raise CheckpointError(f"{source}: SwiGLU MLP blocks (DINOv2 ViT-g, DINOv3 ViT-H+/7B) "
                              "are not supported")
    if "cls_norm.weight" in sd:
        raise CheckpointError(f"{source}: a separate CLS-token norm (DINOv3's "
                              "untie_cls_and_patch_norms) is not supported")
    dinov3 = "pos_embed" not in sd
    if not dinov3 and ("register_tokens" in sd or "reg_token" in sd):
        raise CheckpointError(f"{source}: DINOv2 ViTs with register tokens are not supported "
                              "(dinov2-family backbones have a CLS token only)")
    try:
        cls = sd["cls_token"]
        patch = sd["patch_embed.proj.weight"]
        fc1 = sd["blocks.0.mlp.fc1.weight"]
        pos = None if dinov3 else sd["pos_embed"]
    except KeyError as exc:
        raise CheckpointError(
            f"{source}: not a ViT backbone (missing {exc.args[0]}); expected DINOv2, DINOv3, "
            "timm, Hugging Face or canopy 'backbone.*' naming") from None
    embed_dim = int(cls.shape[-1])
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1
    if blocks != set(range(depth)):
        raise CheckpointError(f"{source}: blocks {sorted(set(range(depth)) - blocks)} are missing")
    if patch.shape[1] not in INPUT_BANDS or patch.shape[-1] != patch.shape[-2]:
        raise CheckpointError(f"{source}: patch embedding {tuple(patch.shape)} is not a square "
                              "kernel over 3 (RGB) or 4 (RGB + near-infrared) bands")
    if embed_dim % 64:
        raise CheckpointError(f"{source}: width {embed_dim} is not a multiple of 64 (head size)")
    common = dict(embed_dim=embed_dim, depth=depth, num_heads=embed_dim // 64,
                  patch_size=int(patch.shape[-1]), mlp_ratio=int(fc1.shape[0]) / embed_dim,
                  qkv_bias="blocks.0.attn.qkv.bias" in sd, in_chans=int(patch.shape[1]))
    if dinov3:
        regs = sd.get("reg_token")
        return ViTConfig(
            **common, family="dinov3", reg_tokens=int(regs.shape[1]) if regs is not None else 0,
            rope_theta=rope_base(rope_periods, 64) if rope_periods is not None else 100.0,
            layerscale_init=1e-5 if "blocks.0.gamma_1" in sd else None, norm_eps=1e-5,
            tap_norm=True, out_indices=dinov3_out_indices(depth))
    n_pos = int(pos.shape[1]) - 1
    grid = int(round(n_pos ** 0.5))
    if grid * grid != n_pos:
        raise CheckpointError(f"{source}: pos_embed has {n_pos + 1} entries; expected CLS + a "
                              "square grid")
    return ViTConfig(
        **common, pos_grid=grid,
        layerscale_init=1.0 if "blocks.0.ls1.gamma" in sd else None,
        out_indices=default_out_indices(depth),
    )


def dinov3_out_indices(depth: int) -> tuple[int, ...]:
    """DINOv3's dense-task taps ("four even intervals"): the last block of each quarter
    (5, 11, 17, 23 for 24 blocks: CHMv2's)."""
    if depth < 4:
        return tuple(range(depth))
    return tuple(i * depth // 4 - 1 for i in range(1, 5))


def rope_base(periods: torch.Tensor, head_dim: int) -> float:
    """The RoPE base period from DINOv3's stored ``periods`` (base^(4i/head_dim), i = 0…):
    stored in bf16 by the release, so rounded to 3 significant digits."""
    import math

    p = periods.float().flatten()
    if p.numel() < 2 or not bool(torch.isfinite(p).all()) or float(p[-1]) <= 1.0:
        return 100.0
    exponent = 4.0 * (p.numel() - 1) / head_dim
    base = float(p[-1]) ** (1.0 / exponent)
    return float(f"{base:.3g}") if math.isfinite(base) else 100.0


def first_nonfinite(sd: dict) -> str | None:
    """The first key (sorted) of a state dict whose floating tensor holds NaN or ±inf, or None.

    One reduction per tensor: NaN and ±inf survive a sum (a float32 sum of finite weights would
    need values near 1e38 to overflow); ``isfinite().all()`` took 7.8 s on a ViT-H, this 0.1."""
    return next((k for k in sorted(sd) if sd[k].is_floating_point()
                 and not bool(torch.isfinite(sd[k].sum()))), None)


def load_state_dict_strict(module: nn.Module, sd: dict, source: str, *, assign: bool = False
                           ) -> None:
    """Strict load with one readable error listing missing/unexpected keys and shape mismatches,
    or naming the first tensor that holds NaN or infinite values (a diverged training run: its
    maps would be all NaN, so it is refused when loaded rather than after hours of prediction)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = sorted(
        f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(sd) if tuple(sd[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or mismatched:
        def show(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if mismatched:
            parts.append(f"mismatched shapes: {show(mismatched)}")
        raise CheckpointError(f"{source}: checkpoint does not match the model; " + "; ".join(parts))
    broken = first_nonfinite(sd)
    if broken is not None:
        raise CheckpointError(f"{source}: weights hold NaN or infinite values ({broken}); the "
                              "run that wrote them diverged")
    # assign: the module was built on the meta device and takes the file's tensors as they are
    # (no random init, no copy: 16 s of a ViT-H model's 21 s load went to initialising weights
    # that were then overwritten)
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()},
                           assign=assign)


def load_backbone(path: str | Path, source: str | None = None, in_chans: int | None = None):
    """A backbone (DinoViT or Dinov3ViT) holding the file's weights, and its config (read from
    the shapes). ``source`` names the file in errors (default: the path). ``in_chans``: the
    bands the caller feeds; an RGB backbone grows a near-infrared input
    (:func:`grow_input_channels`), any other mismatch is refused."""
    source = source or str(path)
    vit, cfg = _load_backbone(path, source)
    if in_chans is None or in_chans == cfg.in_chans:
        return vit, cfg
    if cfg.in_chans == 3 and in_chans in INPUT_BANDS:
        vit = grow_input_channels(vit, in_chans)
        return vit, vit.cfg
    raise CheckpointError(f"{source}: takes {cfg.in_chans} input bands, not {in_chans} (a "
                          "4-band backbone cannot read RGB alone)")


def grow_input_channels(vit: nn.Module, in_chans: int) -> nn.Module:
    """The same backbone with ``in_chans`` input bands: its RGB patch-embedding kernels are
    kept and each added band's kernel is their mean over R, G and B, so a near-infrared band
    starts as one more brightness-like channel. Normalised as :func:`ssl_backbone.vit.per_band`
    says, an added band at its mean value is 0 and adds nothing: the grown backbone starts with
    the RGB one's features. Every other tensor is copied unchanged."""
    from dataclasses import replace

    old = vit.cfg.in_chans
    if in_chans < old:
        raise ValueError(f"cannot shrink a {old}-band backbone to {in_chans} bands")
    grown = build_vit(replace(vit.cfg, in_chans=in_chans))
    sd = vit.state_dict()
    w = sd["patch_embed.proj.weight"]
    extra = w.mean(dim=1, keepdim=True).expand(-1, in_chans - old, -1, -1)
    sd["patch_embed.proj.weight"] = torch.cat([w, extra], dim=1)
    grown.load_state_dict(sd)
    return grown


def _load_backbone(path: str | Path, source: str):
    raw = read_state_dict(path, source)
    sd = filter_backbone_state_dict(raw, source)
    periods = next((v for k, v in raw.items() if k.endswith("rope_embed.periods")), None)
    cfg = vit_config_from_state_dict(sd, source, rope_periods=periods)
    vit = build_vit(cfg)
    if "mask_token" not in sd:  # timm files have none; only masked-image training uses it
        sd["mask_token"] = torch.zeros_like(vit.mask_token)
    load_state_dict_strict(vit, sd, source)
    return vit, cfg


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` to ``path`` as safetensors, atomically (a temporary name in the same
    folder, fsynced, then renamed), with the permissions of any file this user makes
    (0666 minus the umask). safetensors itself creates its file 0600: a model written for a
    team, or served, must be readable by it."""
    import os
    import uuid

    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _umask() -> int:
    import os

    try:  # Linux reports it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting (another thread could see 022 briefly)
    os.umask(mask)
    return mask

