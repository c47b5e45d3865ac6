"""Pretraining throughput per method: images per second of a whole training step (data, views,
masks, student and teacher forward, backward, clipping, AdamW, EMA) through ``pretrain()``
itself, each method with its official defaults (DINOv2: 2 × 224 px global and 8 × 96 px local
crops; I-JEPA: one 224 px crop, 4 target blocks, a context of ≈ 28 % of the patches; MSN/PMSN:
one target, one anchor with 15 % of its patches dropped, 10 focal 96 px anchors), in one run.

    python benchmarks/pretrain_throughput.py --arch vit_small --batch 16 --steps 6 --precision fp32 bf16
    python benchmarks/pretrain_throughput.py --methods dinov2 ijepa msn --precision fp32
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class RealWindows:
    """256-px windows of the bundled real ortho (speed does not depend on content)."""

    window_px = 256

    def __init__(self):
        import rasterio

        with rasterio.open(ROOT / "canopy" / "data" / "sample_osbs_029.tif") as ds:
            self.rgb = torch.from_numpy(ds.read())

    def __len__(self):
        return 10_000

    def window(self, index, gen):
        r, c = (int(torch.randint(400 - 256 + 1, (), generator=gen)) for _ in range(2))
        return self.rgb[:, r:r + 256, c:c + 256].contiguous()


def main() -> None:
    from ssl_backbone.methods import config_for
    from ssl_backbone.pretrain import pretrain

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="vit_small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--methods", nargs="+", default=["dinov2"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    for method, precision in [(m, p) for m in args.methods for p in args.precision]:
        cfg = config_for(method, {"arch": args.arch, "batch_size": args.batch})
        times: list[float] = []
        last = [time.perf_counter()]

        def tick(_row, times=times, last=last):
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        with tempfile.TemporaryDirectory() as d:
            pretrain(cfg, RealWindows(), d, device=args.device, precision=precision,
                     max_steps=args.warmup + args.steps, log_every=1, checkpoint_every=10 ** 9,
                     progress=tick)
        timed = times[args.warmup:]
        key = precision if args.methods == ["dinov2"] else f"{method} {precision}"
        rows[key] = round(args.batch * len(timed) / sum(timed), 2)
        print(key, rows[key], "images/s", flush=True)
    result = {"command": "python benchmarks/pretrain_throughput.py " + " ".join(sys.argv[1:]),
              "machine": {"cpu": platform.processor() or platform.machine(),
                          "torch": torch.__version__, "threads": args.threads,
                          "device": args.device},
              "arch": args.arch, "batch": args.batch, "images_per_s": rows}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
