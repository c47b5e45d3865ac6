"""DINO/iBOT projection head (spec ../shared/specs/ssl.md §1.2).

MLP (Linear → GELU, ``nlayers`` − 1 times, to the bottleneck), L2-normalise, then a
weight-normalised Linear to K prototypes without bias. The legacy ``torch.nn.utils.weight_norm``
is used on purpose: its ``last_layer.weight_g``/``weight_v`` keys are those of the official
checkpoints, whose heads can then be loaded to continue a run. ``weight_g`` starts at 1 and stays
trainable (DINOv2; DINO v1 froze it).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, prototypes: int = 65536, hidden: int = 2048,
                 bottleneck: int = 256, nlayers: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(max(nlayers - 1, 0)):
            layers += [nn.Linear(dim, hidden), nn.GELU()]
            dim = hidden
        layers.append(nn.Linear(dim, bottleneck))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # weight_norm's deprecation notice: see docstring
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck, prototypes, bias=False))
        self.last_layer.weight_g.data.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return self.last_layer(F.normalize(x, dim=-1, p=2, eps=eps))
