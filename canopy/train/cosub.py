"""Submodel co-training (cosub, Touvron et al. 2022, arXiv:2212.04884) for fine-tuned backbones.

Two *submodels* of the same weights are drawn per step by stochastic depth (each fine-tuned
block is skipped at random, independently for the two), both see the same batch, and each is
the soft teacher of the other: besides the regular loss on the labels, each submodel's per-pixel
distribution over height bins is pulled towards the other's, whose side is detached
(stop-gradient). Only the trainable blocks differ between the two, so the frozen prefix of the
backbone runs once (see ``TrainForward``) and the cost is one extra tail + decoder pass.

It only makes sense when blocks are trained: with a frozen backbone the two submodels would be
the same network (``TrainConfig.check`` refuses ``--cosub`` without ``--finetune-blocks``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from timm.layers import DropPath
from torch import nn

from canopy.train.losses import bin_distribution_kl


def enable_stochastic_depth(backbone: nn.Module, rate: float, first_block: int) -> None:
    """Drop-path on blocks ``first_block…``; rates grow linearly with depth (timm's rule).

    DropPath holds no weights: the state dict is unchanged, and in eval mode it is identity, so
    a model trained this way saves and predicts like any other.
    """
    blocks = backbone.blocks
    rates = torch.linspace(0, rate, len(blocks)).tolist()
    for i, blk in enumerate(blocks):
        r = rates[i] if i >= first_block else 0.0
        blk.drop_path1 = DropPath(r) if r > 0 else nn.Identity()
        blk.drop_path2 = DropPath(r) if r > 0 else nn.Identity()


def mutual_distillation(probs: Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric soft-teacher loss of two submodels: ½·[KL(sg(p_b) ‖ p_a) + KL(sg(p_a) ‖ p_b)].

    ``probs`` are the two [B,K,H,W] bin distributions; ``mask`` [B,H,W] the pixels with image
    data. Each direction detaches its teacher, so each submodel only learns from the other.
    """
    if len(probs) != 2:
        raise ValueError(f"cosub needs exactly two submodels, got {len(probs)}")
    a, b = probs
    return 0.5 * (bin_distribution_kl(a, b, mask) + bin_distribution_kl(b, a, mask))
