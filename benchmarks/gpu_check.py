"""One prepared GPU check (#21 item 6): the v1 ViT-H configuration in bf16, model alone and
`canopy predict` end to end on a large raster, on whatever card the machine has.

    python benchmarks/gpu_check.py --out results/ [--size 16384] [--budget 420]

Measures, writing ``gpu_check.json`` into ``--out`` after every step (a run cut short keeps what
it measured):
* the card's bf16 matmul rate (8192³, the ceiling the model's share is reported against);
* the model's FLOPs per 256² tile (torch's FlopCounterMode);
* tiles/s of the model alone (``predict_tensor``, weights kept in bf16 as the product does on a
  GPU) at several batch sizes, and the share of the matmul rate that makes;
* the same with the decoder in channels-last memory format;
* ``predict_raster`` end to end (read → model → blend → COG) on a ``--size``² raster of
  synthetic texture at the model's GSD, with default options (device, precision and batch size
  chosen automatically), the time after the last tile (COG finishing) and the California
  projection from the measured end-to-end rate;
* last, if the budget allows, ``torch.compile`` of the backbone and the decoder (compile time
  reported apart).
Random weights: speed only. Needs torch + timm, rasterio for the end-to-end part.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CALIFORNIA_KM2 = 409_938


DEV = "cuda"  # --device cpu runs the same steps on the CPU with small sizes: a smoke test


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2 ** 30 if DEV == "cuda" else None


def matmul_rate(n=8192, reps=10) -> float:
    n = n if DEV == "cuda" else 512
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def flops_per_tile(model) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randint(0, 255, (1, 3, 256, 256), dtype=torch.uint8, device=DEV)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(model.normalize(x))
    return float(fc.get_total_flops())


def throughput(fn, batch: int, seconds: float = 6.0) -> float:
    x = torch.randint(0, 255, (batch, 3, 256, 256), dtype=torch.uint8, device=DEV)
    for _ in range(2):
        fn(x)
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn(x)
        n += 1
        if n % 4 == 0:
            sync()
    sync()
    return n * batch / (time.perf_counter() - t0)


def synthetic_raster(path: Path, size: int, gsd: float) -> Path:
    """A size² uint8 RGB GeoTIFF of smooth texture at ``gsd`` in UTM 17 (written in strips)."""
    import rasterio
    from affine import Affine

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, size=(3, 64, 64), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:32617", transform=Affine(gsd, 0, 400000.0, 0, -gsd, 3280000.0),
                       tiled=True, blockxsize=512, blockysize=512) as ds:
        strip = 2048
        for r in range(0, size, strip):
            h = min(strip, size - r)
            yy = (np.arange(r, r + h) // 37) % 64
            xx = (np.arange(size) // 37) % 64
            ds.write(base[:, yy][:, :, xx], window=rasterio.windows.Window(0, r, size, h))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_out")))
    ap.add_argument("--checkpoint", default="hrch_v1_huge_random")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64, 128, 256])
    ap.add_argument("--size", type=int, default=16384)
    ap.add_argument("--seconds", type=float, default=4.0, help="per throughput measurement")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--budget", type=float, default=420.0,
                    help="seconds this script may take: torch.compile is skipped when short")
    args = ap.parse_args()
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    global DEV
    DEV = args.device
    res: dict = {"torch": torch.__version__,
                 "card": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu"}

    def save(key=None, value=None):
        if key is not None:
            res[key] = value
            print(f"[{time.perf_counter() - start:6.1f} s]", key, json.dumps(value, default=str),
                  flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(res, indent=2, default=str))

    save("bf16_matmul_tflops", matmul_rate() / 1e12)
    from canopy.model.checkpoints import load_model
    from canopy.model.device import resolve_device
    from canopy.predict.options import PredictOptions
    from canopy.predict.raster import predict_raster

    t0 = time.perf_counter()
    model = load_model(args.checkpoint, device=DEV)
    save("model_build_s", time.perf_counter() - t0)
    gflop = flops_per_tile(model) / 1e9
    save("gflop_per_tile", gflop)
    model.prepare_for_inference("bf16")
    ceiling = res["bf16_matmul_tflops"] * 1e3

    def sweep(label, fn, batches=args.batches):
        rows = []
        for b in batches:
            tps = throughput(fn, b, args.seconds)
            rows.append({"batch": b, "tiles_per_s": tps,
                         "share_of_matmul_rate": tps * gflop / ceiling})
        save(label, rows)
        return rows

    bf16 = lambda x: model.predict_tensor(x, precision="bf16")  # noqa: E731
    with torch.no_grad():
        sweep("model_bf16_weights", bf16)
        model.decode_head.to(memory_format=torch.channels_last)
        sweep("model_bf16_channels_last_decoder", bf16, [64, 128])
        model.decode_head.to(memory_format=torch.contiguous_format)
    save("peak_gpu_gib_model_only", peak_gib())

    # end to end, as a user runs it: default options (device, precision and batch size auto)
    gsd = model.cfg.gsd
    work = Path("/tmp/gpu_check")
    work.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    src = synthetic_raster(work / "scene.tif", args.size, gsd)
    save("raster_write_s", time.perf_counter() - t0)
    marks: dict = {}

    def progress(ev):
        now = time.perf_counter()
        if ev.unit == "tiles" and ev.total:
            marks.setdefault("first", now)
            marks["tiles"], marks["last"] = ev.done, now

    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = predict_raster(src, work / "chm.tif", model, PredictOptions(), progress=progress,
                         overwrite=True)
    total = time.perf_counter() - t0
    px = args.size ** 2
    e2e = {"size": args.size, "seconds": total, "out_px_per_s": px / total,
           "tiles": marks.get("tiles"), "tiles_per_s": (marks.get("tiles") or 0) / total,
           "after_last_tile_s": total - (marks.get("last", t0) - t0),
           "peak_gpu_gib": peak_gib(),
           "bytes": out.stat().st_size}
    e2e["california_gpu_hours_at_gsd"] = CALIFORNIA_KM2 * 1e6 / gsd ** 2 / e2e["out_px_per_s"] / 3600
    import rasterio

    with rasterio.open(out) as ds:
        e2e["tags"] = {k: v for k, v in ds.tags().items() if k in ("CANOPY_PRECISION",)}
        e2e["overviews"] = ds.overviews(1)
    save("end_to_end_predict_raster_defaults", e2e)
    t0 = time.perf_counter()
    fresh = load_model(args.checkpoint, device=resolve_device("auto"))
    save("model_build_auto_device_s", time.perf_counter() - t0)
    del fresh

    if time.perf_counter() - start < args.budget - 150:
        with torch.no_grad():
            backbone, head = model.backbone, model.decode_head
            t0 = time.perf_counter()
            model.backbone.forward_taps = torch.compile(backbone.forward_taps)
            model.decode_head.forward_hidden = torch.compile(head.forward_hidden)
            bf16(torch.randint(0, 255, (64, 3, 256, 256), dtype=torch.uint8, device=DEV))
            sync()
            save("compile_seconds", time.perf_counter() - t0)
            sweep("model_bf16_compiled", bf16, [64, 128])
    else:
        save("compile_skipped", "not enough of the budget left")
    save("script_seconds", time.perf_counter() - start)


if __name__ == "__main__":
    main()
