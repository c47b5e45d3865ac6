"""The pretraining methods one trainer (:mod:`ssl_backbone.pretrain`) drives: DINOv2, I-JEPA,
MSN, PMSN, and DINOv2's distillation into a smaller student. A method says what differs — its config, its model (``student``/``teacher``
module dicts with a ``backbone`` each), the views of one window, how a batch is put together,
its loss call, its schedules and parameter groups — and nothing else; the loop, data order,
resume, processes, monitors, logs and export are the trainer's, shared by all.

Each per-window and per-batch draw comes from the generator the trainer passes in (a pure
function of seed, epoch and index/step), so every method resumes bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ssl_backbone.augment import band_stats, dihedral, multi_crop, random_resized_crop
from ssl_backbone.errors import ConfigError


def simple_param_groups(model, no_decay: Callable[[str], bool] = lambda name: False) -> list[dict]:
    """AdamW groups without layer decay: biases, norms, 1-D parameters and ``no_decay`` names
    without weight decay (I-JEPA, MSN). The keys are those :func:`set_step_values` reads."""
    groups = {0.0: {"params": [], "names": [], "lr_mult": 1.0, "wd_mult": 0.0, "is_last_layer": False},
              1.0: {"params": [], "names": [], "lr_mult": 1.0, "wd_mult": 1.0, "is_last_layer": False}}
    for name, p in model.student.named_parameters():
        if not p.requires_grad:
            continue
        wd = 0.0 if (p.ndim <= 1 or name.endswith(".bias") or no_decay(name)) else 1.0
        groups[wd]["params"].append(p)
        groups[wd]["names"].append(name)
    return [g for g in groups.values() if g["params"]]


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    m, s = band_stats(mean, std, x.shape[-3])
    return (x.float() / 255.0 - m) / s


@dataclass(frozen=True)
class Method:
    name: str
    config: type
    input_px: Callable[[Any], int]  # the size a window must have at least
    views: Callable[[Any, torch.Tensor, torch.Generator], Any]  # (cfg, uint8 window, gen)
    collate: Callable[[Any, int, list, torch.Generator], tuple]  # (cfg, patch, items, gen)
    build: Callable[[Any, torch.nn.Module], torch.nn.Module]
    losses: Callable[[torch.nn.Module, tuple, Any, int], dict]  # (model, batch, sched, step)
    schedules: Callable[[Any, int, int], Any]  # (cfg, steps/epoch, global batch)
    run_steps: Callable[[Any, int], int]  # (cfg, steps/epoch) → steps of the run
    param_groups: Callable[[torch.nn.Module], list]
    log_terms: tuple[str, ...]


def _steps(cfg, steps_per_epoch: int) -> int:
    return max(1, int(round(cfg.epochs * steps_per_epoch)))


# ---------------------------------------------------------------------------------- DINOv2


def _dinov2(name: str = "dinov2") -> Method:
    """DINOv2, or (``distill``) its step against a frozen teacher (:mod:`ssl_backbone.distill`):
    the same views, batches, losses, schedules and parameter groups."""
    from ssl_backbone.dinov2 import DINOv2, DINOv2Config, Schedules, param_groups
    from ssl_backbone.distill import DistillConfig, DistillDINOv2
    from ssl_backbone.masking import batch_masks

    def collate(cfg, patch, items, gen):
        b = len(items)
        globals_ = torch.stack([it[0][g] for g in range(2) for it in items])
        locals_ = (torch.stack([it[1][j] for j in range(cfg.crops.n_local) for it in items])
                   if cfg.crops.n_local else None)
        n = cfg.crops.global_size // patch
        masks = batch_masks(2 * b, n, n, gen, cfg.mask_probability, cfg.mask_ratio)
        return globals_, locals_, masks

    return Method(
        name=name, config=DistillConfig if name == "distill" else DINOv2Config,
        input_px=lambda cfg: cfg.crops.global_size,
        views=lambda cfg, img, gen: multi_crop(img, cfg.crops, gen), collate=collate,
        build=DistillDINOv2 if name == "distill" else DINOv2,
        losses=lambda model, batch, sched, step: model.losses(*batch, sched.teacher_temp(step)),
        schedules=Schedules.of, run_steps=_steps, param_groups=param_groups,
        log_terms=("dino", "ibot", "koleo"))


# ---------------------------------------------------------------------------------- I-JEPA


def _ijepa() -> Method:
    from ssl_backbone.ijepa import IJEPA, IJEPAConfig, multiblock_masks
    from ssl_backbone.runtime import EmaSchedules

    def views(cfg, img, gen):
        crop = dihedral(random_resized_crop(img, cfg.image_size, cfg.crop_scale, gen), gen)
        return _normalise(crop, cfg.mean, cfg.std)

    def collate(cfg, patch, items, gen):
        n = cfg.image_size // patch
        ctx, tgt = multiblock_masks(len(items), n, n, cfg, gen)
        return torch.stack(items), ctx, tgt

    return Method(
        name="ijepa", config=IJEPAConfig, input_px=lambda cfg: cfg.image_size, views=views,
        collate=collate, build=IJEPA,
        losses=lambda model, batch, sched, step: model.losses(*batch),
        schedules=EmaSchedules.of, run_steps=_steps, param_groups=simple_param_groups,
        log_terms=("jepa",))


# ---------------------------------------------------------------------------------- MSN / PMSN


def _msn(name: str) -> Method:
    from ssl_backbone.msn import MSN, MSNConfig, patch_keep
    from ssl_backbone.runtime import EmaSchedules

    def collate(cfg, patch, items, gen):
        b = len(items)
        target = torch.stack([it[0][0] for it in items])
        anchor = torch.stack([it[0][1] for it in items])
        focal = (torch.stack([it[1][j] for j in range(cfg.crops.n_local) for it in items])
                 if cfg.crops.n_local else None)
        n = (cfg.crops.global_size // patch) ** 2
        return target, anchor, focal, patch_keep(b, n, cfg.patch_drop, gen)

    return Method(
        name=name, config=MSNConfig, input_px=lambda cfg: cfg.crops.global_size,
        views=lambda cfg, img, gen: multi_crop(img, cfg.crops, gen), collate=collate,
        build=MSN, losses=lambda model, batch, sched, step: model.losses(*batch),
        schedules=lambda cfg, spe, gb: EmaSchedules.of(cfg, spe, gb, cfg.schedule_scale),
        run_steps=_steps,
        param_groups=lambda model: simple_param_groups(model, lambda n: n.startswith("prototypes")),
        log_terms=("msn", "memax"))


def method_named(name: str) -> Method:
    makers = {"dinov2": _dinov2, "ijepa": _ijepa, "msn": lambda: _msn("msn"),
              "pmsn": lambda: _msn("pmsn"), "distill": lambda: _dinov2("distill")}
    if name not in makers:
        raise ConfigError(f"unknown pretraining method {name!r} (one of {', '.join(makers)})",
                          field="method")
    return makers[name]()


def method_of(cfg) -> Method:
    """The method a config belongs to (an MSN config with a power-law prior is PMSN)."""
    from ssl_backbone.dinov2 import DINOv2Config
    from ssl_backbone.distill import DistillConfig
    from ssl_backbone.ijepa import IJEPAConfig
    from ssl_backbone.msn import MSNConfig

    if isinstance(cfg, DistillConfig):  # a DINOv2Config too: asked first
        return method_named("distill")
    if isinstance(cfg, DINOv2Config):
        return method_named("dinov2")
    if isinstance(cfg, IJEPAConfig):
        return method_named("ijepa")
    if isinstance(cfg, MSNConfig):
        return method_named("pmsn" if cfg.prior == "power_law" else "msn")
    raise ConfigError(f"no pretraining method takes a {type(cfg).__name__}", field="method")


def config_for(name: str, fields: dict):
    """The typed config of method ``name`` from a mapping (strict: unknown keys refused);
    ``pmsn`` is MSN with the power-law prior unless the mapping says otherwise."""
    method = method_named(name)
    if name == "distill":  # the head settings come from the teacher run
        from ssl_backbone.distill import distill_config

        return distill_config(fields)
    if name == "pmsn":
        fields = {"prior": "power_law", **fields}
    cfg = method.config.from_dict(fields)
    if name == "msn" and cfg.prior != "uniform":
        raise ConfigError("method msn has the uniform prior; use method pmsn for a power law",
                          field="prior")
    return cfg


__all__ = ["Method", "config_for", "method_named", "method_of", "simple_param_groups"]
