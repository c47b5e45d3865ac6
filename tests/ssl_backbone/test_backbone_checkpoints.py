"""Backbone weights files: wrappers and namings map onto DinoViT keys, and misfits are one error."""

from __future__ import annotations

import pytest
import torch

from ssl_backbone.checkpoints import (
    WRAPPER_PREFIXES, load_backbone, load_state_dict_strict, strip_prefixes)
from ssl_backbone.errors import CheckpointError
from ssl_backbone.vit import build_vit


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_vit("vit_micro")


def test_a_pretraining_run_file_loads_its_teacher_backbone(tmp_path, vit):
    """DDP-wrapped SSL checkpoints: ``module.backbone.*`` beside heads that are not the backbone."""
    sd = {f"module.backbone.{k}": v for k, v in vit.state_dict().items()}
    sd["module.dino_head.mlp.0.weight"] = torch.randn(8, 128)
    sd["module.ibot_head.last_layer.weight"] = torch.randn(8, 8)
    torch.save({"teacher": sd}, tmp_path / "run.pth")
    loaded, cfg = load_backbone(tmp_path / "run.pth")
    assert (cfg.embed_dim, cfg.depth, cfg.patch_size) == (128, 4, 16)
    for k, v in vit.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_wrappers_are_stripped_however_they_nest():
    sd = {"teacher.module.backbone.cls_token": 1, "teacher.module.decode_head.w": 2}
    assert strip_prefixes(sd, WRAPPER_PREFIXES) == {"backbone.cls_token": 1, "decode_head.w": 2}
    # a prefix only some keys carry is part of the names, not a wrapper
    mixed = {"module.a": 1, "b": 2}
    assert strip_prefixes(mixed, WRAPPER_PREFIXES) == mixed


def test_strict_load_lists_every_misfit_in_one_line(vit):
    sd = dict(vit.state_dict())
    sd.pop("blocks.0.norm1.bias")
    sd["head.extra"] = torch.zeros(1)
    sd["mask_token"] = torch.zeros(1, 7)
    fresh = build_vit("vit_micro")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_state_dict_strict(fresh, sd, "weights.pth")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("weights.pth: ")
    assert "missing keys: blocks.0.norm1.bias" in msg and "unexpected keys: head.extra" in msg
    assert "mismatched shapes: mask_token (1, 7) vs model (1, 128)" in msg
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())  # nothing loaded


def test_errors_name_the_source_the_caller_gives(tmp_path):
    with pytest.raises(CheckpointError, match="^--backbone x.pth: file not found"):
        load_backbone(tmp_path / "x.pth", source="--backbone x.pth")
    torch.save({"state_dict": {"a": "not a tensor"}}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="no state dict of tensors inside"):
        load_backbone(tmp_path / "odd.pth")
