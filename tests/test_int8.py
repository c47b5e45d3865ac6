"""int8 convolutions of the DPT head (canopy.model.int8): per-tile scales, close to the float conv."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from canopy.model import int8

pytestmark = pytest.mark.skipif(not int8.available(), reason="torch has no oneDNN int8 conv ops")


def _conv(cin=32, cout=24, k=3, stride=1, bias=True, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias)
    with torch.no_grad():
        conv.weight.mul_(3.0)
    return conv.eval()


@pytest.mark.parametrize("stride,bias", [(1, True), (2, False)])
def test_int8_conv_matches_the_float_conv(stride, bias):
    conv = _conv(stride=stride, bias=bias)
    x = torch.randn(2, 32, 20, 20)
    with torch.no_grad():
        ref = conv(x)
        out = int8.Int8Conv2d(conv)(x)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    err = (out.float() - ref).abs()
    # 8-bit activations over a Gaussian's whole range and 8-bit weights: about 1 % of the output
    assert err.mean() < 0.02 * ref.abs().mean() and err.max() < 0.1 * ref.abs().max()


def test_relu_in_and_out_are_folded_into_the_int8_op():
    conv = _conv()
    x = torch.randn(1, 32, 16, 16)
    with torch.no_grad():
        ref = F.relu(conv(F.relu(x)))
        out = int8.Int8Conv2d(conv, relu_in=True, relu_out=True)(x).float()
    assert out.min() >= 0
    assert (out - ref).abs().mean() < 0.02 * ref.abs().mean()


def test_a_tile_does_not_depend_on_its_batch_mates():
    """Each sample is quantised with its own scale: the engine's maps must not change with which
    tiles share a batch (another cell size, another lane count)."""
    q = int8.Int8Conv2d(_conv())
    x = torch.randn(3, 32, 16, 16)
    loud = x.clone()
    loud[1:] *= 50  # batch-mates with a far larger range
    with torch.no_grad():
        assert torch.equal(q(x)[0], q(loud)[0])
        assert torch.equal(q(x[:1])[0], q(x)[0])
        assert not torch.equal(q(x)[1], q(loud)[1])


def test_packed_weights_do_not_depend_on_the_activation_scale_given_at_packing():
    """Int8Conv2d packs once with scale 1.0 and passes each tile's scale at call time; oneDNN
    must not have folded the packing scale into the weights."""
    conv = _conv()
    q = int8.Int8Conv2d(conv)
    x = torch.randn(1, 32, 16, 16)
    qx, scale, zp = int8.quantize_activation(x)
    qw = torch.clamp(torch.round(conv.weight / q.w_scale[:, None, None, None]), -127, 127).to(torch.int8)
    other = torch.ops.onednn.qconv_prepack(qw, q.w_scale, 0.003, 7, *q.conv_args, None)
    outs = [torch.ops.onednn.qconv2d_pointwise(qx, scale, zp, packed, q.w_scale, q.w_zero_point,
                                               q.bias, *q.conv_args, 1.0, 0, torch.float32,
                                               "none", [], "")
            for packed in (q.packed, other)]
    assert torch.equal(outs[0], outs[1])


def test_quantize_activation_handles_flat_and_nonnegative_tiles():
    qx, scale, zp = int8.quantize_activation(torch.zeros(1, 4, 8, 8))
    assert scale == 1.0 and zp == 0 and int(qx.max()) == 0
    x = torch.linspace(-1, 3, 4 * 64).reshape(1, 4, 8, 8)
    qx, scale, zp = int8.quantize_activation(x, nonnegative=True)
    assert zp == 0 and qx.dtype == torch.uint8
    assert int(qx.max()) == 255 and abs(scale - 3 / 255) < 1e-9
    assert int(qx[x < 0].max()) == 0  # the ReLU
    qx, scale, zp = int8.quantize_activation(x)
    assert int(qx.min()) == 0 and int(qx.max()) == 255 and zp == round(1 / scale)


def test_quantize_int8_swaps_the_head_convs_and_keeps_the_last_two_in_bf16():
    from canopy.model.checkpoints import load_model

    m = load_model("default").quantize_int8()
    head = m.decode_head
    n_int8 = sum(isinstance(mod, int8.Int8Conv2d) for mod in head.modules())
    assert n_int8 == m.int8_head_convs > 20
    assert type(head.conv_depth.head[2]) is nn.Conv2d and type(head.conv_depth.head[4]) is nn.Conv2d
    out = m.predict_tensor(torch.full((2, 3, 96, 96), 120, dtype=torch.uint8), precision="int8")
    assert out.shape == (2, 96, 96) and torch.isfinite(out).all()


def test_without_the_int8_conv_ops_the_head_stays_in_bf16(monkeypatch):
    from canopy.model.checkpoints import load_model

    monkeypatch.setattr(int8, "available", lambda: False)
    m = load_model("default").quantize_int8()
    assert m.int8_head_convs == 0
    assert not any(isinstance(mod, int8.Int8Conv2d) for mod in m.decode_head.modules())
    out = m.predict_tensor(torch.full((1, 3, 96, 96), 120, dtype=torch.uint8), precision="int8")
    assert torch.isfinite(out).all()


def test_bf16_core_attention_matches_timm_attention():
    from timm.models.vision_transformer import Attention

    torch.manual_seed(0)
    attn = Attention(64, num_heads=4, qkv_bias=True).eval()
    blocks = nn.Module()
    blocks.blocks = nn.ModuleList([nn.Module()])
    blocks.blocks[0].attn = attn
    assert int8.swap_attention(blocks) == 1
    fast = blocks.blocks[0].attn
    assert isinstance(fast, int8.Bf16CoreAttention) and fast.qkv is attn.qkv
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        ref, out = attn(x), fast(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()
    with pytest.raises(ValueError, match="no masks"):
        fast(x, is_causal=True)
    normed = nn.Module()
    normed.blocks = nn.ModuleList([nn.Module()])
    normed.blocks[0].attn = Attention(64, num_heads=4, qk_norm=True, norm_layer=nn.LayerNorm)
    assert int8.swap_attention(normed) == 0  # q/k norms: left to timm


def test_both_uint8_paths_give_the_same_bytes(monkeypatch):
    torch.manual_seed(1)
    x = torch.randn(1, 64, 64, 64).contiguous(memory_format=torch.channels_last) * 3
    fast = int8._to_uint8(x.clone(), 0.021, 117)
    monkeypatch.setattr(int8, "_QUANTIZED_TENSORS", False)
    slow = int8._to_uint8(x.clone(), 0.021, 117)
    assert fast.dtype == slow.dtype == torch.uint8 and torch.equal(fast, slow)
    assert fast.is_contiguous(memory_format=torch.channels_last)


def test_backbone_linear_weights_are_quantised_at_8_bits():
    """README: int8 "quantises the ViT's Linear layers to int8". Every Linear layer of the
    trained default model's backbone is replaced by a dynamically quantised one whose weights,
    read back, are within half an 8-bit step (max |w| / 127 / 2) of the float weights (measured:
    0.498 of that step at worst). Guards against: the Linear weights rounded to 6 bits before
    quantising (4× the error; the map moves too little for the map-level tests to see,
    tests/test_precision.py) and Linear layers left in float."""
    from canopy.model.checkpoints import load_model

    floats = dict(load_model("default").backbone.named_modules())
    q = load_model("default").quantize_int8()
    n_linear = sum(isinstance(m, nn.Linear) for m in floats.values())
    quantised = {name: m for name, m in q.backbone.named_modules()
                 if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)}
    assert n_linear == len(quantised) == 48  # ViT-Ti: 12 blocks × qkv, proj, fc1, fc2
    for name, m in quantised.items():
        w = floats[name].weight.detach()
        qw = m.weight()
        assert qw.dtype == torch.qint8, name
        half_step = 0.5 * float(w.abs().max()) / 127
        assert float((qw.dequantize() - w).abs().max()) <= 1.01 * half_step, name
