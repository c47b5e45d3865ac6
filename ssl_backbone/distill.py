"""Distillation of a pretrained DINOv2 run into a smaller student (spec ../shared/specs/ssl.md
§1.7; the DINOv2 paper §5; DINOv2 ships no code for it).

The DINOv2 step of :class:`~ssl_backbone.dinov2.DINOv2`, with the targets taken from a *frozen*
teacher — the EMA network (backbone and DINO/iBOT heads) of a finished pretraining run — instead
of the student's own EMA. As in the paper: no stochastic depth, no iBOT masking by default (the
iBOT loss is then taken on every patch of the two global crops, a patch-level distillation),
and the model released is an EMA of the student. That EMA sits where the trainer keeps every
method's EMA network (``model.teacher``), so checkpoints, resume, monitors and
``canopy pretrain export`` are the trainer's own, unchanged.

Invariant: the frozen teacher never changes and is never written into the run's checkpoints.
Why it holds: it is kept outside the module tree (``_frozen``, not a registered sub-module), so
``parameters()`` — which the optimizer, the EMA update and the gradient averaging walk — and
``state_dict()`` do not see it; :meth:`DistillDINOv2._apply` still moves it with the model, and
it is always in eval mode under ``torch.no_grad``. A resumed run loads it again from the path
its config names (a ViT-L teacher would otherwise add 1.2 GB to every checkpoint).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ssl_backbone.augment import CropConfig
from ssl_backbone.config import from_dict as config_from_dict
from ssl_backbone.dinov2 import DINOv2, DINOv2Config
from ssl_backbone.errors import CheckpointError, ConfigError
from ssl_backbone.heads import DINOHead

#: the head settings a student must share with its teacher: the loss compares distributions
#: over the teacher's prototypes (the hidden widths of the student's heads are its own)
HEAD_FIELDS = ("prototypes", "ibot_separate_head", "ibot_prototypes")


@dataclass
class DistillConfig(DINOv2Config):
    """A DINOv2 config with the frozen ``teacher`` (a DINOv2 run folder or its
    ``checkpoint.pt``) and the distillation defaults: DINOv3's distilled recipe (lr 2e-4,
    weight decay 0.04 → 0.2, layer decay 0.99, 20 epochs) and the paper's removals (drop path
    0, masking off). The teacher is trained, so its temperature is not warmed up.

    Centring, not DINOv3's Sinkhorn-Knopp, by default: the student starts from the teacher
    run's centre, so its targets are the teacher's own outputs from the first step, whereas
    Sinkhorn-Knopp re-balances every batch over the prototypes, which on small batches bends
    the targets away from what the teacher says (docs/pretraining.md has the measurement)."""

    teacher: str = ""
    drop_path_rate: float = 0.0
    mask_probability: float = 0.0
    base_lr: float = 2e-4
    layer_decay: float = 0.99
    weight_decay_end: float = 0.2
    epochs: float = 20.0
    warmup_epochs: float = 2.0
    warmup_teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if not self.teacher:
            raise ConfigError("distill teacher is required: a DINOv2 pretraining run folder "
                              "(or its checkpoint.pt)", field="teacher")
        if self.gram_weight > 0:
            raise ConfigError("distill gram_weight must be 0 (Gram anchoring is a long-run "
                              "pretraining option)", field="gram_weight")

    @classmethod
    def from_dict(cls, d: dict) -> "DistillConfig":
        return config_from_dict(cls, d, what="distill config")


def _checkpoint_of(path: str | Path) -> Path:
    p = Path(path)
    ckpt = p / "checkpoint.pt" if p.is_dir() else p
    if not ckpt.is_file():
        raise CheckpointError(f"teacher {path}: no checkpoint.pt (distillation needs a DINOv2 "
                              "pretraining run, whose checkpoint keeps the DINO/iBOT heads)")
    return ckpt


def teacher_run(path: str | Path, state: dict | None = None) -> dict:
    """The teacher run's method, config, backbone config and the imagery bands it read (None
    when not recorded), from its ``config.json`` when the run folder has one, else from the
    checkpoint (or ``state`` when it is already loaded)."""
    ckpt = _checkpoint_of(path)
    meta = ckpt.parent / "config.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
    else:
        info = state if state is not None else _load(ckpt)
    method = info.get("method", "dinov2")
    if method not in ("dinov2", "distill"):
        raise CheckpointError(f"teacher {path}: a {method} run; distillation needs a DINOv2 run "
                              "(its DINO head gives the targets)")
    return {"method": method, "config": info["config"], "backbone": info["backbone"],
            "bands": info.get("bands")}


def distill_config(fields: dict) -> DistillConfig:
    """A :class:`DistillConfig` from ``fields``, the head settings of :data:`HEAD_FIELDS` and the
    input normalisation (``crops.mean``/``crops.std``) taken from the teacher run (a value given
    that differs from the teacher's is refused)."""
    if not fields.get("teacher"):
        return DistillConfig.from_dict(fields)  # the one "teacher is required" message
    teacher = teacher_run(fields["teacher"])["config"]
    for name in HEAD_FIELDS:
        if name in fields and name in teacher and fields[name] != teacher[name]:
            raise ConfigError(f"distill {name} must be the teacher's ({teacher[name]}), got "
                              f"{fields[name]}", field=name)
    # the teacher sees the student's crops: normalised as in its own run, or its inputs drift
    crops, taught = fields.get("crops") or {}, teacher.get("crops") or {}
    if isinstance(crops, CropConfig):  # a built config always holds mean/std: its defaults say
        plain = CropConfig()           # nothing was chosen
        crops = {k: v for k, v in crops.to_dict().items()
                 if k not in ("mean", "std") or list(v) != list(getattr(plain, k))}
    crops = dict(crops)
    for name in ("mean", "std"):
        if name not in taught:
            continue
        if name in crops and [float(v) for v in crops[name]] != [float(v) for v in taught[name]]:
            raise ConfigError(f"distill crops.{name} must be the teacher's ({list(taught[name])}), "
                              f"got {list(crops[name])}", field=f"crops.{name}")
        crops[name] = taught[name]
    return DistillConfig.from_dict({**{k: teacher[k] for k in HEAD_FIELDS if k in teacher},
                                    **fields, **({"crops": crops} if crops else {})})


def _load(ckpt: Path) -> dict:
    from ssl_backbone.runtime import (
        PRETRAIN_CHECKPOINT_FORMAT, PRETRAIN_CHECKPOINT_VERSION, load_checkpoint)

    return load_checkpoint(ckpt, format=PRETRAIN_CHECKPOINT_FORMAT,
                           version=PRETRAIN_CHECKPOINT_VERSION)


def load_teacher(path: str | Path) -> tuple[nn.ModuleDict, DINOv2Config, dict]:
    """The frozen teacher of a DINOv2 (or distillation) run: its EMA backbone and heads in eval
    mode without gradients, its config, and its centring buffers (``dino_center.*``,
    ``ibot_center.*``) for a centring student to start from."""
    from ssl_backbone.checkpoints import load_state_dict_strict
    from ssl_backbone.vit import ViTConfig, build_vit

    state = _load(_checkpoint_of(path))  # read once: teacher_run takes it when there is no config.json
    run = teacher_run(path, state)
    cfg = (DistillConfig if run["method"] == "distill" else DINOv2Config).from_dict(run["config"])
    vit = build_vit(ViTConfig.from_dict(state["backbone"]))
    heads = {"dino_head": DINOHead(vit.cfg.embed_dim, cfg.prototypes, cfg.head_hidden,
                                   cfg.head_bottleneck, cfg.head_layers)}
    if cfg.ibot_separate_head:
        heads["ibot_head"] = DINOHead(vit.cfg.embed_dim, cfg.ibot_prototypes, cfg.head_hidden,
                                      cfg.head_bottleneck, cfg.head_layers)
    net = nn.ModuleDict({"backbone": vit, **heads})
    sd = {k[len("teacher."):]: v for k, v in state["model"].items() if k.startswith("teacher.")}
    load_state_dict_strict(net, sd, f"teacher {path}")
    for p in net.parameters():
        p.requires_grad_(False)
    centers = {k: v for k, v in state["model"].items()
               if k.startswith(("dino_center.", "ibot_center."))}
    return net.eval(), cfg, centers


class DistillDINOv2(DINOv2):
    """A student (fresh DINO/iBOT heads over the teacher's prototypes), its EMA (``teacher``:
    what the trainer exports) and the frozen teacher the targets come from."""

    def __init__(self, cfg: DistillConfig, backbone: nn.Module):
        frozen, tcfg, centers = load_teacher(cfg.teacher)
        for name in HEAD_FIELDS:
            if getattr(cfg, name) != getattr(tcfg, name):
                raise ConfigError(f"distill {name} must be the teacher's ({getattr(tcfg, name)}), "
                                  f"got {getattr(cfg, name)}", field=name)
        tp, sp = frozen["backbone"].cfg.patch_size, backbone.cfg.patch_size
        if tp != sp:
            raise ConfigError(f"the student's patch size ({sp}) must be the teacher's ({tp}): "
                              "the iBOT targets are per patch", field="arch")
        tb, sb = frozen["backbone"].cfg.in_chans, backbone.cfg.in_chans
        if tb != sb:
            raise ConfigError(f"the student reads {sb} bands, the teacher {tb}: distil from a "
                              "teacher pretrained on the same bands", field="teacher")
        super().__init__(cfg, backbone)
        object.__setattr__(self, "_frozen", frozen)  # outside the module tree: see docstring
        if cfg.centering == "centering" and centers:
            own = self.state_dict()
            self.load_state_dict({**own, **{k: v for k, v in centers.items()
                                            if k in own and own[k].shape == v.shape}})

    @property
    def frozen_teacher(self) -> nn.ModuleDict:
        return self._frozen

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self._frozen._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        self._frozen.eval()
        return self

    def target_network(self) -> nn.ModuleDict:
        return self._frozen

    def ibot_positions(self, masks: torch.Tensor) -> torch.Tensor:
        """The masked patches when masking is on (DINOv3's distillation keeps it), else every
        patch of the global crops (the DINOv2 paper's)."""
        return masks if self.cfg.mask_probability > 0 else torch.ones_like(masks)


__all__ = ["DistillConfig", "DistillDINOv2", "distill_config", "load_teacher", "teacher_run"]
