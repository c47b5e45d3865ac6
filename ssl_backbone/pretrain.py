"""The self-supervised pretraining loop: data order, steps, resume, logs, monitors, export.

Runs in one CPU process, on one GPU, or in N processes under ``torchrun`` (gradients averaged
over ranks after each backward, as DDP does, or parameters sharded with ``fsdp``:
:mod:`ssl_backbone.sharding`; the teacher targets' batch statistics are all-reduced in
:mod:`ssl_backbone.losses`). Imagery comes from any :class:`WindowSource`:
:class:`ImageFolderWindows` here (JPEG/PNG through torchvision), or the georeferenced readers
``canopy pretrain`` passes in (this package imports nothing from ``canopy``).

Invariant: a run stopped after step k and resumed continues bit for bit as if it had not
stopped (:mod:`ssl_backbone.runtime`). Why it holds: the windows of step s are a pure function
of (seed, epoch, s): the epoch's order is a permutation drawn from (seed, epoch), each window's
position and crops from a generator seeded by (seed, epoch, index), each batch's masks from
(seed, epoch, step); everything else that changes (model, teacher, optimizer, centres, the
RNG streams drop-path draws from) is in the checkpoint. The "epoch" is the data's: every
window of the source once (DINOv2 fixed it at 1,250 iterations, whatever the data).
"""

from __future__ import annotations

import csv
import gc
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.distributed as dist

from ssl_backbone.dinov2 import set_step_values
from ssl_backbone.errors import BackboneError, CheckpointError, ConfigError
from ssl_backbone.methods import Method, method_of
from ssl_backbone.monitors import collapse_report
from ssl_backbone.runtime import (
    PRETRAIN_CHECKPOINT_FORMAT, PRETRAIN_CHECKPOINT_VERSION, DistInfo, barrier, capture_rng_state,
    init_distributed, load_checkpoint, restore_rng_state, restore_training_state,
    save_checkpoint, seed_all, training_state)
from ssl_backbone.sharding import (
    ShardedModelState, ShardedOptimizerState, local_elements, read_on_first, shard_model)

CHECKPOINT_FORMAT, CHECKPOINT_VERSION = PRETRAIN_CHECKPOINT_FORMAT, PRETRAIN_CHECKPOINT_VERSION
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DataError(BackboneError):
    """The imagery cannot feed a run (no readable windows, windows smaller than the crops)."""


class TrainingStopped(BackboneError):
    """The loss became NaN or infinite; the message says at which step and what to change."""


class WindowSource(Protocol):
    """Windows of imagery: ``len()`` windows make an epoch; ``window(i, gen)`` is window i's
    pixels (uint8 [C, S, S], S = ``window_px``), its position inside its image drawn from
    ``gen`` only. C is the source's ``channels`` attribute when it has one (4: RGB +
    near-infrared; the backbone is built for it), else 3."""

    window_px: int

    def __len__(self) -> int: ...

    def window(self, index: int, gen: torch.Generator) -> torch.Tensor: ...


class ImageFolderWindows:
    """Random ``window_px`` windows from a folder of JPEG/PNG images (Pillow, torchvision's
    own dependency: torchvision's decoders are deprecated);
    an image gives ⌊area / window_px²⌋ windows per epoch (at least one). Images smaller than a
    window are left out and listed in ``skipped``."""

    def __init__(self, folder: str | os.PathLike, window_px: int = 256):
        import numpy as np
        from PIL import Image

        self.window_px = window_px
        self.images: list[torch.Tensor] = []
        self.skipped: list[str] = []
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        for p in files:
            try:
                with Image.open(p) as im:
                    img = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
            except (OSError, ValueError) as exc:
                self.skipped.append(f"{p}: unreadable ({exc})")
                continue
            if min(img.shape[-2:]) < window_px:
                self.skipped.append(f"{p}: {img.shape[-1]}×{img.shape[-2]} px, smaller than a "
                                    f"{window_px}-px window")
                continue
            self.images.append(img)
        if not self.images:
            raise DataError(f"{folder}: no readable JPEG/PNG image of at least {window_px}×"
                            f"{window_px} px" + (f" ({len(self.skipped)} left out)"
                                                if self.skipped else ""))
        self.counts = [max(1, img.shape[-1] * img.shape[-2] // window_px ** 2)
                       for img in self.images]
        self.starts = torch.tensor([0] + self.counts).cumsum(0)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def window(self, index: int, gen: torch.Generator) -> torch.Tensor:
        i = int(torch.searchsorted(self.starts, torch.tensor(index), right=True)) - 1
        img = self.images[i]
        h, w = img.shape[-2:]
        s = self.window_px
        top = int(torch.randint(h - s + 1, (), generator=gen))
        left = int(torch.randint(w - s + 1, (), generator=gen))
        return img[:, top:top + s, left:left + s].contiguous()


def _gen(*parts: int) -> torch.Generator:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2 ** 63 - 1)
    return torch.Generator().manual_seed(seed)


