"""One prepared GPU check: the v1 ViT-H configuration in bf16 over a few thousand 256² tiles.

Reports tiles/s and px/s for the model alone (the product path ``predict_tensor``: bf16
autocast, bins → metres in fp32) and for the in-memory engine (``predict_array``: overlapping
tiles + tapered blending on the GPU), the model's FLOPs per tile (torch's FlopCounterMode), the
card's measured bf16 matmul rate, and the share of it the model reaches. Random weights: speed
only. Needs torch + timm (+ numpy); no GDAL.

    python benchmarks/gpu_vith_bf16.py --tiles 4096 --json gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from canopy.model.checkpoints import load_model  # noqa: E402
from canopy.predict.blend import predict_array  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device, n=8192, reps=10) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def flops_per_tile(model, device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randint(0, 255, (1, 3, 256, 256), dtype=torch.uint8, device=device)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(model.normalize(x))
    return float(fc.get_total_flops())


def model_throughput(model, device, tiles: int, batch: int, precision: str) -> dict:
    x = torch.randint(0, 255, (batch, 3, 256, 256), dtype=torch.uint8, device=device)
    for _ in range(2):
        model.predict_tensor(x, precision=precision)
    sync(device)
    n = max(1, tiles // batch)
    t0 = time.perf_counter()
    for _ in range(n):
        model.predict_tensor(x, precision=precision)
    sync(device)
    dt = time.perf_counter() - t0
    return {"batch": batch, "tiles": n * batch, "seconds": dt, "tiles_per_s": n * batch / dt,
            "px_per_s": n * batch * 65536 / dt}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="hrch_v1_huge_random")
    ap.add_argument("--tiles", type=int, default=4096)
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--engine-size", type=int, default=8192)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    res = {"torch": torch.__version__, "device": str(device),
           "card": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
    print(res, flush=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    res["bf16_matmul_tflops"] = matmul_rate(device) / 1e12
    print("bf16 matmul TFLOP/s", round(res["bf16_matmul_tflops"], 1), flush=True)

    t0 = time.perf_counter()
    model = load_model(args.checkpoint, device=device)
    res["model_load_s"] = time.perf_counter() - t0
    res["model"] = model.cfg.name
    res["flops_per_tile_G"] = flops_per_tile(model, device) / 1e9
    print("GFLOP per 256² tile", round(res["flops_per_tile_G"], 1), flush=True)

    def sweep(label: str) -> list[dict]:
        rows = []
        for b in args.batches:
            r = model_throughput(model, device, args.tiles, b, "bf16")
            r["share_of_matmul_rate"] = (r["tiles_per_s"] * res["flops_per_tile_G"]
                                         / (res["bf16_matmul_tflops"] * 1e3))
            rows.append(r)
            print(label, {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
        return rows

    res["model_only_autocast_bf16"] = sweep("autocast bf16")
    # what the product does on a GPU with bf16: weights kept in bf16 (no per-call re-cast)
    model.prepare_for_inference("bf16")
    res["model_only_bf16_weights"] = sweep("bf16 weights")

    # the engine, in memory: overlapping tiles (stride 192) + tapered blending on the device
    rng = np.random.default_rng(0)
    n = args.engine_size
    base = rng.integers(0, 255, size=(3, n // 16, n // 16), dtype=np.uint8)
    img = np.repeat(np.repeat(base, 16, axis=1), 16, axis=2)
    best_b = max(res["model_only_bf16_weights"], key=lambda r: r["tiles_per_s"])["batch"]
    sync(device)
    t0 = time.perf_counter()
    height, _ = predict_array(model, img, precision="bf16", batch_size=best_b)
    sync(device)
    dt = time.perf_counter() - t0
    from canopy.predict.blend import count_tiles
    tiles = count_tiles(np.ones((n, n), bool), 256, 192)
    res["engine_in_memory_bf16"] = {"size": n, "tiles": tiles, "seconds": dt,
                                    "out_px_per_s": n * n / dt, "tiles_per_s": tiles / dt,
                                    "batch": best_b,
                                    "share_of_matmul_rate": tiles / dt * res["flops_per_tile_G"] / (res["bf16_matmul_tflops"] * 1e3)}
    print("engine", res["engine_in_memory_bf16"], flush=True)
    assert np.isfinite(height).all()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
