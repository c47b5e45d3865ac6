"""DPT decoder (Ranftl et al. 2021) with the 256-bin height heads of HighResCanopyHeight v1 and CHMv2.

Module names mirror the v1 checkpoints' ``decode_head.*`` keys (``reassemble_blocks``,
``convs``, ``fusion_blocks``, ``project``, ``conv_depth.head``) so v1 weights load strictly with
no key renaming. Shapes and order follow docs/reference_model.md.

CHMv2's head is the same network with three differences, each a :class:`DPTConfig` field rather
than a second head class, so the two models share every module, the int8 path and the fused
bins-to-metres step: no 3×3 ``project`` conv after the last fusion (``fusion_project``), biases
in the fusion blocks' residual convs (``residual_bias``), a 128-channel last hidden layer
(``head_hidden``); and its bins (``bin_spacing="mixlog"``, ``bin_eps``, ``output_scale=8``).
Hugging Face's names for the same tensors are mapped in :mod:`canopy.model.checkpoints`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from canopy.model.bins import BIN_EPS, SPACINGS
from ssl_backbone.config import from_dict as config_from_dict
from ssl_backbone.config import to_dict as config_to_dict
from ssl_backbone.errors import ConfigError


@dataclass
class DPTConfig:
    post_process_channels: tuple[int, int, int, int] = (128, 256, 512, 1024)
    channels: int = 256  # fusion width
    head_hidden: int = 32  # HRCH HeadDepth: channels -> channels//2 -> 32 -> n_bins
    n_bins: int = 256
    min_depth: float = 0.001  # bin centres: linspace(min_depth, max_depth, n_bins)
    max_depth: float = 10.0
    output_scale: float = 10.0  # HRCH multiplies the expected bin value by 10: metres in [0.01, 100]
    bin_spacing: str = "linear"  # canopy.model.bins.SPACINGS; CHMv2: "mixlog"
    bin_eps: float = BIN_EPS  # p_k ∝ relu(l_k) + bin_eps (HRCH 0.1, CHMv2 1e-8)
    fusion_project: bool = True  # HRCH's 3×3 conv + ReLU after the last fusion block
    residual_bias: bool = False  # biases in the fusion blocks' residual convs (CHMv2)

    def __post_init__(self):
        if self.bin_spacing not in SPACINGS:
            raise ConfigError(f"decoder bin_spacing must be one of {', '.join(SPACINGS)}, got "
                              f"{self.bin_spacing!r}", field="decoder.bin_spacing")
        if not self.bin_eps > 0:
            raise ConfigError(f"decoder bin_eps must be > 0, got {self.bin_eps}",
                              field="decoder.bin_eps")

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DPTConfig":
        return config_from_dict(cls, d, what="decoder config")


class ConvUnit(nn.Module):
    """A conv with an optional ReLU before or after it; holds ``.conv`` (checkpoint key layout)."""

    def __init__(self, cin, cout, k, *, stride=1, padding=0, bias=True, act: str | None = None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias)
        self.act = act

    def forward(self, x):
        if self.act == "pre":
            x = F.relu(x)
        x = self.conv(x)
        if self.act == "post":
            x = F.relu(x)
        return x


class ReassembleBlocks(nn.Module):
    """Token maps + CLS readout ('project') → four maps at ×4, ×2, ×1, ×½ of the patch grid."""

    def __init__(self, embed_dim: int, out_channels):
        super().__init__()
        self.projects = nn.ModuleList([ConvUnit(embed_dim, c, 1) for c in out_channels])
        c0, c1, _, c3 = out_channels
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(c0, c0, kernel_size=4, stride=4),
            nn.ConvTranspose2d(c1, c1, kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(c3, c3, kernel_size=3, stride=2, padding=1),
        ])
        self.readout_projects = nn.ModuleList(
            [nn.Sequential(nn.Linear(2 * embed_dim, embed_dim), nn.GELU()) for _ in out_channels]
        )

    def forward(self, taps):
        out = []
        for i, (x, cls) in enumerate(taps):
            b, d, h, w = x.shape
            tokens = x.flatten(2).transpose(1, 2)  # [B, hw, D]
            readout = cls.unsqueeze(1).expand_as(tokens)
            tokens = self.readout_projects[i](torch.cat([tokens, readout], dim=-1))
            x = tokens.transpose(1, 2).reshape(b, d, h, w)
            out.append(self.resize_layers[i](self.projects[i](x)))
        return out


class PreActResidualConvUnit(nn.Module):
    def __init__(self, ch: int, bias: bool = False):
        super().__init__()
        self.conv1 = ConvUnit(ch, ch, 3, padding=1, bias=bias, act="pre")
        self.conv2 = ConvUnit(ch, ch, 3, padding=1, bias=bias, act="pre")

    def forward(self, x):
        return x + self.conv2(self.conv1(x))


class FeatureFusionBlock(nn.Module):
    def __init__(self, ch: int, with_skip: bool = True, bias: bool = False):
        super().__init__()
        self.res_conv_unit1 = PreActResidualConvUnit(ch, bias) if with_skip else None
        self.res_conv_unit2 = PreActResidualConvUnit(ch, bias)
        self.project = ConvUnit(ch, ch, 1, bias=True)

    def forward(self, x, skip=None):
        if skip is not None:
            if skip.shape != x.shape:
                skip = F.interpolate(skip, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x + self.res_conv_unit1(skip)
        x = self.res_conv_unit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.project(x)


class Upsample2x(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class HeadDepth(nn.Module):
    def __init__(self, ch: int, hidden: int, n_bins: int):
        super().__init__()
        # indices 0, 2, 4 hold weights, as in the released checkpoints
        self.head = nn.Sequential(
            nn.Conv2d(ch, ch // 2, 3, padding=1),
            Upsample2x(),
            nn.Conv2d(ch // 2, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, n_bins, 1),
        )

    def forward(self, x):
        return self.head(x)


class DPTHead(nn.Module):
    """Four tapped ViT outputs → per-pixel logits over height bins, at input resolution."""

    def __init__(self, embed_dim: int, cfg: DPTConfig):
        super().__init__()
        self.cfg = cfg
        self.reassemble_blocks = ReassembleBlocks(embed_dim, cfg.post_process_channels)
        self.convs = nn.ModuleList(
            [ConvUnit(c, cfg.channels, 3, padding=1, bias=False) for c in cfg.post_process_channels]
        )
        self.fusion_blocks = nn.ModuleList(
            [FeatureFusionBlock(cfg.channels, with_skip=i > 0, bias=cfg.residual_bias)
             for i in range(4)]
        )
        self.project = (ConvUnit(cfg.channels, cfg.channels, 3, padding=1, bias=True, act="post")
                        if cfg.fusion_project else nn.Identity())
        self.conv_depth = HeadDepth(cfg.channels, cfg.head_hidden, cfg.n_bins)

    def forward(self, taps) -> torch.Tensor:
        return self.conv_depth.head[-1](self.forward_hidden(taps))

    def forward_hidden(self, taps) -> torch.Tensor:
        """Everything up to the last 1×1 conv: the ``head_hidden``-channel map at full
        resolution. Inference turns it into heights without materialising the per-bin logits
        (:func:`canopy.model.bins.heights_from_hidden`)."""
        x = [conv(f) for conv, f in zip(self.convs, self.reassemble_blocks(taps))]
        out = self.fusion_blocks[0](x[-1])
        for i in range(1, len(self.fusion_blocks)):
            out = self.fusion_blocks[i](out, x[-(i + 1)])
        return self.conv_depth.head[:-1](self.project(out))
