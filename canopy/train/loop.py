"""The decoder training loop: frozen (or partly fine-tuned) ViT, DPT head, exact resume, DDP.

One function, :func:`train`, runs a whole job from a :class:`TrainConfig` and the in-memory chips
of :mod:`canopy.train.datasets`. What it does, and why:

* **Frozen backbone by default**, as the reference work: only the DPT decoder learns.
  ``finetune_blocks = N`` also trains the last N blocks (``-1``: the whole backbone, including
  the patch and position embeddings, which is what training from scratch needs). Frozen blocks
  run once under ``no_grad``; only the trainable tail runs with autograd (twice with cosub).
* **A fresh decoder that can learn.** The HRCH head normalises bins *linearly*
  ((relu(l) + 0.1)/Σ), so all-zero logits predict the middle of the range (50 m) and a confident
  low height needs logits in the hundreds. A fresh decoder therefore gets He init (PyTorch's
  default shrinks the signal through the DPT's ~15 unnormalised layers to nothing), its last bias
  set to the label histogram (scaled so the 0.1 floor is 5 % of the mass, so training starts at
  the mean height), a leaky surrogate gradient through the bins' relu and a small penalty on
  the logits' scale (see :mod:`canopy.train.losses`). Without these, training from scratch
  collapsed to a constant map in every configuration tried.
* AdamW with linear warm-up and cosine decay; gradient clipping; bf16 autocast (CPU or CUDA).
* **Exact resume.** The checkpoint holds model, optimizer, scheduler, every RNG state and the
  data position (epoch, step); batches and augmentations are pure functions of (seed, epoch,
  index), so N steps = N/2 + resume + N/2, bit for bit. Processes, RNG capture, the schedule
  and the atomic checkpoint file are the shared runtime's (:mod:`ssl_backbone.runtime`), which
  pretraining uses too; this module adds what is about height models.
* The backbone is run through the ViT's public token API (``prepare_tokens``, ``run_blocks``,
  ``tokens_to_maps``), the same steps as ``HeightModel.forward``.
* **DDP** when launched by ``torchrun`` (``WORLD_SIZE`` > 1): the global batch is split across
  ranks (rank r takes every world-size-th sample of it); rank 0 validates, logs and writes.
* Logs: ``log.csv`` (train rows every ``log_every`` steps, a validation row per epoch: loss, MAE,
  RMSE, bias via :mod:`canopy.evaluate.metrics`, and the mean-height baseline's MAE), TensorBoard
  too if it is installed. At the end the model is written in native format with a model card.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from canopy.errors import (
    CheckpointError, ConfigError, InputError, OptionError, OutputExistsError, RunInterrupted,
    TrainingDivergedError)
from canopy.model.auto import training_precision
from canopy.model.device import resolve_device
from canopy.progress import ProgressCallback, report
from canopy.model.config import HeightModelConfig
from canopy.model.dpt import DPTConfig
from canopy.model.height_model import PRECISIONS, HeightModel, autocast_context, match_input_grid
from canopy.train.augment import AugmentConfig
from canopy.train.cosub import enable_stochastic_depth, mutual_distillation
from canopy.train.datasets import (
    ChipDataset, ChipRecord, batch_indices, collate, label_heights, label_mean, steps_per_epoch)
from canopy.train.losses import (
    LeakyGradReLU, LossConfig, dense_loss, gedi_loss, logit_scale_penalty, loss_from_pairs,
    paired_pixels, relu_leaky_grad, train_bin_probabilities, train_heights)
from ssl_backbone.config import added_field
from ssl_backbone.config import from_dict as config_from_dict
from ssl_backbone.config import to_dict as config_to_dict
from ssl_backbone.runtime import (
    WarmupCosine, barrier, init_distributed, load_checkpoint, restore_training_state,
    save_checkpoint, seed_all, training_state)
from ssl_backbone.vit import VARIANTS, ViTConfig

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "canopy-train-checkpoint"
CHECKPOINT_VERSION = 1
LOG_NAME = "log.csv"
MODEL_DIR_NAME = "model"
LOG_COLUMNS = ("step", "epoch", "kind", "lr", "loss", "silog", "l1", "gedi", "cosub",
               "logit_reg", "grad_norm", "chips_per_s", "val_loss", "val_mae", "val_rmse", "val_bias",
               "val_pixels", "baseline_mae", "seconds")
HEAD_PRIOR_FLOOR_SHARE = 0.05


@dataclass
class TrainConfig:
    """Everything that defines a run (saved in the checkpoint and in ``train_config.json``)."""

    out_dir: str
    arch: str = "vit_small"              # backbone variant when no --backbone file is given
    backbone_path: str | None = None     # backbone-only weights (DINOv2, timm or canopy naming)
    init_model: str | None = None        # start from a whole height model (native/HRCH) instead
    decoder_channels: int | None = None  # DPT fusion width (default: by backbone width)
    in_bands: int = added_field(3)       # input bands: 3 (RGB) or 4 (RGB + near-infrared)
    n_bins: int = 256
    max_height_m: float = 100.0          # top bin centre (HRCH: 10 × 10 m)
    gsd: float = 0.25
    chip_size: int = 128
    steps: int | None = None             # total optimizer steps (or give epochs)
    epochs: int | None = None
    batch_size: int = 8                  # global batch (split across DDP ranks)
    lr: float = 1e-3                     # decoder learning rate
    backbone_lr_mult: float | None = None  # None: 0.1 for pretrained weights, 1 from scratch
    head_lr_mult: float = 1.0            # last conv of the head
    weight_decay: float = 1e-4
    warmup_steps: int | None = None      # default: 8 % of the steps
    min_lr_share: float = 0.01           # cosine decays to this share of the peak
    grad_clip: float = 1.0
    precision: str = "auto"              # auto: bf16 on GPUs and CPUs with native bf16, else fp32
    finetune_blocks: int = 0             # 0 frozen backbone; N last blocks; -1 all of it
    drop_path: float = 0.1               # stochastic depth on fine-tuned blocks (train time)
    cosub: bool = False
    cosub_weight: float = 0.5
    relu_leak: float = 0.05              # surrogate gradient of the bins' relu (0: plain relu)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    val_batch_size: int = 8
    device: str = "auto"                 # auto: a GPU when there is one
    threads: int | None = None
    stop_after_steps: int | None = None  # leave the run resumable after this step (time boxes)
    model_name: str = "canopy_trained"
    model_version: str = "1"
    tensorboard: bool = False

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return config_from_dict(cls, d, what="train config")

    def check(self) -> None:
        """Every setting that can be wrong, each error naming its field, before data is read."""
        if self.precision not in ("auto", *PRECISIONS):
            raise OptionError("precision", f"must be auto or one of {', '.join(PRECISIONS)}, "
                                           f"got '{self.precision}'")
        if (self.steps is None) == (self.epochs is None):
            raise OptionError("steps", "give exactly one of {steps} and {epochs}")
        for name in ("steps", "epochs", "batch_size", "val_batch_size", "log_every",
                     "checkpoint_every", "n_bins", "threads", "stop_after_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < (2 if name == "n_bins" else 1)):
                raise OptionError(name, f"must be a whole number ≥ {2 if name == 'n_bins' else 1}, "
                                        f"got {value!r}")
        if self.chip_size < 16:
            raise OptionError("chip_size", f"must be at least 16 px, got {self.chip_size}")
        for name in ("gsd", "lr", "max_height_m", "grad_clip"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise OptionError(name, f"must be a positive number, got {value!r}")
        for name, hi in (("weight_decay", math.inf), ("min_lr_share", 1.0), ("drop_path", 0.999),
                         ("cosub_weight", math.inf), ("relu_leak", 1.0), ("head_lr_mult", math.inf)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= hi):
                raise OptionError(name, f"must be between 0 and {hi:g}, got {value!r}")
        if self.backbone_lr_mult is not None and not self.backbone_lr_mult >= 0:
            raise OptionError("backbone_lr_mult", f"must be ≥ 0, got {self.backbone_lr_mult!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise OptionError("warmup_steps", f"must be ≥ 0, got {self.warmup_steps}")
        if self.cosub and self.finetune_blocks == 0:
            raise OptionError("cosub", "trains stochastic-depth submodels of the backbone: it "
                                       "needs {finetune_blocks} N (N ≥ 1, or -1 for all)")
        if self.backbone_path and not Path(self.backbone_path).exists():
            raise OptionError("backbone_path", f"'{self.backbone_path}': file not found")
        if self.init_model and not Path(self.init_model).exists():
            raise OptionError("init_model", f"'{self.init_model}': not found")
        if self.in_bands not in (3, 4):
            raise OptionError("in_bands", f"must be 3 (RGB) or 4 (RGB + near-infrared), got "
                                          f"{self.in_bands!r}")
        if self.arch not in VARIANTS and self.backbone_path is None and self.init_model is None:
            raise OptionError("arch", f"'{self.arch}' is unknown (one of {', '.join(VARIANTS)})")


# 'Resume' must see the same job: these fields may differ between the first run and a resume.
# steps/epochs may grow: the run goes on with its cosine decay stretched to the new total.
RESUMABLE_DIFFERENCES = {"stop_after_steps", "threads", "log_every", "checkpoint_every",
                         "tensorboard", "val_batch_size", "out_dir", "device", "steps", "epochs"}


# ------------------------------------------------------------------------------------ model


def decoder_for(embed_dim: int, arch: str, n_bins: int, max_height_m: float,
                channels: int | None) -> DPTConfig:
    """DPT width rule: reassemble channels D/8…D as the DINOv2 depth heads and HRCH (ViT-L:
    128…1024, ViT-H: 160…1280); fusion width 256 from ViT-B up, narrower for CPU-sized models."""
    if arch == "vit_micro" and channels is None:
        post, ch, hidden = (16, 32, 64, 128), 32, 16
    else:
        post = tuple(max(16, embed_dim * f // 8) for f in (1, 2, 4, 8))
        ch = channels or (256 if embed_dim >= 768 else max(32, embed_dim // 2))
        hidden = 32
    scale = 10.0  # HRCH: bins in [0.001, max_depth] × 10 m
    return DPTConfig(post_process_channels=post, channels=ch, head_hidden=hidden,
                     n_bins=n_bins, min_depth=0.001, max_depth=max_height_m / scale,
                     output_scale=scale)


def build_model(cfg: TrainConfig) -> tuple[HeightModel, bool]:
    """The model to train, and whether its decoder is fresh (then the head prior applies)."""
    from canopy.model.checkpoints import load_model

    if cfg.init_model:
        model = load_model(cfg.init_model)
        if model.cfg.backbone.in_chans != cfg.in_bands:
            raise OptionError("init_model", f"'{cfg.init_model}' reads {model.cfg.backbone.in_chans} "
                                            f"bands; this run's data has {cfg.in_bands}")
        if abs(model.cfg.gsd - cfg.gsd) > 1e-9:
            warnings.warn(f"--init-model was trained at {model.cfg.gsd:g} m; this run trains it "
                          f"at {cfg.gsd:g} m and the result says so")
        model.cfg = replace(model.cfg, name=cfg.model_name, version=cfg.model_version,
                            gsd=cfg.gsd, tile_size=cfg.chip_size, trained=True,
                            source=f"fine-tuned from {cfg.init_model}")
        return model, False
    torch.manual_seed(cfg.seed)  # the same seed builds the same initial weights
    backbone_sd = None
    if cfg.backbone_path:
        from ssl_backbone.checkpoints import load_backbone

        # an RGB backbone grows a near-infrared input for 4-band data (its RGB kernels kept)
        vit, vcfg = load_backbone(cfg.backbone_path, source=f"--backbone {cfg.backbone_path}",
                                  in_chans=cfg.in_bands)
        backbone_sd = vit.state_dict()
        arch = f"vit{vcfg.embed_dim}x{vcfg.depth}/p{vcfg.patch_size}"
    else:
        vcfg = ViTConfig.from_dict({**VARIANTS[cfg.arch].to_dict(), "in_chans": cfg.in_bands})
        arch = cfg.arch
    dcfg = decoder_for(vcfg.embed_dim, cfg.arch if not cfg.backbone_path else arch, cfg.n_bins,
                       cfg.max_height_m, cfg.decoder_channels)
    from canopy.model.config import DINOV3_LICENCE

    hcfg = HeightModelConfig(
        name=cfg.model_name, version=cfg.model_version, backbone=vcfg, decoder=dcfg,
        gsd=cfg.gsd, tile_size=cfg.chip_size, trained=True,
        # weights grown from DINOv3's stay under its licence
        licence=DINOV3_LICENCE if cfg.backbone_path and vcfg.family == "dinov3" else "",
        source=f"canopy train ({'backbone ' + Path(cfg.backbone_path).name if cfg.backbone_path else arch + ' from scratch'})",
    )
    model = HeightModel(hcfg)
    if backbone_sd is not None:
        model.backbone.load_state_dict(backbone_sd)
    return model, True


def head_conv(model: HeightModel) -> nn.Conv2d:
    return model.decode_head.conv_depth.head[-1]


def head_prior_scale(n_bins: int, floor_share: float = HEAD_PRIOR_FLOOR_SHARE) -> float:
    """Σ relu(bias) such that the 0.1-per-bin floor is ``floor_share`` of the bin mass."""
    floor = 0.1 * n_bins
    return floor * (1.0 - floor_share) / floor_share


@torch.no_grad()
def init_decoder(model: HeightModel) -> None:
    """He (fan-in) init for the decoder's convs and linears, zero biases.

    PyTorch's default conv init shrinks activations by ~√3 per layer; through the DPT's fifteen
    or so layers the spatial signal all but vanishes (logits vary ~1e-3 across pixels at start),
    and training first spends thousands of steps re-amplifying it, or collapses to a constant.
    """
    for mod in model.decode_head.modules():
        if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.kaiming_normal_(mod.weight, mode="fan_in", nonlinearity="relu")
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)


@torch.no_grad()
def init_head_prior(model: HeightModel, heights: np.ndarray,
                    floor_share: float = HEAD_PRIOR_FLOOR_SHARE) -> float:
    """Set the head's last bias to the label histogram over bins; returns the scale used."""
    centres = (model.bin_centres * model.cfg.decoder.output_scale).cpu().numpy()
    k = len(centres)
    edges = np.concatenate([[-np.inf], (centres[1:] + centres[:-1]) / 2, [np.inf]])
    hist = np.histogram(np.clip(heights, centres[0], centres[-1]), bins=edges)[0].astype(np.float64)
    if hist.sum() == 0:
        hist[:] = 1.0
    prior = hist / hist.sum()
    prior = 0.98 * prior + 0.02 / k  # no bin starts dead (relu(0) has no gradient)
    scale = head_prior_scale(k, floor_share)
    conv = head_conv(model)
    conv.bias.copy_(torch.from_numpy(prior * scale).to(conv.bias))
    conv.weight.mul_(0.1)  # start near the prior everywhere; the features take over
    return scale


