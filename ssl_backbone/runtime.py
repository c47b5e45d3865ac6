"""The training runtime every trainer in the project shares: processes, randomness, schedules, checkpoints.

Decoder training (``canopy.train.loop``) uses it now; the self-supervised pretraining of this
package (DINOv2, I-JEPA, MSN) is built on it, so both resume the same way.

Invariant: a run stopped after step ``k`` and resumed from its checkpoint continues exactly as
the uninterrupted run would have, bit for bit, and a checkpoint file on disk is always either
the previous complete one or the new complete one.

Why it holds:

* everything that changes from step to step is captured in one dict by
  :func:`training_state` (the ``state_dict()`` of every stateful object the trainer names,
  the step, and every random stream: torch CPU, every CUDA device, numpy, Python) and put back
  by :func:`restore_training_state`; schedules are pure functions of the step
  (:class:`WarmupCosine`), so they hold no state of their own; the data order must be a pure
  function of (seed, epoch, index), which is the trainer's part;
* :func:`save_checkpoint` writes to a temporary file in the destination folder, flushes it to
  disk and renames it over the old file; a rename within one file system is atomic, so a crash
  at any moment leaves one complete file;
* :func:`load_checkpoint` refuses a file whose ``format`` is not the trainer's or whose
  ``version`` is newer than the trainer knows, before anything is restored from it.

Device, seeds and process layout are arguments or come from the ``torchrun`` environment;
nothing here picks them.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist

from ssl_backbone.errors import CheckpointError

#: The checkpoint.pt of a pretraining run (ssl_backbone.pretrain; read by distillation too).
#: The name predates the other methods; the run's config.json says which method wrote it.
PRETRAIN_CHECKPOINT_FORMAT = "ssl-dinov2"
PRETRAIN_CHECKPOINT_VERSION = 1

# ------------------------------------------------------------------------------ processes


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a (possibly one-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1): NCCL for a CUDA
    ``device``, gloo otherwise; on CUDA each process's current device is its local rank's GPU
    (collectives that place buffers on the current device, and FSDP, would all use GPU 0
    otherwise). A single process gets ``DistInfo()`` and no process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


def barrier(info: DistInfo) -> None:
    """Wait for every process of the job (nothing to wait for with one process)."""
    if info.world_size > 1:
        dist.barrier()


# ------------------------------------------------------------------------------ randomness


def seed_all(seed: int) -> None:
    """Seed torch (CPU and every CUDA device), numpy's global stream and Python's ``random``."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def capture_rng_state() -> dict:
    """Every global random stream a training step may draw from (CUDA only where present)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping) -> None:
    """Put back what :func:`capture_rng_state` captured. A state saved without CUDA restored on
    a CUDA machine leaves the CUDA streams as they are (and the reverse is ignored)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------ schedules


@dataclass(frozen=True)
class WarmupCosine:
    """A value per optimizer step: linear warm-up, then cosine decay to ``final``.

    ``schedule(step)`` is the value for the step with 0-based index ``step`` (what
    ``LambdaLR`` asks for). Warm-up climbs from ``start`` in ``warmup_steps`` equal increments,
    so step 0 already takes the first one (a step with value ``start`` = 0 would be wasted) and
    step ``warmup_steps - 1`` is at ``base``. Then a half cosine runs from ``base`` at step
    ``warmup_steps`` to ``final`` at step ``total_steps``, the count of steps, i.e. the value
    after the last step; later steps stay at ``final``. The same shape serves learning rates
    (as a multiplier: ``base`` 1, ``final`` the share kept), weight decay and EMA momentum (a
    rise: ``final`` > ``base``, no warm-up), as in DINOv2's cosine scheduler.
    """

    total_steps: int
    warmup_steps: int = 0
    base: float = 1.0
    final: float = 0.0
    start: float = 0.0

    def __call__(self, step: int) -> float:
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return self.start + (self.base - self.start) * ((step + 1) / self.warmup_steps)
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.final + (self.base - self.final) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LinearRamp:
    """A value per step rising (or falling) linearly from ``base`` at step 0 to ``final`` at
    step ``total_steps`` (I-JEPA's and MSN's EMA momentum); later steps stay at ``final``."""

    total_steps: int
    base: float
    final: float

    def __call__(self, step: int) -> float:
        t = min(1.0, max(0, step) / max(1, self.total_steps))
        return self.base + (self.final - self.base) * t


