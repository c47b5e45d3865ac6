"""Weights files → :class:`~ssl_backbone.vit.DinoViT`: reading, key mapping, architecture from shapes, strict load.

Accepted files: ``.safetensors`` or ``.pth``/``.pt`` holding a state dict (possibly under
``state_dict``, ``model`` or ``teacher``) in one of three namings, all mapped by one filter
(timm's ``checkpoint_filter_fn`` idea):

* **DINOv2 official** (``dinov2_vits14_pretrain.pth``): ``cls_token``, ``pos_embed``,
  ``mask_token``, ``patch_embed.proj.*``, ``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,
  mlp.fc1,mlp.fc2,ls2.gamma}``, ``norm.*``; FSDP-chunked files say ``blocks.C.N.*`` instead.
* **timm** (``vit_small_patch14_dinov2``): the same names (timm mirrors DINOv2), no
  ``mask_token`` (filled with zeros), perhaps a classifier ``head.*`` (dropped).
* **canopy / SSL runs**: the ``backbone.*`` entries of a height model or of a pretraining run
  (prefix stripped; ``decode_head.*`` and SSL heads are ignored).

Wrappers that training tools put around every key (DDP's ``module.``, Lightning's
``chm_module_.``, ``model.``, ``teacher.``…) are one list, :data:`WRAPPER_PREFIXES`, used here
and by the height-model reader in ``canopy.model.checkpoints``.

Invariant: a file either loads into a DinoViT whose every tensor comes from the file (only a
missing ``mask_token`` is filled with zeros) or raises one
:class:`~ssl_backbone.errors.CheckpointError` naming the file and what does not fit.
Why it holds: the architecture is read from tensor shapes, never from the file name
(:func:`vit_config_from_state_dict`: width from ``cls_token``, depth from the block indices,
patch size from ``patch_embed.proj.weight`` — 14 for official DINOv2, 16 for HRCH — the
position grid from ``pos_embed``, which is resized to the token grid on every call, MLP ratio
from ``fc1``, 64 channels per head as in every DINOv2/timm ViT), and the load is strict
(:func:`load_state_dict_strict` lists every missing, unexpected and mis-shaped key at once
instead of loading what happens to fit).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ssl_backbone.errors import CheckpointError
from ssl_backbone.vit import DinoViT, ViTConfig, default_out_indices

#: Prefixes tools wrap around every key of a state dict; stripped wherever a file is read.
WRAPPER_PREFIXES = ("chm_module_.", "module.", "teacher.", "student.", "model.", "encoder.")
#: Containers a state dict may sit in, tried in this order.
CONTAINER_KEYS = ("state_dict", "model", "teacher")
#: Entries of SSL runs and classifiers that are not part of the backbone.
IGNORED = re.compile(r"^(head\.|fc_norm\.|decode_head\.|dino_head\.|ibot_head\.|dino_loss\.|"
                     r"ibot_patch_loss\.)")


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


def filter_backbone_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map any of the three namings onto DinoViT's keys (see the module docstring)."""
    # a full canopy model: keep its backbone only
    if any(k.startswith("backbone.") for k in sd) and any(k.startswith("decode_head.") for k in sd):
        sd = {k: v for k, v in sd.items() if k.startswith("backbone.")}
    sd = strip_prefixes(sd, WRAPPER_PREFIXES + ("backbone.",), IGNORED)
    out = {}
    for k, v in sd.items():
        if IGNORED.match(k):
            continue
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)  # FSDP block chunks
        out[k] = v
    return out


def vit_config_from_state_dict(sd: dict[str, torch.Tensor], source: str = "backbone") -> ViTConfig:
    """The ViT architecture implied by the tensors' shapes (DinoViT keys, no ``backbone.``
    prefix): one reader for height-model checkpoints, native files and backbone weights."""
    if "register_tokens" in sd or "reg_token" in sd:
        raise CheckpointError(f"{source}: ViTs with register tokens are not supported "
                              "(the HRCH-style backbone has a CLS token only)")
    if any(".mlp.w12." in k for k in sd):
        raise CheckpointError(f"{source}: SwiGLU MLP blocks (DINOv2 ViT-g) are not supported")
    try:
        cls = sd["cls_token"]
        pos = sd["pos_embed"]
        patch = sd["patch_embed.proj.weight"]
        fc1 = sd["blocks.0.mlp.fc1.weight"]
    except KeyError as exc:
        raise CheckpointError(
            f"{source}: not a ViT backbone (missing {exc.args[0]}); expected DINOv2, timm or "
            "canopy 'backbone.*' naming") from None
    embed_dim = int(cls.shape[-1])
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1
    if blocks != set(range(depth)):
        raise CheckpointError(f"{source}: blocks {sorted(set(range(depth)) - blocks)} are missing")
    n_pos = int(pos.shape[1]) - 1
    grid = int(round(n_pos ** 0.5))
    if grid * grid != n_pos:
        raise CheckpointError(f"{source}: pos_embed has {n_pos + 1} entries; expected CLS + a "
                              "square grid")
    if patch.shape[1] != 3 or patch.shape[-1] != patch.shape[-2]:
        raise CheckpointError(f"{source}: patch embedding {tuple(patch.shape)} is not a square "
                              "3-channel (RGB) kernel")
    if embed_dim % 64:
        raise CheckpointError(f"{source}: width {embed_dim} is not a multiple of 64 (head size)")
    return ViTConfig(
        embed_dim=embed_dim, depth=depth, num_heads=embed_dim // 64,
        patch_size=int(patch.shape[-1]), pos_grid=grid,
        mlp_ratio=int(fc1.shape[0]) / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
        layerscale_init=1.0 if "blocks.0.ls1.gamma" in sd else None,
        out_indices=default_out_indices(depth),
    )


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


def load_backbone(path: str | Path, source: str | None = None) -> tuple[DinoViT, ViTConfig]:
    """A DinoViT holding the file's weights, and its config (read from the shapes). ``source``
    names the file in errors (default: the path)."""
    source = source or str(path)
    sd = filter_backbone_state_dict(read_state_dict(path, source))
    cfg = vit_config_from_state_dict(sd, source)
    vit = DinoViT(cfg)
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