def set_trainable(model: HeightModel, finetune_blocks: int) -> int:
    """Freeze what is not trained; returns the index of the first trainable block."""
    vit = model.backbone
    depth = len(vit.blocks)
    n = depth if finetune_blocks < 0 else min(finetune_blocks, depth)
    first = depth - n
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    for blk in vit.blocks[first:]:
        for p in blk.parameters():
            p.requires_grad_(True)
    if n == depth:  # training all of it: embeddings and tokens too
        for p in (vit.cls_token, vit.pos_embed):
            p.requires_grad_(True)
        for p in vit.patch_embed.parameters():
            p.requires_grad_(True)
    for p in model.decode_head.parameters():
        p.requires_grad_(True)
    return first


@contextlib.contextmanager
def leaky_decoder_relus(model: HeightModel, leak: float):
    """During training, the decoder's last two relus pass a small gradient when negative.

    The head squeezes everything through a narrow relu (32 channels; 16 in the micro model)
    right before the bin logits. If one large step sends all of them negative, the map becomes
    a constant and no gradient ever reaches the layers below again; we saw exactly that in
    from-scratch runs. Forward values are unchanged, so is the saved model (no weights involved).
    """
    if leak <= 0:
        yield
        return
    head = model.decode_head.conv_depth.head
    project = model.decode_head.project
    has_project = hasattr(project, "conv")  # CHMv2's head has no post-fusion conv
    old_relu = head[3]
    head[3] = LeakyGradReLU(leak)
    if has_project:  # act='post' as a leaky-grad relu
        project.forward = lambda x: relu_leaky_grad(project.conv(x), leak)
    try:
        yield
    finally:
        head[3] = old_relu
        if has_project:
            del project.forward