class _Views(torch.utils.data.Dataset):
    """Item (epoch, index) → that window's views for the method (a pure function of both)."""

    def __init__(self, source: WindowSource, method: Method, cfg, seed: int):
        self.source, self.method, self.cfg, self.seed = source, method, cfg, seed

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key):
        if key[0] == "step":  # the batch's marker (see _StepSampler), passed to the collate
            return key
        epoch, index = key
        gen = _gen(self.seed, epoch, index)
        return self.method.views(self.cfg, self.source.window(index, gen), gen)


@dataclass
class _Collate:
    method: Method
    cfg: object
    patch: int
    rank: int = 0

    def __call__(self, items):
        (_, epoch, step), items = items[0], items[1:]
        # the batch's draws (masks, kept patches) from its step and rank: the same on resume,
        # different on each process (one rank 0 draw everywhere would repeat its masks W times)
        gen = (_gen(self.cfg.seed, epoch, step, 7) if self.rank == 0
               else _gen(self.cfg.seed, epoch, step, 7, self.rank))
        return self.method.collate(self.cfg, self.patch, items, gen)


class _StepSampler(torch.utils.data.Sampler):
    """For steps ``start … stop-1`` of one epoch: [("step", epoch, step), (epoch, i₁), …
    (epoch, i_B)], this rank's share of the epoch's permutation (the marker lets the collate
    draw the batch's masks from its step)."""

    def __init__(self, n: int, batch: int, info: DistInfo, seed: int, epoch: int, start: int,
                 stop: int):
        self.perm = torch.randperm(n, generator=_gen(seed, epoch)).tolist()
        self.batch, self.info, self.epoch, self.start, self.stop = batch, info, epoch, start, stop

    def __len__(self):
        return self.stop - self.start

    def __iter__(self):
        glob = self.batch * self.info.world_size
        for step in range(self.start, self.stop):
            first = step * glob + self.info.rank * self.batch
            yield [("step", self.epoch, step)] + [(self.epoch, i)
                                          for i in self.perm[first:first + self.batch]]


def build_backbone(cfg, in_chans: int = 3):
    """The student backbone for ``in_chans`` input bands: a variant from scratch, or continued
    from ``cfg.init`` (an RGB backbone grows a near-infrared input when ``in_chans`` is 4)."""
    from ssl_backbone.checkpoints import load_backbone
    from ssl_backbone.vit import VARIANTS, build_vit

    if cfg.init:
        vit, vcfg = load_backbone(cfg.init, source=f"--init {cfg.init}", in_chans=in_chans)
        if cfg.drop_path_rate:
            fresh = build_vit(replace(vcfg, drop_path_rate=cfg.drop_path_rate))
            fresh.load_state_dict(vit.state_dict())
            vit = fresh
        return vit
    if cfg.arch not in VARIANTS:
        raise ConfigError(f"unknown arch {cfg.arch!r} (one of {', '.join(VARIANTS)})",
                          field="arch")
    return build_vit(replace(VARIANTS[cfg.arch], drop_path_rate=cfg.drop_path_rate,
                             in_chans=in_chans))


@dataclass
class PretrainResult:
    steps_done: int
    total_steps: int
    steps_per_epoch: int
    last: dict
    monitors: dict
    backbone_path: Path | None

    @property
    def collapsed(self) -> list[str]:
        return list(self.monitors.get("collapsed", []))


