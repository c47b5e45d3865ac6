"""``canopy train --backbone FILE``: backbone-only weights → a :class:`DinoViT`, config from shapes.

Accepted files: ``.safetensors`` or ``.pth``/``.pt`` holding a state dict (possibly under
``state_dict``, ``model`` or ``teacher``) in one of three namings, all mapped by one filter
(timm's ``checkpoint_filter_fn`` idea):

* **DINOv2 official** (``dinov2_vits14_pretrain.pth``): ``cls_token``, ``pos_embed``,
  ``mask_token``, ``patch_embed.proj.*``, ``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,
  mlp.fc1,mlp.fc2,ls2.gamma}``, ``norm.*``; FSDP-chunked files say ``blocks.C.N.*`` instead.
* **timm** (``vit_small_patch14_dinov2``): the same names (timm mirrors DINOv2), no
  ``mask_token`` (filled with zeros), perhaps a classifier ``head.*`` (dropped).
* **ours**: the ``backbone.*`` entries of a canopy model or of an SSL run (prefix stripped;
  ``decode_head.*`` and SSL heads are ignored).

The architecture is read from tensor shapes: width from ``cls_token``, depth from the block
indices, patch size from ``patch_embed.proj.weight`` (14 for official DINOv2, 16 for HRCH), the
position grid from ``pos_embed`` (37×37 for DINOv2's 518-px training size: it is resized to the
token grid on every call), MLP ratio from ``fc1``; heads assume 64 channels each, as every
DINOv2/timm ViT does. Anything that does not fit raises one ``CheckpointError``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from canopy.errors import CheckpointError
from ssl_backbone.vit import DinoViT, ViTConfig, default_out_indices

PREFIXES = ("module.", "teacher.", "student.", "model.", "backbone.", "encoder.")
IGNORED = re.compile(r"^(head\.|fc_norm\.|decode_head\.|dino_head\.|ibot_head\.|dino_loss\.|"
                     r"ibot_patch_loss\.)")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or torch file, unwrapped from the usual containers."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"--backbone {path}: file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as exc:
            raise CheckpointError(f"--backbone {path}: cannot read safetensors ({exc})") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"--backbone {path}: cannot read as a PyTorch checkpoint "
                                  f"({type(exc).__name__})") from None
        for key in ("state_dict", "model", "teacher"):
            if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                sd = sd[key]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"--backbone {path}: no state dict of tensors inside")
    return sd


def filter_backbone_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map any of the three namings onto DinoViT's keys (see the module docstring)."""
    # a full canopy model: keep its backbone only
    if any(k.startswith("backbone.") for k in sd) and any(k.startswith("decode_head.") for k in sd):
        sd = {k: v for k, v in sd.items() if k.startswith("backbone.")}
    changed = True
    while changed:  # wrappers may nest (module.backbone.*)
        changed = False
        for prefix in PREFIXES:
            if sd and all(k.startswith(prefix) or IGNORED.match(k) for k in sd) and \
                    any(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}
                changed = True
    out = {}
    for k, v in sd.items():
        if IGNORED.match(k):
            continue
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)  # FSDP block chunks
        out[k] = v
    return out


def config_from_state_dict(sd: dict[str, torch.Tensor], source: str = "backbone") -> ViTConfig:
    """The ViT architecture implied by the tensors' shapes."""
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


def load_backbone(path: str | Path) -> tuple[DinoViT, ViTConfig]:
    """A DinoViT holding the file's weights, and its config (read from the shapes)."""
    from canopy.model.checkpoints import load_state_dict_strict

    source = f"--backbone {path}"
    sd = filter_backbone_state_dict(read_state_dict(path))
    cfg = config_from_state_dict(sd, source)
    vit = DinoViT(cfg)
    if "mask_token" not in sd:  # timm files have none; only iBOT masking uses it
        sd["mask_token"] = torch.zeros_like(vit.mask_token)
    load_state_dict_strict(vit, sd, source)
    return vit, cfg