class TrainForward(nn.Module):
    """Forward pass for training: frozen prefix once (no autograd), trainable tail ``views``
    times (two stochastic-depth submodels for cosub). Same numbers as ``HeightModel.forward``
    when ``views == 1`` and drop path is off (tested)."""

    def __init__(self, model: HeightModel, first_trainable: int):
        super().__init__()
        self.model = model
        self.first_trainable = first_trainable

    def forward(self, x: torch.Tensor, views: int = 1) -> list[torch.Tensor]:
        vit = self.model.backbone
        taps_at = sorted(vit.cfg.out_indices)
        first = self.first_trainable
        with torch.set_grad_enabled(torch.is_grad_enabled() and first == 0):
            tokens, grid = vit.prepare_tokens(x)
        with torch.no_grad() if first > 0 else contextlib.nullcontext():
            tokens, prefix_taps = vit.run_blocks(tokens, 0, first, taps=taps_at, grid=grid)
        outs = []
        for _ in range(views):
            _, tail_taps = vit.run_blocks(tokens, first, None, taps=taps_at, grid=grid)
            taps = {**prefix_taps, **tail_taps}
            logits = self.model.decode_head(vit.tokens_to_maps([taps[i] for i in taps_at], grid))
            outs.append(match_input_grid(logits, x.shape[-2:], vit.cfg.patch_size))
        return outs