@dataclass(frozen=True)
class EmaSchedules:
    """The per-step values of I-JEPA and MSN (spec §3.3, §4.1): lr warm-up from ``start_lr``
    then cosine to ``min_lr``, weight decay cosine, EMA momentum linear; over ``span`` steps
    (MSN's schedules span 1.25× the run)."""

    lr: WarmupCosine
    wd: WarmupCosine
    momentum: LinearRamp
    freeze_last_layer_steps: int = 0

    @classmethod
    def of(cls, cfg, steps_per_epoch: int, global_batch: int, span_scale: float = 1.0
           ) -> "EmaSchedules":
        """From a config with ``epochs``, ``warmup_epochs``, ``base_lr`` (× √(global batch /
        1024)), ``start_lr``, ``min_lr``, ``weight_decay(_end)``, ``momentum_teacher(_end)``."""
        span = max(1, int(round(cfg.epochs * steps_per_epoch * span_scale)))
        scale = math.sqrt(global_batch / 1024)
        return cls(
            lr=WarmupCosine(span, int(round(cfg.warmup_epochs * steps_per_epoch)),
                            cfg.base_lr * scale, cfg.min_lr, start=cfg.start_lr * scale),
            wd=WarmupCosine(span, 0, cfg.weight_decay, cfg.weight_decay_end),
            momentum=LinearRamp(span, cfg.momentum_teacher, cfg.momentum_teacher_end))


# ------------------------------------------------------------------------------ checkpoints


RESERVED_KEYS = frozenset({"format", "version", "step", "rng"})


def training_state(step: int, stateful: Mapping[str, Any], **extra) -> dict:
    """What exact resume needs: ``{name: obj.state_dict()}`` for every stateful object (models,
    optimizers, schedulers, EMA teachers, loss centres…), the step and all RNG streams, plus
    ``extra`` entries (configs, timings) stored as given."""
    clash = (RESERVED_KEYS & (set(stateful) | set(extra))) | (set(stateful) & set(extra))
    if clash:
        raise ValueError(f"training_state: names {sorted(clash)} are used twice")
    return {"step": step, **{k: obj.state_dict() for k, obj in stateful.items()},
            "rng": capture_rng_state(), **extra}


def restore_training_state(state: Mapping, stateful: Mapping[str, Any], source: str = "checkpoint"
                           ) -> int:
    """Load every object of ``stateful`` from ``state``, then the RNG streams (last, so nothing
    loading draws from them); returns the step to continue from."""
    missing = [k for k in (*stateful, "rng", "step") if k not in state]
    if missing:
        raise CheckpointError(f"{source}: no '{missing[0]}' entry; not a checkpoint of this run")
    for name, obj in stateful.items():
        obj.load_state_dict(state[name])
    restore_rng_state(state["rng"])
    return int(state["step"])


def save_checkpoint(path: str | os.PathLike, state: Mapping, *, format: str, version: int) -> Path:
    """Write ``state`` (tagged with ``format`` and ``version``) to ``path`` atomically: the old
    file stays complete until the new one is complete and on disk."""
    path = Path(path)
    if {"format", "version"} & set(state):
        raise ValueError("save_checkpoint: 'format' and 'version' are set by the arguments")
    # same folder, so the rename cannot cross file systems; the pid keeps concurrent writers apart
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": format, "version": version, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    # the rename itself reaches the disk only with the folder's entry; not possible on Windows
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, *, format: str, version: int) -> dict:
    """A checkpoint written by :func:`save_checkpoint` with this ``format``, at most ``version``."""
    path = Path(path)
    try:
        # RNG states hold numpy and Python objects, so not weights_only: this loads files the
        # trainer wrote itself, never downloaded weights (those go through ssl_backbone.checkpoints)
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read ({type(exc).__name__})") from None
    if not isinstance(ck, dict) or ck.get("format") != format:
        found = ck.get("format") if isinstance(ck, dict) else None
        raise CheckpointError(f"{path}: not a '{format}' checkpoint"
                              + (f" (its format is '{found}')" if found else ""))
    found_version = ck.get("version")
    if not isinstance(found_version, int) or found_version > version:
        raise CheckpointError(f"{path}: {format} version {found_version!r} is not one this code "
                              f"reads (up to {version})")
    return ck
