"""The DINOv2 method (spec ../shared/specs/ssl.md §1): student and EMA teacher, heads, losses,
parameter groups and schedules. The training loop that drives it is :mod:`ssl_backbone.pretrain`.

One step (:meth:`DINOv2.losses`): the teacher (eval mode, no gradients) sees the two global
crops unmasked and gives DINO targets for their CLS tokens and iBOT targets for the patches the
student will see masked (centring or Sinkhorn-Knopp, at the scheduled temperature); the student
sees the globals with iBOT block masks and the local crops; the loss is
``dino_weight · L_DINO + ibot_weight · L_iBOT + koleo_weight · (KoLeo(g₁) + KoLeo(g₂))``
(+ ``gram_weight · L_Gram`` against a Gram-teacher snapshot, DINOv3, off by default). Then the
caller clips each sub-module's gradients, steps, and calls :meth:`DINOv2.update_teacher`.

Invariant: the teacher changes only through :meth:`DINOv2.update_teacher` (its parameters never
require gradients and it always runs in eval mode), and it covers the heads as well as the
backbone, as in the official code.

Works for both backbone families (:mod:`ssl_backbone.vit`): it runs the backbone through the
token API only (``prepare_tokens`` with masks → ``run_blocks`` with the grid → final norm).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ssl_backbone.augment import CropConfig
from ssl_backbone.config import from_dict as config_from_dict
from ssl_backbone.config import to_dict as config_to_dict
from ssl_backbone.errors import ConfigError
from ssl_backbone.heads import DINOHead
from ssl_backbone.losses import (
    Centering, all_sum, dino_loss, gram_loss, ibot_loss, koleo_loss, sinkhorn_knopp)
from ssl_backbone.runtime import WarmupCosine

FORMAT_VERSION = 1
CENTERINGS = ("centering", "sinkhorn_knopp")


@dataclass
class DINOv2Config:
    """Every setting of a DINOv2 run. Defaults are the official ones (spec §1.6) unless a
    comment says otherwise; schedules are in epochs of the run's own data (not DINOv2's fixed
    1,250-iteration "epoch")."""

    arch: str = "vit_small"  # ssl_backbone.vit.VARIANTS name (ignored when init is given)
    init: str = ""  # backbone file to continue from (HRCH v1, DINOv2/DINOv3, our export)
    drop_path_rate: float = 0.1  # official 0.3 is for ViT-L/g; 0.1 for the small models here
    crops: CropConfig = field(default_factory=CropConfig)
    prototypes: int = 65536
    head_hidden: int = 2048
    head_bottleneck: int = 256
    head_layers: int = 3
    ibot_separate_head: bool = False
    ibot_prototypes: int = 65536  # used when the iBOT head is separate
    centering: str = "centering"  # or "sinkhorn_knopp"
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30.0
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    gram_weight: float = 0.0  # DINOv3 Gram anchoring; 0 = off
    gram_refresh_epochs: float = 10.0  # the Gram teacher is the EMA teacher, snapshotted
    base_lr: float = 4e-3  # × sqrt(global batch / 1024)
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    epochs: float = 100.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    freeze_last_layer_epochs: float = 1.0
    clip_grad: float = 3.0
    momentum_teacher: float = 0.992
    momentum_teacher_end: float = 1.0
    freeze_backbone_blocks: int = 0  # continued runs: keep the first N blocks frozen
    batch_size: int = 64  # per process
    seed: int = 0
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        def bad(field_: str, why: str):
            raise ConfigError(f"dinov2 {field_} {why}", field=field_)

        if self.centering not in CENTERINGS:
            bad("centering", f"must be one of {', '.join(CENTERINGS)}, got {self.centering!r}")
        lo, hi = self.mask_ratio
        if not 0.0 <= lo <= hi <= 1.0:
            bad("mask_ratio", f"must be 0 ≤ min ≤ max ≤ 1, got {self.mask_ratio}")
        if not 0.0 <= self.mask_probability <= 1.0:
            bad("mask_probability", f"must be within [0, 1], got {self.mask_probability}")
        if self.batch_size < 2 and self.koleo_weight > 0:
            bad("batch_size", "must be ≥ 2 with KoLeo on (it needs a nearest other sample)")
        if self.epochs <= 0:
            bad("epochs", f"must be > 0, got {self.epochs}")
        if self.crops.n_local < 0:
            bad("crops.n_local", f"must be ≥ 0, got {self.crops.n_local}")
        for name in ("prototypes", "ibot_prototypes", "head_layers", "head_bottleneck"):
            if getattr(self, name) < 1:
                bad(name, "must be ≥ 1")

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DINOv2Config":
        return config_from_dict(cls, d, what="dinov2 config")


@dataclass(frozen=True)
class Schedules:
    """The per-step values of one run (spec §1.6): pure functions of the step."""

    lr: WarmupCosine
    wd: WarmupCosine
    momentum: WarmupCosine
    teacher_temp: WarmupCosine
    freeze_last_layer_steps: int

    @classmethod
    def of(cls, cfg: DINOv2Config, steps_per_epoch: int, global_batch: int) -> "Schedules":
        total = max(1, int(round(cfg.epochs * steps_per_epoch)))
        lr = cfg.base_lr * math.sqrt(global_batch / 1024)
        return cls(
            lr=WarmupCosine(total, int(round(cfg.warmup_epochs * steps_per_epoch)), lr, cfg.min_lr),
            wd=WarmupCosine(total, 0, cfg.weight_decay, cfg.weight_decay_end),
            momentum=WarmupCosine(total, 0, cfg.momentum_teacher, cfg.momentum_teacher_end),
            teacher_temp=WarmupCosine(
                total, int(round(cfg.warmup_teacher_temp_epochs * steps_per_epoch)),
                cfg.teacher_temp, cfg.teacher_temp, start=cfg.warmup_teacher_temp),
            freeze_last_layer_steps=int(round(cfg.freeze_last_layer_epochs * steps_per_epoch)),
        )


def final_norm_tokens(backbone, x: torch.Tensor, masks: torch.Tensor | None = None):
    """(CLS [B, D], patches [B, N, D]) after the final norm, registers dropped."""
    tokens, grid = backbone.prepare_tokens(x, masks=masks)
    out, _ = backbone.run_blocks(tokens, grid=grid)
    out = backbone.norm(out)
    return out[:, 0], out[:, backbone.num_prefix_tokens:]


class DINOv2(nn.Module):
    """Student (``backbone``, ``dino_head``, optional ``ibot_head``) and its EMA teacher."""

    def __init__(self, cfg: DINOv2Config, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.student = nn.ModuleDict({"backbone": backbone, **self._heads(backbone)})
        # legacy weight_norm modules cannot be deep-copied: the teacher's heads are built anew
        # and given the student's weights
        self.teacher = nn.ModuleDict({"backbone": copy.deepcopy(backbone), **self._heads(backbone)})
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.gram_teacher = None
        if cfg.gram_weight > 0:
            self.gram_teacher = copy.deepcopy(self.teacher["backbone"])
        k_ibot = cfg.ibot_prototypes if cfg.ibot_separate_head else cfg.prototypes
        self.dino_center = Centering(cfg.prototypes)
        self.ibot_center = Centering(k_ibot)
        for i, blk in enumerate(backbone.blocks):
            if i < cfg.freeze_backbone_blocks:
                for p in blk.parameters():
                    p.requires_grad_(False)

    def _heads(self, backbone) -> dict[str, nn.Module]:
        cfg, dim = self.cfg, backbone.cfg.embed_dim
        heads = {"dino_head": DINOHead(dim, cfg.prototypes, cfg.head_hidden, cfg.head_bottleneck,
                                       cfg.head_layers)}
        if cfg.ibot_separate_head:
            heads["ibot_head"] = DINOHead(dim, cfg.ibot_prototypes, cfg.head_hidden,
                                          cfg.head_bottleneck, cfg.head_layers)
        return heads

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # always: the teacher has no dropout/drop-path of its own
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    def _ibot_head(self, which: nn.ModuleDict) -> nn.Module:
        return which["ibot_head"] if "ibot_head" in which else which["dino_head"]

    def losses(self, globals_: torch.Tensor, locals_: torch.Tensor | None, masks: torch.Tensor,
               teacher_temp: float) -> dict[str, torch.Tensor]:
        """``globals_`` [2B, C, G, G] (crop 1 of every image, then crop 2), ``locals_``
        [n_l·B, C, L, L] (local crop j of every image, j by j) or None, ``masks`` [2B, N] bool
        (True = masked for the student). Returns every loss term and ``total``."""
        cfg = self.cfg
        two_b = globals_.shape[0]
        b = two_b // 2
        targets_net = self.target_network()
        at = self.ibot_positions(masks)
        with torch.no_grad():
            t_cls, t_patch = final_norm_tokens(targets_net["backbone"], globals_)
            t_logits = targets_net["dino_head"](t_cls)
            t_masked = self._ibot_head(targets_net)(t_patch[at])
            if cfg.centering == "sinkhorn_knopp":
                dino_t = sinkhorn_knopp(t_logits, teacher_temp)
                n_masked = all_sum(torch.tensor(float(t_masked.shape[0]), device=t_masked.device))
                ibot_t = (sinkhorn_knopp(t_masked, teacher_temp, n_total=float(n_masked))
                          if t_masked.shape[0] else t_masked.float())
            else:
                dino_t = self.dino_center.targets(t_logits, teacher_temp)
                ibot_t = self.ibot_center.targets(t_masked, teacher_temp)
        s_cls, s_patch = final_norm_tokens(self.student["backbone"], globals_, masks=masks)
        student_logits = [self.student["dino_head"](s_cls)]
        if locals_ is not None and locals_.shape[0]:
            l_cls, _ = final_norm_tokens(self.student["backbone"], locals_)
            student_logits.append(self.student["dino_head"](l_cls))
        logits = torch.cat(student_logits)
        views = list(logits.split(b))
        dino = dino_loss(views, list(dino_t.split(b)), cfg.student_temp)
        s_masked = self._ibot_head(self.student)(s_patch[at])
        counts = at.sum(dim=1, keepdim=True).clamp_min(1).float()
        weights = (1.0 / counts).expand_as(at)[at]
        ibot = ibot_loss(s_masked, ibot_t, weights, two_b, cfg.student_temp)
        koleo = sum(koleo_loss(c) for c in s_cls.split(b)) if cfg.koleo_weight > 0 \
            else s_cls.new_zeros(())
        total = cfg.dino_weight * dino + cfg.ibot_weight * ibot + cfg.koleo_weight * koleo
        out = {"dino": dino, "ibot": ibot, "koleo": koleo / 2}
        if self.gram_teacher is not None:
            with torch.no_grad():
                _, g_patch = final_norm_tokens(self.gram_teacher, globals_)
            gram = gram_loss(s_patch, g_patch)
            total = total + cfg.gram_weight * gram
            out["gram"] = gram
        out["total"] = total
        # the collapse monitors watch the network being learned: the EMA teacher here (what
        # DINOv2 releases); a distillation student where the targets come from a frozen network
        watched = targets_net is self.teacher
        out["teacher_embeddings"] = (t_cls if watched else s_cls).detach()
        out["teacher_probs"] = (dino_t if watched else torch.softmax(
            logits[:two_b].float() / cfg.student_temp, dim=-1)).detach()
        return out

    def target_network(self) -> nn.ModuleDict:
        """The network whose outputs are the targets: the EMA teacher (a distillation run
        overrides it with its frozen teacher)."""
        return self.teacher

    def ibot_positions(self, masks: torch.Tensor) -> torch.Tensor:
        """Where the iBOT loss is taken: the masked patches."""
        return masks

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher ← m·teacher + (1 − m)·student, over backbone and heads."""
        t = [p for p in self.teacher.parameters()]
        s = [p.detach() for p in self.student.parameters()]
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1 - momentum)

    @torch.no_grad()
    def refresh_gram_teacher(self) -> None:
        if self.gram_teacher is not None:
            self.gram_teacher.load_state_dict(self.teacher["backbone"].state_dict())

    def clip_gradients(self, max_norm: float) -> dict[str, float]:
        """Clip each student sub-module (backbone, each head) to ``max_norm`` separately."""
        norms = {}
        for name, module in self.student.items():
            params = [p for p in module.parameters() if p.grad is not None]
            if params and max_norm > 0:
                norms[name] = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        return norms