def pretrain(cfg, source: WindowSource, out_dir: str | os.PathLike, *,
             device: str = "cpu", precision: str = "fp32", resume: bool = False,
             max_steps: int | None = None, num_workers: int = 0, log_every: int = 10,
             checkpoint_every: int = 100, progress: Callable[[dict], None] | None = None,
             fsdp: bool = False) -> PretrainResult:
    """Run (or resume) pretraining with the method of ``cfg`` (a DINOv2, I-JEPA or MSN
    config: :mod:`ssl_backbone.methods`); writes ``checkpoint.pt`` (everything, heads
    included), ``log.csv``, ``config.json`` and, at the end, ``backbone.safetensors`` (the
    teacher's/target encoder's backbone, what the methods release) and ``summary.json``.
    ``max_steps`` stops early (the schedules still span ``cfg.epochs``), so a run can be done
    in several sittings. ``fsdp`` shards parameters, gradients and optimizer state over the
    processes (:mod:`ssl_backbone.sharding`; one process has nothing to shard) instead of
    keeping a whole copy on each; the checkpoint is the same either way."""
    method = method_of(cfg)
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be fp32 or bf16, got {precision!r}", field="precision")
    out = Path(out_dir)
    info = init_distributed(device)
    if info.world_size > 1 and device.startswith("cuda"):
        device = f"cuda:{info.local_rank}"
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists() and not resume:
        raise ConfigError(f"{out} already holds a run; pass resume to continue it, or choose "
                          "another folder", field="out_dir")
    if source.window_px < method.input_px(cfg):
        raise DataError(f"windows of {source.window_px} px are smaller than the "
                        f"{method.input_px(cfg)}-px crop {method.name} takes")
    glob_batch = cfg.batch_size * info.world_size
    steps_per_epoch = len(source) // glob_batch
    if steps_per_epoch < 1:
        raise DataError(f"the imagery gives {len(source)} windows per epoch, fewer than one "
                        f"batch of {glob_batch}")
    seed_all(cfg.seed)  # every rank builds the same initial weights
    backbone = build_backbone(cfg, getattr(source, "channels", 3))
    model = method.build(cfg, backbone).to(device)
    sharded = fsdp and info.world_size > 1
    if sharded:  # before the optimizer: sharding replaces the parameters
        shard_model(model, device)
    optimizer = torch.optim.AdamW(method.param_groups(model), betas=(0.9, 0.999))
    sched = method.schedules(cfg, steps_per_epoch, glob_batch)
    total = method.run_steps(cfg, steps_per_epoch)
    stateful = ({"model": ShardedModelState(model),
                 "optimizer": ShardedOptimizerState(model, optimizer)} if sharded
                else {"model": model, "optimizer": optimizer})
    step = 0
    if resume and ckpt_path.exists():
        state = (read_on_first(ckpt_path, info) if sharded else
                 load_checkpoint(ckpt_path, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION))
        if (not _same_config(state.get("backbone"), backbone.cfg)
                or not _same_config(state.get("config"), cfg)
                or state.get("method", "dinov2") != method.name):
            raise CheckpointError(f"{ckpt_path}: written by a run with another architecture or "
                                  "settings; resume with the same settings or start a new folder")
        step = restore_training_state(state, stateful, str(ckpt_path))
        ranks = state.get("rng_ranks")
        if info.world_size > 1 and ranks and len(ranks) == info.world_size:
            restore_rng_state(ranks[info.rank])  # each rank its own streams, not rank 0's
    else:
        seed_all(cfg.seed + 1000 * info.rank)  # drop-path streams differ between ranks
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(
            {"method": method.name, "config": cfg.to_dict(), "backbone": backbone.cfg.to_dict(),
             "steps_per_epoch": steps_per_epoch, "total_steps": total,
             "world_size": info.world_size, "fsdp": sharded,
             # the imagery bands the source read, when it says (a distilled student reads them)
             "bands": list(source.bands) if getattr(source, "bands", None) else None},
            indent=2) + "\n")
    stop = total if max_steps is None else min(total, step + max_steps)
    views = _Views(source, method, cfg, cfg.seed)
    collate = _Collate(method, cfg, backbone.cfg.patch_size, info.rank)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                              enabled=precision == "bf16")
    last: dict = {}
    monitors: dict = {}
    model.train()
    log_rows: list[dict] = []
    t0 = time.perf_counter()
    while step < stop:
        epoch, first = divmod(step, steps_per_epoch)
        last_in_epoch = min(steps_per_epoch, first + (stop - step))
        sampler = _StepSampler(len(source), cfg.batch_size, info, cfg.seed, epoch, first,
                               last_in_epoch)
        # its own generator: a loader seeds its workers from the global stream otherwise, and a
        # resumed run makes a loader mid-epoch where the uninterrupted run made none
        loader = torch.utils.data.DataLoader(views, batch_sampler=sampler, collate_fn=collate,
                                             num_workers=num_workers,
                                             generator=_gen(cfg.seed, epoch, first, 11))
        for batch in loader:
            set_step_values(optimizer, sched, step)
            optimizer.zero_grad(set_to_none=True)
            batch = tuple(None if t is None else t.to(device, non_blocking=True) for t in batch)
            with autocast:
                terms = method.losses(model, batch, sched, step)
            loss = terms["total"]
            bad = not bool(torch.isfinite(loss.detach()))
            if info.world_size > 1:  # every rank stops, or the others wait in the all-reduce
                flag = torch.tensor([float(bad)], device=loss.device)
                dist.all_reduce(flag)
                bad = bool(flag.item() > 0)
            if bad:
                raise TrainingStopped(f"the loss became {float(loss)} at step {step + 1}; lower "
                                      "base_lr or raise warmup_epochs")
            loss.backward()
            if not sharded:  # FSDP reduce-scatters the averaged gradients itself
                _average_gradients(model, info)
            norms = model.clip_gradients(cfg.clip_grad)
            optimizer.step()
            model.update_teacher(sched.momentum(step))
            step += 1
            if getattr(cfg, "gram_weight", 0) > 0 and step % max(1, round(cfg.gram_refresh_epochs
                                                           * steps_per_epoch)) == 0:
                model.refresh_gram_teacher()
            last = {k: float(v.detach()) for k, v in terms.items()
                    if isinstance(v, torch.Tensor) and v.ndim == 0}
            if step % log_every == 0 or step == stop:
                probs = terms.get("teacher_probs")
                monitors = collapse_report(terms["teacher_embeddings"].float(),
                                           None if probs is None else probs.float())
                temp = ({"teacher_temp": sched.teacher_temp(step - 1)}
                        if hasattr(sched, "teacher_temp") else {})
                row = {"step": step, "epoch": round(step / steps_per_epoch, 4), **last,
                       "lr": sched.lr(step - 1), **temp, "momentum": sched.momentum(step - 1),
                       **{f"grad_norm_{k}": v for k, v in norms.items()},
                       **{k: v for k, v in monitors.items() if k != "collapsed"},
                       "collapsed": ";".join(monitors["collapsed"]),
                       "seconds": round(time.perf_counter() - t0, 2)}
                log_rows.append(row)
                if progress is not None and info.is_main:
                    progress(row)
            if step % checkpoint_every == 0 or step == stop:
                ranks = _gather_rng(info)
                # a sharded state is gathered by every process (whole on the first)
                state = (training_state(step, stateful, config=cfg.to_dict(),
                                        backbone=backbone.cfg.to_dict(), method=method.name,
                                        rng_ranks=ranks) if info.is_main or sharded else None)
                if info.is_main:
                    _append_log(out / "log.csv", log_rows)
                    log_rows = []
                    save_checkpoint(ckpt_path, state, format=CHECKPOINT_FORMAT,
                                    version=CHECKPOINT_VERSION)
                barrier(info)
    path = None
    if info.is_main:
        if log_rows:
            _append_log(out / "log.csv", log_rows)
        if step >= total:
            path = export_backbone(ckpt_path, out / "backbone.safetensors")
        (out / "summary.json").write_text(json.dumps(
            {"steps_done": step, "total_steps": total, "last": last, "monitors": monitors,
             "parameter_elements_per_process": local_elements(model)},
            indent=2, default=str) + "\n")
    if sharded:
        # FSDP's modules hold communication handles in reference cycles: free them while the
        # process group lives, not at interpreter exit (where gloo's threads abort the process);
        # the last step's loss terms reach the model through their autograd graph
        terms = loss = batch = None  # noqa: F841
        del stateful, optimizer, model, backbone
        gc.collect()
        barrier(info)
    return PretrainResult(step, total, steps_per_epoch, last, monitors, path)


