"""The height model: ViT backbone (timm; DINOv2 or DINOv3 family) + DPT decoder + bin head → metres.

A plain ``nn.Module``, as timm's models are: tensors in, tensors out. It knows nothing of rasters
or tiling; cutting an image of any size into blended tiles is the predict package's job
(:func:`canopy.predict.blend.predict_image`), so the model never imports prediction code.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from canopy.errors import ModelOutputError
from canopy.model.bins import bin_centres, heights_from_hidden, heights_from_logits
from canopy.model.config import HeightModelConfig
from canopy.model.dpt import DPTHead
from ssl_backbone.checkpoints import first_nonfinite
from ssl_backbone.vit import build_vit

PRECISIONS = ("fp32", "bf16")  # autocast modes (training and inference)
# Inference also offers int8: the backbone's Linear layers dynamically quantised to int8 and the
# DPT head's convolutions (all but its last two) as int8 convolutions, activation scales per tile;
# the rest of the head in bf16 autocast. CPU only (HeightModel.quantize_int8).
INFERENCE_PRECISIONS = (*PRECISIONS, "int8")
# precisions whose activation scales come from the tensor an op sees: predict_tensor runs the
# model one tile per call, so no tile depends on its batch-mates (and batches gain nothing)
PER_TILE_PRECISIONS = ("int8",)


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast on CPU or CUDA; fp32 runs without autocast."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got '{precision}'")
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def match_input_grid(logits: torch.Tensor, hw, patch_size: int) -> torch.Tensor:
    """Decoder logits on the input's pixel grid.

    The DPT upsamples the token grid 16×, which is the (padded) input grid only for 16-px
    patches, as in HRCH; then cropping is enough. For other patch sizes (DINOv2's 14) the output
    is first resized to the padded input, otherwise pixel i would hold the value of 16/14·i.
    Training and inference both go through here, so they agree.
    """
    h, w = hw
    if patch_size != 16:
        p = patch_size
        padded = (-(-h // p) * p, -(-w // p) * p)
        logits = torch.nn.functional.interpolate(logits, size=padded, mode="bilinear",
                                                 align_corners=False)
    return logits[..., :h, :w]


def fill_colour(model) -> np.ndarray:
    """The input normalisation mean in 0..255: a masked pixel becomes 0 after normalisation."""
    return np.round(np.asarray(model.cfg.mean, dtype=np.float64) * 255.0).astype(np.uint8)


class HeightModel(nn.Module):
    """``backbone`` and ``decode_head`` match the released checkpoints' top-level key prefixes."""

    def __init__(self, cfg: HeightModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_vit(cfg.backbone)
        self.decode_head = DPTHead(cfg.backbone.embed_dim, cfg.decoder)
        self.reset_constants()

    def reset_constants(self, device=None) -> None:
        """(Re)make the buffers that come from the config, not from weights files: bin centres,
        the input normalisation and the backbone's rotary periods. A model built on the meta device (checkpoints.py, to skip
        random initialisation) gets them here once its weights are in place."""
        cfg, d = self.cfg, self.cfg.decoder
        self.backbone.reset_buffers(device)  # RoPE periods (dinov3 family)
        self.register_buffer("bin_centres", bin_centres(d.n_bins, d.min_depth, d.max_depth,
                                                        device=device, spacing=d.bin_spacing),
                             persistent=False)
        self.register_buffer("pixel_mean", torch.tensor(cfg.mean, device=device)
                             .view(1, -1, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.std, device=device)
                             .view(1, -1, 1, 1) * 255.0, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.bin_centres.device

    def normalize(self, rgb: torch.Tensor) -> torch.Tensor:
        """uint8-valued RGB [B,3,H,W] (RGB + NIR [B,4,H,W] for a 4-band backbone; any dtype,
        0..255) → normalised float32."""
        return (rgb.float() - self.pixel_mean) / self.pixel_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised [B,3,H,W] → bin logits [B,K,H,W] (cropped back to H×W)."""
        logits = self.decode_head(self.backbone.forward_taps(x))
        return match_input_grid(logits, x.shape[-2:], self.cfg.backbone.patch_size)

    def heights(self, logits: torch.Tensor, with_std: bool = False):
        """Bin logits → metres [B,H,W] (and the distribution's spread in metres)."""
        return heights_from_logits(logits, self.bin_centres, self.cfg.decoder.output_scale,
                                   with_std=with_std, eps=self.cfg.decoder.bin_eps)

    def heights_from_taps(self, taps, hw, with_std: bool = False):
        """Backbone taps → metres [B,H,W] (and spread), as ``heights(forward(x))`` but without
        the per-bin logit tensor: the head's last 1×1 conv is fused with the bin reduction
        (:func:`canopy.model.bins.heights_from_hidden`). Resizing the 32-channel hidden map
        instead of the logits (non-16 patches) is the same: bilinear weights sum to one and the
        conv is affine per pixel."""
        hidden = match_input_grid(self.decode_head.forward_hidden(taps), hw,
                                  self.cfg.backbone.patch_size)
        last = self.decode_head.conv_depth.head[-1]
        return heights_from_hidden(hidden, last.weight, last.bias, self.bin_centres,
                                   self.cfg.decoder.output_scale, with_std=with_std,
                                   eps=self.cfg.decoder.bin_eps)

    @property
    def is_int8(self) -> bool:
        return getattr(self, "_int8", False)

    def quantize_int8(self) -> "HeightModel":
        """Quantise the model for int8 inference on the CPU, in place.

        * The backbone's Linear layers (~70 % of the FLOPs of a v1 tile, 162 of 237 GFLOP for
          ViT-L) become dynamically quantised int8 ones (``torch.ao.quantization.quantize_dynamic``:
          int8 weights, one activation scale per call, fbgemm/VNNI kernels). The ViT-L backbone
          ran 3.1× faster than fp32 and 1.6× faster than bf16 autocast on one core here. This is
          also how the released "compressed" HRCH checkpoint was made. torch.ao's eager
          quantisation is deprecated in favour of torchao, which is not a dependency here and
          whose CPU int8 path we have not measured; revisit when torch drops it.
        * The DPT head's convolutions except its last two become oneDNN int8 convolutions with
          per-tile activation scales (:mod:`canopy.model.int8`): the head ran 1.45× faster than
          in bf16 (0.41 → 0.28 s per ViT-L tile on one core). Skipped, with the head left in
          bf16, where torch lacks those ops (non-x86 builds).
        * Attention's softmax(QKᵀ)V runs as bf16 matmuls (:class:`canopy.model.int8.Bf16CoreAttention`):
          torch's fused CPU attention is slow for 257 tokens (4.3 vs 2.6 ms per ViT-L block).

        :meth:`predict_tensor` runs the model one tile at a time in int8, so that every scale comes
        from the tile itself. Irreversible: load the model again for fp32/bf16.
        """
        if self.is_int8:
            return self
        if self.device.type != "cpu":
            raise ValueError("int8 inference runs on the CPU only; use bf16 on a GPU")
        import warnings

        from canopy.model import int8

        self.eval()
        broken = first_nonfinite(self.state_dict())
        if broken is not None:
            # int8 kernels clamp NaN into range: the map would look finite and be wrong
            raise ModelOutputError(f"the model's weights hold NaN or infinite values ({broken}); "
                                   "int8 cannot run it")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notice, see docstring
            torch.ao.quantization.quantize_dynamic(self.backbone, {nn.Linear}, dtype=torch.qint8,
                                                   inplace=True)
        self.int8_head_convs = int8.quantize_decoder_convs(self.decode_head) if int8.available() else 0
        int8.swap_attention(self.backbone)
        self._int8 = True
        return self

    def prepare_for_inference(self, precision: str) -> "HeightModel":
        """On a GPU with bf16, keep the weights in bf16 so autocast stops re-casting ~1 GB of
        fp32 weights every forward pass. Buffers (bin centres, normalisation) stay fp32.
        ``int8`` quantises the backbone (CPU only, see :meth:`quantize_int8`)."""
        self.eval()
        if precision not in INFERENCE_PRECISIONS:
            raise ValueError(f"precision must be one of {INFERENCE_PRECISIONS}, got '{precision}'")
        if precision == "int8":
            return self.quantize_int8()
        if precision == "bf16" and self.device.type == "cuda":
            self.backbone.to(torch.bfloat16)
            self.decode_head.to(torch.bfloat16)
        return self

    def weights_for(self, precision: str) -> "HeightModel":
        """Put the weights in the form ``precision`` runs with. :meth:`predict_tensor` does this
        itself; callers that share the model between threads call it first, so that no two
        threads convert or quantise the weights at once."""
        if precision == "fp32" and self.pixel_mean.dtype == torch.float32 and \
                next(self.backbone.parameters()).dtype != torch.float32:
            self.backbone.float()  # an earlier bf16 GPU call kept bf16 weights: fp32 wants fp32
            self.decode_head.float()
        if precision == "int8":
            self.quantize_int8()
        elif self.is_int8:
            raise ValueError(f"this model was quantised to int8; load it again for {precision}")
        return self

    @torch.no_grad()
    def predict_tensor(self, rgb: torch.Tensor, precision: str = "fp32", with_std: bool = False):
        """uint8 RGB [B,3,H,W] (RGB + NIR [B,4,H,W] for a 4-band model) → metres [B,H,W] (and
        spread [B,H,W] if ``with_std``): one
        forward pass, no tiling. Spread is the standard deviation of the head's distribution
        over height bins, in metres. Images of any size are tiled and blended by
        :func:`canopy.predict_image`."""
        if rgb.dtype != torch.uint8:
            # a float image in [0, 1] would silently give ~50 m everywhere
            raise TypeError(f"rgb must be a uint8 tensor (0..255), got {rgb.dtype}")
        n_in = self.cfg.backbone.in_chans
        if rgb.ndim != 4 or rgb.shape[1] != n_in:
            raise ValueError(f"expected a B×{n_in}×H×W tensor (the model's bands), got shape "
                             f"{tuple(rgb.shape)}")
        self.weights_for(precision)
        rgb = rgb.to(self.device)
        if precision in PER_TILE_PRECISIONS:
            x = self.normalize(rgb)
            # One tile per call: int8 scales come from the whole tensor an op sees, so a batched
            # call made a tile's heights depend on its batch-mates (a different cell size changed
            # the map by centimetres, and a tile shared by two cells could disagree with itself).
            # Per tile it depends on that tile only, and it ran faster here (backbone 0.61 vs
            # 0.71 s per ViT-L tile on one thread; the int8 head has no batch to gain from).
            outs = []
            for i in range(x.shape[0]):
                taps = self.backbone.forward_taps(x[i:i + 1])
                with autocast_context(self.device, "bf16"):
                    outs.append(self.heights_from_taps(taps, x.shape[-2:], with_std=with_std))
            if with_std:
                return tuple(torch.cat(parts) for parts in zip(*outs))
            return torch.cat(outs)
        n = self.max_batch(rgb.shape[-2:])
        if rgb.shape[0] > n:
            # CUDA's upsampling kernels index with 32 bits: a 256-tile ViT-H batch (a 2^31-element
            # head map) failed on an H200. Larger batches run in pieces; no faster beyond ~64.
            parts = [self.predict_tensor(rgb[i:i + n], precision, with_std)
                     for i in range(0, rgb.shape[0], n)]
            return tuple(torch.cat(p) for p in zip(*parts)) if with_std else torch.cat(parts)
        with autocast_context(self.device, precision):
            x = self.normalize(rgb)
            return self.heights_from_taps(self.backbone.forward_taps(x), x.shape[-2:],
                                          with_std=with_std)

    def max_batch(self, hw) -> int:
        """The most tiles of size ``hw`` one forward pass takes: every full-resolution map of
        the head stays under 2^31 elements."""
        widest = max(self.cfg.decoder.channels, self.cfg.decoder.head_hidden)
        return max(1, (2 ** 31 - 1) // (widest * int(hw[0]) * int(hw[1])))