# ------------------------------------------------------------------------------ optimisation


def param_groups(model: HeightModel, cfg: TrainConfig, head_mult: float) -> list[dict]:
    """AdamW groups: decoder, head's last conv (×head_mult), fine-tuned backbone (×mult);
    no weight decay on biases, norms and tokens (1-D or token tensors)."""
    head_ids = {id(p) for p in head_conv(model).parameters()}
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "head" if id(p) in head_ids else ("backbone" if name.startswith("backbone.") else "decoder")
        decay = p.ndim > 1 and not name.endswith(("cls_token", "pos_embed", "mask_token"))
        groups.setdefault((part, decay), []).append(p)
    pretrained = bool(cfg.backbone_path or cfg.init_model)
    bb = cfg.backbone_lr_mult if cfg.backbone_lr_mult is not None else (0.1 if pretrained else 1.0)
    mult = {"decoder": 1.0, "head": head_mult, "backbone": bb}
    return [{"params": ps, "lr": cfg.lr * mult[part], "weight_decay": cfg.weight_decay if decay else 0.0,
             "name": f"{part}{'' if decay else '_nodecay'}"}
            for (part, decay), ps in sorted(groups.items())]


# --------------------------------------------------------------------------------- state


def _save_checkpoint(path: Path, model: HeightModel, opt, sched, step: int, cfg: TrainConfig,
                     extra: dict) -> None:
    state = training_state(step, {"model": model, "optimizer": opt, "scheduler": sched},
                           model_config=model.cfg.to_dict(), train_config=cfg.to_dict(), **extra)
    save_checkpoint(path, state, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION)


def _load_checkpoint(path: Path) -> dict:
    try:
        return load_checkpoint(path, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION)
    except CheckpointError as exc:
        raise OptionError("resume", f"{{resume}}: {exc}") from None


def check_resume_config(saved: dict, cfg: TrainConfig, path: Path) -> None:
    now = cfg.to_dict()
    try:  # a run saved before a field existed holds that field's default
        saved = TrainConfig.from_dict(saved).to_dict()
    except ConfigError:
        pass  # keys this version no longer has: compared as they are, and named below
    diffs = sorted(k for k in now if k not in RESUMABLE_DIFFERENCES and saved.get(k) != now[k])
    if diffs:
        k = diffs[0]
        raise OptionError("resume", f"{{resume}}: {path} was written by a run with {k}={saved.get(k)!r}, "
                                    f"this one has {now[k]!r}; resume with the same settings "
                                    f"({len(diffs)} differ: {', '.join(diffs)})")


# ------------------------------------------------------------------------------------ logs


class RunLog:
    """``log.csv`` (rank 0); on resume, rows after the checkpoint's step are dropped so the file
    reads as one uninterrupted run."""

    def __init__(self, out_dir: Path, resume_step: int | None, tensorboard: bool,
                 say: Callable[[str], None] = lambda message: None):
        self.path = out_dir / LOG_NAME
        if resume_step is None or not self.path.exists():
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(LOG_COLUMNS)
        else:
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
            keep = [r for r in rows if int(r["step"]) <= resume_step]
            with open(self.path, "w", newline="") as f:
                w = csv.DictWriter(f, LOG_COLUMNS)
                w.writeheader()
                w.writerows(keep)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                say("note: tensorboard is not installed; logging to log.csv only")

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, LOG_COLUMNS).writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()
                 if k in LOG_COLUMNS})
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch") and math.isfinite(v):
                    self.tb.add_scalar(f"{row['kind']}/{k}", v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def validate(model: HeightModel, records: Sequence[ChipRecord], cfg: TrainConfig,
             device: torch.device, baseline: float | None = None) -> dict:
    """Loss and MAE/RMSE/bias on the validation chips, each at its target's resolution."""
    from canopy.evaluate.metrics import bias, mae, rmse

    was_training = model.training
    model.eval()
    fwd = TrainForward(model, len(model.backbone.blocks))
    ds = ChipDataset(records)
    preds, refs, losses, weights = [], [], [], []
    for start in range(0, len(ds), cfg.val_batch_size):
        batch = collate([ds.sample(i, 0) for i in range(start, min(len(ds), start + cfg.val_batch_size))])
        x = model.normalize(batch["image"].to(device))
        with autocast_context(device, cfg.precision):
            logits = fwd(x)[0]
        heights = model.heights(logits)
        valid = batch["valid"].to(device)
        targets = [t.to(device) for t in batch["targets"]]
        p, t = paired_pixels(heights, valid, targets, cfg.loss.min_target_coverage)
        terms = loss_from_pairs(p, t, cfg.loss)
        preds.append(p.float().cpu().numpy())
        refs.append(t.float().cpu().numpy())
        losses.append(float(terms["total"]))
        weights.append(p.numel())
    model.train(was_training)
    p = np.concatenate(preds) if preds else np.zeros(0)
    y = np.concatenate(refs) if refs else np.zeros(0)
    out = {"val_loss": float(np.average(losses, weights=weights)) if sum(weights) else math.nan,
           "val_mae": mae(p, y), "val_rmse": rmse(p, y), "val_bias": bias(p, y),
           "val_pixels": int(p.size)}
    if baseline is not None:
        out["baseline_mae"] = mae(np.full_like(y, baseline), y)
    return out


# ------------------------------------------------------------------------------------ train


@dataclass
class TrainResult:
    out_dir: Path
    model_dir: Path | None
    steps_done: int
    total_steps: int
    seconds: float
    final_val: dict
    baseline_height: float
    finished: bool
    history: list = field(default_factory=list)


def compute_loss(fwd: nn.Module, model: HeightModel, batch: dict, cfg: TrainConfig,
                 device: torch.device, logit_scale: float) -> dict[str, torch.Tensor]:
    """Regular loss (SiLog + L1 [+ GEDI]) on each view; with cosub, the views also teach each
    other through their bin distributions (teacher side detached)."""
    x = model.normalize(batch["image"].to(device))
    valid = batch["valid"].to(device)
    targets = [t.to(device) for t in batch["targets"]]
    views = 2 if cfg.cosub else 1
    with autocast_context(device, cfg.precision):
        logits = fwd(x, views=views)
    per_view, probs = [], []
    scale = model.cfg.decoder.output_scale
    for lg in logits:
        heights = train_heights(lg, model.bin_centres, scale, cfg.relu_leak,
                                model.cfg.decoder.bin_eps)
        terms = dense_loss(heights, valid, targets, cfg.loss)
        if cfg.loss.gedi_weight > 0:
            g, n = gedi_loss(heights, valid, [s.to(device) for s in batch["shots"]], model.cfg.gsd,
                             cfg.loss)
            terms["gedi"] = g
            terms["total"] = terms["total"] + cfg.loss.gedi_weight * g
        if cfg.loss.logit_reg > 0:
            terms["logit_reg"] = logit_scale_penalty(lg, logit_scale)
            terms["total"] = terms["total"] + cfg.loss.logit_reg * terms["logit_reg"]
        per_view.append(terms)
        if cfg.cosub:
            probs.append(train_bin_probabilities(lg, cfg.relu_leak, model.cfg.decoder.bin_eps))
    out = {k: sum(t[k] for t in per_view) / views for k in ("total", "silog", "l1")}
    for key in ("gedi", "logit_reg"):
        if key in per_view[0]:
            out[key] = sum(t[key] for t in per_view) / views
    if cfg.cosub:
        kl = mutual_distillation(probs, valid)
        out["cosub"] = kl
        out["total"] = out["total"] + cfg.cosub_weight * kl
    return out


def train(cfg: TrainConfig, train_records: Sequence[ChipRecord],
          val_records: Sequence[ChipRecord] = (), *, resume: bool = False,
          data_summary: dict | None = None, command: str | None = None,
          progress: ProgressCallback | None = None) -> TrainResult:
    """Run (or resume) a training job; writes checkpoint, log and, when done, the model."""
    cfg.check()
    if not train_records:
        raise InputError("no training chips: nothing to learn from")
    seen = {int(r.image.shape[0]) for r in (*train_records, *val_records)}
    if seen != {cfg.in_bands}:
        raise OptionError("in_bands", f"the model reads {cfg.in_bands} bands; the chips have "
                                      f"{', '.join(map(str, sorted(seen)))}")
    info = init_distributed(cfg.device)
    device = resolve_device(cfg.device if not cfg.device.startswith("cuda") or info.world_size == 1
                            else f"cuda:{info.local_rank}")
    if device.type == "cuda" and cfg.device == "auto" and info.world_size > 1:
        device = torch.device(f"cuda:{info.local_rank}")
    asked = cfg  # what the user asked for: the run's identity, saved in checkpoints
    cfg = replace(cfg, precision=training_precision(device, cfg.precision))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL needs each rank on its own GPU
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.batch_size % info.world_size:
        raise OptionError("batch_size", f"{cfg.batch_size} must be divisible by the "
                                        f"{info.world_size} processes")
    out = Path(cfg.out_dir)
    ck_path = out / CHECKPOINT_NAME
    if info.is_main:
        _prepare_out_dir(out, resume)
    barrier(info)

    def say(message: str | None = None) -> None:
        """Progress to the caller (rank 0 only): the step count, and a log line when given."""
        if info.is_main:
            report(progress, "steps", step, total, message)

    n = len(train_records)
    spe = steps_per_epoch(n, cfg.batch_size)
    total = cfg.steps if cfg.steps is not None else cfg.epochs * spe
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, round(0.08 * total))

    model, fresh_decoder = build_model(cfg)
    baseline = label_mean(train_records)
    prior_scale = head_prior_scale(model.cfg.decoder.n_bins)
    if fresh_decoder:
        init_decoder(model)
        prior_scale = init_head_prior(model, label_heights(train_records, seed=cfg.seed))
    head_mult = cfg.head_lr_mult
    first = set_trainable(model, cfg.finetune_blocks)
    if cfg.finetune_blocks != 0 and cfg.drop_path > 0:
        enable_stochastic_depth(model.backbone, cfg.drop_path, first)
    model.to(device).train()
    fwd: nn.Module = TrainForward(model, first)
    if info.world_size > 1:
        fwd = nn.parallel.DistributedDataParallel(
            fwd, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(param_groups(model, cfg, head_mult), betas=(0.9, 0.999), foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, WarmupCosine(total_steps=total, warmup_steps=warmup, base=1.0, final=cfg.min_lr_share))

    step = 0
    elapsed_before = 0.0
    history: list = []
    if resume and ck_path.exists():
        ck = _load_checkpoint(ck_path)
        check_resume_config(ck["train_config"], asked, ck_path)
        step = restore_training_state(
            ck, {"model": model, "optimizer": opt, "scheduler": sched}, str(ck_path))
        elapsed_before = float(ck.get("seconds", 0.0))
        history = list(ck.get("history", []))
        # the scheduler's state holds the schedule it ran with (LambdaLR stores its callable's
        # fields): a resume with more steps keeps that warm-up and stretches the decay
        before = sched.lr_lambdas[0]
        if before.total_steps != total:
            if total < step:
                raise OptionError("steps", f"{total} steps are fewer than the {step} already "
                                           f"done in {out}")
            sched.lr_lambdas = [WarmupCosine(total_steps=total, warmup_steps=before.warmup_steps,
                                             base=1.0, final=cfg.min_lr_share)
                                for _ in sched.lr_lambdas]
            say(f"extending the run from {before.total_steps} to {total} steps: the learning "
                "rate decays over the new total from here (the run is no longer identical to "
                f"one planned for {total} steps)")
        say(f"resumed from {ck_path} at step {step}/{total}")
    elif resume:
        say(f"--resume: no checkpoint in {out} yet; starting from step 0")
    else:
        seed_all(cfg.seed)  # drop-path masks etc. start from the seed

    if not (cfg.backbone_path or cfg.init_model) and cfg.finetune_blocks == 0:
        warnings.warn(f"the {cfg.arch} backbone has random weights and stays frozen: only the "
                      "decoder learns, from random features; pass --backbone FILE or "
                      "--finetune-blocks -1 to train it from scratch")
    log = RunLog(out, step if resume else None, cfg.tensorboard, say) if info.is_main else None
    ds = ChipDataset(train_records, cfg.augment, seed=cfg.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if info.is_main:
        (out / "train_config.json").write_text(json.dumps(asked.to_dict(), indent=2) + "\n")
        say(f"{device.type}, precision {cfg.precision}"
            + (" (auto)" if asked.precision == "auto" else ""))
        say(f"{n} training chips ({spe} steps/epoch), {len(val_records)} validation chips; "
            f"{total} steps of {cfg.batch_size}; {sum(p.numel() for p in trainable):,} trainable "
            f"parameters of {sum(p.numel() for p in model.parameters()):,}; mean-height "
            f"baseline {baseline:.2f} m")

    stop_at = min(total, cfg.stop_after_steps) if cfg.stop_after_steps else total
    t0 = time.perf_counter()
    window_t, window_chips = time.perf_counter(), 0
    final_val: dict = {}
    acc: dict[str, float] = {}
    acc_n = 0
    try:
        with leaky_decoder_relus(model, cfg.relu_leak):
            while step < stop_at:
                epoch, k = divmod(step, spe)
                idx = batch_indices(n, cfg.batch_size, cfg.seed, epoch, k, info.rank, info.world_size)
                batch = collate([ds.sample(i, epoch) for i in idx])
                terms = compute_loss(fwd, model, batch, cfg, device, prior_scale)
                if not torch.isfinite(terms["total"]):
                    # weights are about to become NaN: stop before that, with the last checkpoint
                    # intact and no model folder that looks finished
                    raise TrainingDivergedError(
                        f"training diverged at step {step + 1}: the loss is {float(terms['total'])} "
                        f"(learning rate {sched.get_last_lr()[0]:.3g}; try a lower {{lr}} or "
                        f"{{grad_clip}}); the last checkpoint in {out} is from step "
                        f"{_checkpoint_step(ck_path)}")
                opt.zero_grad(set_to_none=True)
                terms["total"].backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip))
                opt.step()
                sched.step()
                step += 1
                say()
                window_chips += len(idx) * info.world_size
                for key, v in terms.items():
                    acc[key] = acc.get(key, 0.0) + float(v.detach())
                acc["grad_norm"] = acc.get("grad_norm", 0.0) + grad_norm
                acc_n += 1
                end_of_epoch = (step % spe == 0) or step == total
                if info.is_main and (step % cfg.log_every == 0 or end_of_epoch or step == stop_at):
                    now = time.perf_counter()
                    row = {"step": step, "epoch": epoch, "kind": "train", "lr": sched.get_last_lr()[0],
                           "loss": acc["total"] / acc_n, "silog": acc["silog"] / acc_n,
                           "l1": acc["l1"] / acc_n, "gedi": acc.get("gedi", math.nan) / acc_n,
                           "cosub": acc.get("cosub", math.nan) / acc_n,
                           "logit_reg": acc.get("logit_reg", math.nan) / acc_n,
                           "grad_norm": acc["grad_norm"] / acc_n,
                           "chips_per_s": window_chips / max(now - window_t, 1e-9),
                           "seconds": elapsed_before + now - t0}
                    log.write(row)
                    say(f"step {step}/{total} loss {row['loss']:.4f} (silog {row['silog']:.3f}, "
                        f"L1 {row['l1']:.2f} m) {row['chips_per_s']:.1f} chips/s")
                    acc, acc_n = {}, 0
                    window_t, window_chips = now, 0
                if end_of_epoch and val_records and info.is_main:
                    final_val = validate(model, val_records, cfg, device, baseline)
                    row = {"step": step, "epoch": epoch, "kind": "val",
                           "seconds": elapsed_before + time.perf_counter() - t0, **final_val}
                    log.write(row)
                    history.append(row)
                    say(f"epoch {epoch}: val MAE {final_val['val_mae']:.2f} m, RMSE "
                        f"{final_val['val_rmse']:.2f} m, bias {final_val['val_bias']:+.2f} m "
                        f"(mean-height baseline MAE {final_val['baseline_mae']:.2f} m)")
                barrier(info)
                if info.is_main and (step % cfg.checkpoint_every == 0 or step == stop_at):
                    _save_checkpoint(ck_path, model, opt, sched, step, asked,
                                    {"seconds": elapsed_before + time.perf_counter() - t0,
                                     "history": history, "epoch": step // spe,
                                     "step_in_epoch": step % spe})
                barrier(info)

    except KeyboardInterrupt:
        # Ctrl-C mid-step: the state is not that of a finished step, so nothing is saved; the
        # last checkpoint is where --resume continues, bit for bit
        raise RunInterrupted(f"interrupted at step {step}/{total}; the checkpoint in {out} is "
                             f"from step {_checkpoint_step(ck_path)}", remedy="resume") from None
    seconds = elapsed_before + time.perf_counter() - t0
    finished = step >= total
    model_dir = None
    if finished and info.is_main:
        if val_records and not final_val:
            final_val = validate(model, val_records, cfg, device, baseline)
        from canopy.model.checkpoints import save_native

        model.eval()
        card = model_card(model, cfg, total, seconds, n, len(val_records), final_val, baseline,
                          data_summary or {}, command)
        model_dir = save_native(model, out / MODEL_DIR_NAME, card)
        summary = {"steps": total, "seconds": seconds, "train_chips": n,
                   "val_chips": len(val_records), "baseline_height_m": baseline,
                   "final_val": final_val, "data": data_summary or {}, "command": command}
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        say(f"model written to {model_dir}")
    if log is not None:
        log.close()
    barrier(info)
    return TrainResult(out, model_dir, step, total, seconds, final_val, baseline, finished, history)


