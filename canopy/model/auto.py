"""``auto`` device and precision: the fastest accurate way to run a model on this machine.

* Device ``auto``: the first CUDA GPU when there is one, else the CPU
  (:func:`canopy.model.device.resolve_device`).
* Batch size (None): 8 tiles on a CPU, 64 on a GPU (:func:`batch_size_for`).
* Precision ``auto``: on a GPU, bf16 where it supports it (fp32 otherwise); on a CPU, the fastest
  of the precisions whose accuracy was measured acceptable on real imagery with a trained model
  (fp32; bf16, |Δ| 0.017 m mean against fp32; int8, 0.036 m mean, MAE against lidar within
  millimetres: docs/performance.md). Which is fastest depends on the CPU *and the model*: int8
  won by 1.3× for ViT-L but lost 4.6× to bf16 for the bundled ViT-Ti model on the same machine,
  so CPU flags cannot decide. A short timed probe does: a few tiles per candidate, once per
  model architecture, machine, thread count and torch version, cached on disk
  (:func:`cache_dir`).

The choice is returned with a one-line reason for the caller to show, and the resolved precision
is what outputs record (``CANOPY_PRECISION``) and what a state run's identity holds.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

AUTO = "auto"
CPU_CANDIDATES = ("fp32", "bf16", "int8")
CACHE_FORMAT = 1
# Tiles per forward pass when the caller gives none. A CPU gains nothing from bigger batches
# (its lanes run batches side by side instead); a GPU needs enough tiles to fill it: the model's
# rate by batch size on an H200 is in docs/performance.md.
CPU_BATCH, GPU_BATCH = 8, 64


def batch_size_for(device, batch_size: int | None) -> int:
    """``batch_size``, or the default for ``device`` (a torch device or its type) when None."""
    if batch_size is not None:
        return batch_size
    kind = device if isinstance(device, str) else device.type
    return GPU_BATCH if kind.startswith("cuda") else CPU_BATCH


@dataclass(frozen=True)
class Choice:
    """A resolved device/precision, and why (one line for the user)."""

    device: torch.device
    precision: str
    reason: str


def own_model(model, precision: str):
    """``model``, or a copy of it where running ``precision`` would change it: int8 quantises in
    place, and a model handed in by a caller must stay as it was given."""
    if precision == "int8" and not model.is_int8:
        return copy.deepcopy(model)
    return model


def cache_dir() -> Path:
    """Where canopy keeps what it measured or converted once: ``$CANOPY_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/canopy-height``, else ``~/.cache/canopy-height``."""
    if os.environ.get("CANOPY_CACHE_DIR"):
        return Path(os.environ["CANOPY_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "canopy-height"


def choose_precision(model, precision: str, *, batch_size: int = 8, timer=None) -> Choice:
    """The precision to run ``model`` (already on its device) with, for ``precision`` as asked:
    an explicit one is kept; ``auto`` is decided as the module docstring says. ``timer`` (for
    tests) replaces the probe: ``timer(model, precision) -> seconds per tile``."""
    device = model.device
    if precision != AUTO:
        return Choice(device, precision, f"precision {precision} (as asked)")
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return Choice(device, "bf16" if ok else "fp32",
                      f"precision auto → {'bf16' if ok else 'fp32'} on {torch.cuda.get_device_name(device)}")
    if device.type != "cpu":
        return Choice(device, "fp32", f"precision auto → fp32 on {device.type}")
    candidates = cpu_candidates()
    key = _probe_key(model, batch_size)
    cached = _read_cache().get(key)
    if cached and set(cached) >= set(candidates):
        timings, source = cached, "measured earlier on this machine"
    else:
        timings = {p: (timer or probe_seconds_per_tile)(model, p, batch_size) for p in candidates}
        _write_cache(key, timings)
        source = "measured now, cached"
    best = min(candidates, key=lambda p: timings[p])
    shown = ", ".join(f"{p} {timings[p]:.3g}" for p in candidates)
    return Choice(device, best, f"precision auto → {best} (s per tile: {shown}; {source})")


def training_precision(device: torch.device, precision: str) -> str:
    """The autocast precision training runs with: as asked, or for ``auto`` bf16 on GPUs that
    support it and on CPUs with native bf16 arithmetic (AVX512-BF16 or AMX: 1.1–1.3× faster
    per training step here, docs/performance.md), fp32 elsewhere (emulated bf16 is slower)."""
    if precision != AUTO:
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def cpu_candidates() -> tuple[str, ...]:
    """The CPU precisions this build can run: int8 only where torch has the oneDNN int8 ops."""
    from canopy.model import int8

    return tuple(p for p in CPU_CANDIDATES if p != "int8" or int8.available())


def probe_seconds_per_tile(model, precision: str, batch_size: int = 8) -> float:
    """Seconds per tile of ``model`` in ``precision`` on this machine, from a warm call on a
    small batch of random tiles (int8 is timed on a quantised copy: quantising is in place)."""
    size = model.cfg.tile_size
    n = max(1, min(batch_size, 2))
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, model.cfg.backbone.in_chans, size, size), dtype=torch.uint8,
                      generator=gen)
    m = copy.deepcopy(model) if precision == "int8" else model
    m.predict_tensor(x, precision=precision)  # warm-up: kernels chosen, weights converted
    t0 = time.perf_counter()
    reps = 0
    while True:
        m.predict_tensor(x, precision=precision)
        reps += 1
        elapsed = time.perf_counter() - t0
        if elapsed > 0.3 or reps >= 3:
            return elapsed / (reps * n)


def _probe_key(model, batch_size: int) -> str:
    """Architecture (not weights: they do not change the speed), machine, threads, torch."""
    cfg = model.cfg
    arch = json.dumps({"backbone": cfg.backbone.to_dict(), "decoder": cfg.decoder.to_dict(),
                       "tile": cfg.tile_size, "batch": min(batch_size, 2)}, sort_keys=True)
    machine = f"{cpu_name()}|{os.cpu_count()}|{torch.get_num_threads()}|{torch.__version__}"
    return hashlib.sha256(f"{arch}|{machine}".encode()).hexdigest()[:32]


def cpu_name() -> str:
    """The CPU's model name (for probe caches and benchmark reports)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_file() -> Path:
    return cache_dir() / "precision_probes.json"


def _read_cache() -> dict:
    try:
        data = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data.get("probes", {}) if data.get("format") == CACHE_FORMAT else {}


def _write_cache(key: str, timings: dict) -> None:
    """Best effort: a cache folder that cannot be written only means probing again next time."""
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probes = _read_cache()
        probes[key] = timings
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        tmp.write_text(json.dumps({"format": CACHE_FORMAT, "probes": probes}, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass
