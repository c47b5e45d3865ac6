"""int8 convolutions for the DPT head on CPUs, with one activation scale per tile (and a bf16
attention core for the int8 backbone, :class:`Bf16CoreAttention`).

The head is ~40 % of a ViT-L tile once the backbone runs in int8, and its time is in 3×3
convolutions at 64² and 128² (bf16 already reaches the CPU's bf16 matmul rate there). oneDNN's
int8 convolution (``torch.ops.onednn.qconv2d_pointwise``, the kernel torch's x86 inductor
quantisation lowers to) ran at 435 GOP/s on one core here against 216 GFLOP/s for bf16.

Why not an existing recipe: torch.ao's eager dynamic quantisation has no fast conv (measured
slower than bf16), and static quantisation (PT2E) fixes activation scales at calibration; that
moved heights by 0.38 m on average even when calibrated on the evaluation image itself. Here
each conv takes its activation scale from the tile it is running on (asymmetric uint8 from the
tile's min/max; weights symmetric int8 per output channel), so a tile's heights depend on that
tile only — the property the engine's seam-free and resumable maps rest on — and no scale can
be stale. The head's last 3×3 conv (full resolution, feeding the per-bin logits) and the logit
conv stay in bf16: quantising the former too took the trained default model's mean height
difference from fp32 on real imagery from 0.036 to 0.061 m, its 99th percentile from 0.28 to
0.61 m (docs/performance.md).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
from torch import nn


@functools.cache
def available() -> bool:
    """oneDNN's int8 convolution runs in this torch build on this CPU (x86 builds; probed once
    on a tiny conv, since an op can be registered and still refuse the machine)."""
    try:
        conv = nn.Conv2d(2, 2, 1)
        out = Int8Conv2d(conv)(torch.ones(1, 2, 2, 2))
        return out.shape == (1, 2, 2, 2)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def quantize_activation(x: torch.Tensor, nonnegative: bool = False):
    """``x`` (one tile) → (uint8 channels-last tensor, scale, zero point) from its own range.

    ``nonnegative`` fixes the lower end at 0, so values below it clamp to 0: a ReLU in front of
    the conv comes for free and the 8 bits cover only what the conv sees.
    """
    xf = x.float().contiguous(memory_format=torch.channels_last)
    # a reduction over the channels-last memory as one flat vector: 20× faster than over the
    # NCHW-strided view here
    lo, hi = torch.aminmax(xf.permute(0, 2, 3, 1).reshape(-1))
    lo = 0.0 if nonnegative else min(float(lo), 0.0)
    hi = max(float(hi), 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):  # a broken tile: no crash, no scale
        lo = hi = 0.0
    scale = (hi - lo) / 255.0 or 1.0  # an all-zero tile: any scale
    zero_point = int(round(-lo / scale))
    return _to_uint8(xf, scale, zero_point), scale, zero_point


def _to_uint8(xf: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """clamp(round(x / scale) + zero_point, 0, 255) as uint8, same layout. torch's quantized
    tensors do it in one pass (the fallback's five elementwise passes took 1.6× as long here
    and gave the same bytes in tests/test_int8.py); they are deprecated, so the fallback takes
    over when they go."""
    global _QUANTIZED_TENSORS
    if _QUANTIZED_TENSORS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the deprecation notice, see above
                return torch.quantize_per_tensor(xf, scale, zero_point, torch.quint8).int_repr()
        except (AttributeError, RuntimeError, NotImplementedError):
            _QUANTIZED_TENSORS = False
    return xf.mul_(1.0 / scale).round_().add_(zero_point).clamp_(0, 255).to(torch.uint8)


_QUANTIZED_TENSORS = True


class Int8Conv2d(nn.Module):
    """A ``Conv2d`` with int8 weights (per output channel) and per-tile int8 activations.

    Returns bf16 (the dtype the rest of the head runs in), channels-last. Each sample of a batch
    is quantised and convolved on its own, so results never depend on batch-mates.
    Inference only; the prepacked weights are not in ``state_dict``.
    """

    def __init__(self, conv: nn.Conv2d, relu_in: bool = False, relu_out: bool = False):
        super().__init__()
        w = conv.weight.detach().float().cpu()
        w_scale = (w.abs().amax(dim=(1, 2, 3)) / 127.0).clamp_min(1e-12)
        qw = torch.clamp(torch.round(w / w_scale[:, None, None, None]), -127, 127).to(torch.int8)
        self.conv_args = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        # the packed layout does not depend on the activation scale given here (checked in
        # tests/test_int8.py): each call passes its own
        self.packed = torch.ops.onednn.qconv_prepack(qw, w_scale, 1.0, 0, *self.conv_args, None)
        self.w_scale = w_scale
        self.w_zero_point = torch.zeros(w.shape[0], dtype=torch.int64)
        self.bias = None if conv.bias is None else conv.bias.detach().float().cpu()
        self.relu_in, self.relu_out = relu_in, relu_out
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for i in range(x.shape[0]):
            qx, scale, zero_point = quantize_activation(x[i:i + 1], self.relu_in)
            outs.append(torch.ops.onednn.qconv2d_pointwise(
                qx, scale, zero_point, self.packed, self.w_scale, self.w_zero_point, self.bias,
                *self.conv_args, 1.0, 0, torch.bfloat16, "relu" if self.relu_out else "none", [], ""))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, int8 per-tile activations, "
                f"relu_in={self.relu_in}, relu_out={self.relu_out}")


def quantize_decoder_convs(head: nn.Module) -> int:
    """Swap the DPT head's convolutions for :class:`Int8Conv2d`, in place; returns how many.

    Quantised: every ``ConvUnit`` (reassemble projections, the 3×3 convs into the fusion width,
    the fusion blocks' residual units and projections, the head's ``project``), the stride-2
    resize conv and the first conv of the height head. A ``ConvUnit``'s ReLU moves into the int8
    op (before: a clamp at quantisation; after: oneDNN's fused ReLU). Left in bf16: the
    transposed resize convs (small), the head's last 3×3 conv and its 1×1 logit conv.
    """
    from canopy.model.dpt import ConvUnit

    n = 0
    for module in list(head.modules()):
        if isinstance(module, ConvUnit) and isinstance(module.conv, nn.Conv2d):
            module.conv = Int8Conv2d(module.conv, relu_in=module.act == "pre",
                                     relu_out=module.act == "post")
            module.act = None
            n += 1
    resize = head.reassemble_blocks.resize_layers
    for i, layer in enumerate(resize):
        if type(layer) is nn.Conv2d:
            resize[i] = Int8Conv2d(layer)
            n += 1
    seq = head.conv_depth.head
    if type(seq[0]) is nn.Conv2d:
        seq[0] = Int8Conv2d(seq[0])
        n += 1
    return n


class Bf16CoreAttention(nn.Module):
    """A timm ``Attention`` whose softmax(QKᵀ)V runs as bf16 batched matmuls; its (int8)
    ``qkv`` and ``proj`` layers are the original modules.

    Why: for a 256² tile (257 tokens, 64-wide heads) torch's fused CPU attention ran at ~63
    GFLOP/s on one core here (4.3 ms per ViT-L block, 12 % of an int8 tile), while the same
    products as bf16 ``bmm`` with a bf16 softmax took 2.6 ms. Only for the plain attention of
    our ViTs (no q/k norm, no gate, no mask), which :func:`swap_attention` checks; rotary
    positions (dinov3 family) are applied to q and k as timm's ``EvaAttention`` applies them.
    """

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.qkv, self.proj = attn.qkv, attn.proj
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        self.scale = attn.scale
        # timm's Eva attention (dinov3 family): rotary positions on the tokens after the prefix
        self.num_prefix_tokens = getattr(attn, "num_prefix_tokens", 0)
        self.rotate_half = getattr(attn, "rotate_half", False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask=None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("Bf16CoreAttention has no masks")
        b, n, _ = x.shape
        h, d = self.num_heads, self.head_dim
        qkv = self.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
        if rope is not None:  # rotate q and k in float32, as Eva does, then go to bf16
            from timm.layers import apply_rot_embed_cat

            p = self.num_prefix_tokens
            q, k, v = qkv.unbind(0)
            q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=self.rotate_half)], 2)
            k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=self.rotate_half)], 2)
            qkv = torch.stack([q, k, v])
        qkv = qkv.to(torch.bfloat16, memory_format=torch.contiguous_format).reshape(3, b * h, n, d)
        q, k, v = qkv[0].mul_(self.scale), qkv[1], qkv[2]
        probs = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
        out = torch.bmm(probs, v).reshape(b, h, n, d).transpose(1, 2).reshape(b, n, h * d)
        return self.proj(out.float())


def swap_attention(backbone: nn.Module) -> int:
    """Replace plain timm attention modules of ``backbone`` by :class:`Bf16CoreAttention`, in
    place; returns how many."""
    n = 0
    for block in getattr(backbone, "blocks", []):
        attn = getattr(block, "attn", None)
        plain = attn is not None and all(
            isinstance(getattr(attn, name, nn.Identity()), nn.Identity)
            for name in ("q_norm", "k_norm", "norm")) and getattr(attn, "gate", None) is None \
            and getattr(attn, "q_bias", None) is None  # Eva's separate biases: not in qkv
        if plain and hasattr(attn, "head_dim") and attn.attn_drop.p == 0.0:
            block.attn = Bf16CoreAttention(attn)
            n += 1
    return n
