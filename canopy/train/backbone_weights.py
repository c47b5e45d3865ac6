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
from ssl_backbone.vit import DinoViT, ViTConfig

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


def load_backbone(path: str | Path) -> tuple[DinoViT, ViTConfig]:
    """A DinoViT holding the file's weights, and its config (read from the shapes)."""
    from canopy.model.checkpoints import load_state_dict_strict, vit_config_from_state_dict

    source = f"--backbone {path}"
    sd = filter_backbone_state_dict(read_state_dict(path))
    cfg = vit_config_from_state_dict(sd, source)
    vit = DinoViT(cfg)
    if "mask_token" not in sd:  # timm files have none; only iBOT masking uses it
        sd["mask_token"] = torch.zeros_like(vit.mask_token)
    load_state_dict_strict(vit, sd, source)
    return vit, cfg