def param_groups(model: DINOv2) -> list[dict]:
    """AdamW groups of the student (spec §1.6): layer-wise lr decay (layer 0: embeddings and
    prefix tokens, i+1: block i, L+1: the rest), patch embedding ×``patch_embed_lr_mult``, no
    weight decay for biases, norms and LayerScale, ``is_last_layer`` for the heads' last
    layers. Each group carries ``lr_mult``, ``wd_mult`` and ``is_last_layer``; the trainer sets
    ``lr``/``weight_decay`` per step from them."""
    cfg = model.cfg
    depth = len(model.student["backbone"].blocks)
    groups: dict[tuple, dict] = {}
    for name, p in model.student.named_parameters():
        if not p.requires_grad:
            continue
        lr_mult = 1.0
        if name.startswith("backbone."):
            sub = name[len("backbone."):]
            if sub.startswith(("pos_embed", "patch_embed", "mask_token", "cls_token",
                               "reg_token")):
                layer = 0
            elif sub.startswith("blocks."):
                layer = int(sub.split(".")[1]) + 1
            else:
                layer = depth + 1
            lr_mult = cfg.layer_decay ** (depth + 1 - layer)
            if sub.startswith("patch_embed"):
                lr_mult *= cfg.patch_embed_lr_mult
        wd_mult = 0.0 if (name.endswith(".bias") or "norm" in name or "gamma" in name) else 1.0
        last = "last_layer" in name
        key = (lr_mult, wd_mult, last)
        group = groups.setdefault(key, {"params": [], "names": [], "lr_mult": lr_mult,
                                        "wd_mult": wd_mult, "is_last_layer": last})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def set_step_values(optimizer: torch.optim.Optimizer, sched: Schedules, step: int) -> None:
    lr, wd = sched.lr(step), sched.wd(step)
    for g in optimizer.param_groups:
        g["lr"] = 0.0 if (g["is_last_layer"] and step < sched.freeze_last_layer_steps) \
            else lr * g["lr_mult"]
        g["weight_decay"] = wd * g["wd_mult"]