def _same_config(saved, cfg) -> bool:
    """Whether a checkpoint's config dict describes ``cfg``: read back through the config's own
    reader, so a run saved before a field existed (it takes that field's default) still
    resumes."""
    try:
        return type(cfg).from_dict(saved) == cfg
    except (ConfigError, TypeError):
        return False


def _gather_rng(info: DistInfo) -> list | None:
    """Every rank's RNG streams (drop path draws differ per rank), for rank 0's checkpoint."""
    if info.world_size <= 1:
        return None
    out = [None] * info.world_size
    dist.all_gather_object(out, capture_rng_state())
    return out


def _average_gradients(model, info: DistInfo) -> None:
    if info.world_size <= 1:
        return
    for p in model.student.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(info.world_size)


def _append_log(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    new = not path.exists()
    fields = list(rows[0])
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows(rows)


def export_backbone(run: str | os.PathLike, out_path: str | os.PathLike,
                    which: str = "teacher") -> Path:
    """The backbone of a run (its ``checkpoint.pt``, or the run folder) as a safetensors file
    that ``canopy train --backbone`` and ``--init`` read: the teacher's by default (what DINOv2
    releases), ``which="student"`` for the student's."""
    from ssl_backbone.checkpoints import save_safetensors

    run = Path(run)
    ckpt = run / "checkpoint.pt" if run.is_dir() else run
    if not ckpt.exists():
        raise CheckpointError(f"{run}: no checkpoint.pt (not a pretraining run folder)")
    state = load_checkpoint(ckpt, format=CHECKPOINT_FORMAT, version=CHECKPOINT_VERSION)
    prefix = f"{which}.backbone."
    sd = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    meta = {"format": "canopy-backbone", "method": state.get("method", "dinov2"), "which": which,
            "step": str(state["step"]), "backbone": json.dumps(state["backbone"])}
    if "crops" in state["config"]:
        meta["crops"] = json.dumps(state["config"]["crops"])
    return save_safetensors(sd, out_path, metadata=meta)
