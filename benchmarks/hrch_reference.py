"""The released HighResCanopyHeight forward pass, restated as plain functions of a state dict.

Written from docs/reference_model.md, independently of our model code (no timm, no
``canopy.model`` modules): the parity tests (tests/test_model.py) check our timm backbone and
DPT head against it, and ``benchmarks/engine_vs_reference.py`` times it, so the benchmark's
reference computes what a user of the released code computes, in the released way: attention as
explicit ``q @ kᵀ → softmax → @ v`` matmuls, the per-bin logits materialised, the normalised bin
weights ``(relu(l) + 0.1) / Σ`` then their expected value.

The architecture (depth, heads, taps, bins) comes from a :class:`canopy.model.config.
HeightModelConfig`, the only thing read from our code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BIN_EPS = 0.1  # the released head's (relu(l) + 0.1) bin weights


def released_taps(sd: dict, cfg, x: torch.Tensor, prefix: str = "") -> list:
    """The backbone's four (patch map [B, D, h, w], CLS [B, D]) taps for normalised ``x``.

    Manual attention, LayerScale, and the position table resized with
    ``interpolate(scale_factor=(h + 0.1) / n, bicubic, align_corners=True,
    recompute_scale_factor=True)`` as the released DINOv2 code does. ``sd`` holds the
    backbone's weights under ``prefix`` (``"backbone."`` in a whole-model state dict)."""
    D, heads, p = cfg.embed_dim, cfg.num_heads, cfg.patch_size
    B, _, H, W = x.shape
    h, w = H // p, W // p

    def g(name):
        return sd[prefix + name]

    tok = F.conv2d(x, g("patch_embed.proj.weight"), g("patch_embed.proj.bias"), stride=p)
    tok = tok.flatten(2).transpose(1, 2)
    tok = torch.cat([g("cls_token").expand(B, -1, -1), tok], 1)
    pos = g("pos_embed")
    n = int(math.sqrt(pos.shape[1] - 1))
    grid = pos[:, 1:].reshape(1, n, n, D).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h + 0.1) / n, (w + 0.1) / n), mode="bicubic",
                         align_corners=True, recompute_scale_factor=True)
    pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h * w, D)], 1)
    z = tok + pos
    taps = []
    for i in range(cfg.depth):
        def b(name, i=i):
            return g(f"blocks.{i}.{name}")

        y = F.layer_norm(z, (D,), b("norm1.weight"), b("norm1.bias"), eps=1e-6)
        qkv = F.linear(y, b("attn.qkv.weight"), b("attn.qkv.bias"))
        qkv = qkv.reshape(B, -1, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (D // heads) ** -0.5, qkv[1], qkv[2]
        att = (q @ k.transpose(-2, -1)).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, -1, D)
        z = z + b("ls1.gamma") * F.linear(y, b("attn.proj.weight"), b("attn.proj.bias"))
        y = F.layer_norm(z, (D,), b("norm2.weight"), b("norm2.bias"), eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, b("mlp.fc1.weight"), b("mlp.fc1.bias"))),
                     b("mlp.fc2.weight"), b("mlp.fc2.bias"))
        z = z + b("ls2.gamma") * y
        if i in cfg.out_indices:
            taps.append((z[:, 1:].reshape(B, h, w, D).permute(0, 3, 1, 2), z[:, 0]))
    return taps


def released_decoder(sd: dict, taps) -> torch.Tensor:
    """The DPT head's per-bin logits [B, K, H, W] from the taps: CLS readout 'project' → 1×1
    conv → resize ×4/×2/×1/×½ → 3×3 conv (no bias) → fusion from coarsest to finest
    (pre-activation residual units, bilinear ×2 align_corners=True, 1×1 projection) → 3×3 conv +
    ReLU → head (3×3, ×2, 3×3, ReLU, 1×1)."""
    def g(name):
        return sd[f"decode_head.{name}"]

    maps = []
    for i, (x, cls) in enumerate(taps):
        b, d, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = torch.cat([t, cls[:, None].expand_as(t)], -1)
        t = F.gelu(F.linear(t, g(f"reassemble_blocks.readout_projects.{i}.0.weight"),
                            g(f"reassemble_blocks.readout_projects.{i}.0.bias")))
        y = t.transpose(1, 2).reshape(b, d, h, w)
        y = F.conv2d(y, g(f"reassemble_blocks.projects.{i}.conv.weight"),
                     g(f"reassemble_blocks.projects.{i}.conv.bias"))
        if i == 0:
            y = F.conv_transpose2d(y, g("reassemble_blocks.resize_layers.0.weight"),
                                   g("reassemble_blocks.resize_layers.0.bias"), stride=4)
        elif i == 1:
            y = F.conv_transpose2d(y, g("reassemble_blocks.resize_layers.1.weight"),
                                   g("reassemble_blocks.resize_layers.1.bias"), stride=2)
        elif i == 3:
            y = F.conv2d(y, g("reassemble_blocks.resize_layers.3.weight"),
                         g("reassemble_blocks.resize_layers.3.bias"), stride=2, padding=1)
        maps.append(F.conv2d(y, g(f"convs.{i}.conv.weight"), padding=1))

    def rcu(x, prefix):
        y = F.conv2d(F.relu(x), g(f"{prefix}.conv1.conv.weight"), padding=1)
        y = F.conv2d(F.relu(y), g(f"{prefix}.conv2.conv.weight"), padding=1)
        return x + y

    out = None
    for k in range(4):
        skip = maps[3 - k]
        x = skip if k == 0 else out + rcu(
            F.interpolate(skip, size=out.shape[-2:], mode="bilinear", align_corners=False)
            if skip.shape != out.shape else skip, f"fusion_blocks.{k}.res_conv_unit1")
        x = rcu(x, f"fusion_blocks.{k}.res_conv_unit2")
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        out = F.conv2d(x, g(f"fusion_blocks.{k}.project.conv.weight"),
                       g(f"fusion_blocks.{k}.project.conv.bias"))
    out = F.relu(F.conv2d(out, g("project.conv.weight"), g("project.conv.bias"), padding=1))
    out = F.conv2d(out, g("conv_depth.head.0.weight"), g("conv_depth.head.0.bias"), padding=1)
    out = F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=True)
    out = F.relu(F.conv2d(out, g("conv_depth.head.2.weight"), g("conv_depth.head.2.bias"),
                          padding=1))
    return F.conv2d(out, g("conv_depth.head.4.weight"), g("conv_depth.head.4.bias"))


def released_heights(sd: dict, cfg, rgb: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """uint8 RGB [B, 3, H, W] → metres [B, H, W] as the released model computes them: normalise,
    forward (under bf16 autocast for ``bf16``), all K logits, bin weights, expected bin value,
    clipped at 0. ``cfg`` is the whole model's configuration."""
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(cfg.std).view(1, 3, 1, 1) * 255.0
    x = (rgb.float() - mean) / std
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = released_decoder(sd, released_taps(sd, cfg.backbone, x, prefix="backbone."))
        logits = logits[..., :x.shape[-2], :x.shape[-1]]
    d = cfg.decoder
    centres = torch.linspace(d.min_depth, d.max_depth, d.n_bins)
    weights = torch.relu(logits.float()) + BIN_EPS
    probs = weights / weights.sum(dim=1, keepdim=True)
    return torch.relu(torch.einsum("bkhw,k->bhw", probs, centres) * d.output_scale)