def _checkpoint_step(path: Path) -> str:
    """The step of the checkpoint at ``path``, for messages ('none' when there is none)."""
    if not path.exists():
        return "none"
    try:
        return str(_load_checkpoint(path)["step"])
    except (InputError, KeyError):
        return "unknown"


def _prepare_out_dir(out: Path, resume: bool, create: bool = True) -> None:
    """Refuse a file, a non-empty folder (unless resuming) or an unwritable place; with
    ``create`` make the folder. The CLI checks first without creating, so a bad input found
    while reading the data leaves nothing behind."""
    if out.exists() and not out.is_dir():
        raise OptionError("out_dir", f"'{out}' exists and is not a folder")
    if out.exists() and not resume and any(p.name != "derived_chm" for p in out.iterdir()):
        raise OutputExistsError(f"'{out}' is not empty: another run, or something else; choose a "
                                "new folder", remedy="resume")
    if not create:
        parent = next((p for p in [out, *out.parents] if p.exists()), None)
        if parent is None or not os.access(parent, os.W_OK):
            raise OptionError("out_dir", f"'{out}': cannot write there")
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise OptionError("out_dir", f"'{out}': cannot write there ({exc.strerror})") from None


def model_card(model: HeightModel, cfg: TrainConfig, steps: int, seconds: float, n_train: int,
               n_val: int, val: dict, baseline: float, data: dict, command: str | None) -> str:
    """A short card for a model trained by ``canopy train`` (default_model writes a fuller one)."""
    m = model.cfg
    lines = [
        f"# {m.name} (version {m.version})", "",
        "Trained with `canopy train` (canopy-height).", "",
        "## Architecture",
        f"- backbone: ViT, width {m.backbone.embed_dim}, depth {m.backbone.depth}, patch "
        f"{m.backbone.patch_size}; {cfg.backbone_path or 'no pretrained weights (' + cfg.arch + ')'}",
        f"- decoder: DPT, {m.decoder.n_bins} height bins up to "
        f"{m.decoder.max_depth * m.decoder.output_scale:g} m",
        f"- ground sample distance {m.gsd:g} m, tile {m.tile_size} px", "",
        "## Training",
        f"- command: `{command or '(library call)'}`",
        f"- {steps} steps of {cfg.batch_size} chips, {n_train} training chips, {n_val} validation chips",
        f"- backbone: {'frozen' if cfg.finetune_blocks == 0 else ('all trained' if cfg.finetune_blocks < 0 else f'last {cfg.finetune_blocks} blocks fine-tuned')}"
        f"{', cosub' if cfg.cosub else ''}; precision {cfg.precision}; seed {cfg.seed}",
        f"- wall time {seconds / 60:.1f} min", "",
        "## Data", *[f"- {k}: {v}" for k, v in data.items()], "",
        "## Validation (chips held out by spatial block / separate synthetic scenes)",
    ]
    if val:
        lines += [f"- MAE {val['val_mae']:.2f} m, RMSE {val['val_rmse']:.2f} m, bias "
                  f"{val['val_bias']:+.2f} m over {val['val_pixels']:,} label cells",
                  f"- mean-height baseline ({baseline:.2f} m everywhere): MAE "
                  f"{val.get('baseline_mae', math.nan):.2f} m"]
    else:
        lines.append("- no validation chips")
    return "\n".join(lines) + "\n"
