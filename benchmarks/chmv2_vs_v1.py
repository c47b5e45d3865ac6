"""CHMv2 (DINOv3 ViT-L/16 + its DPT head) against HRCH v1 ViT-L, tiles per second on this CPU.

Both models with random weights in their released architectures (``chmv2_random``,
``hrch_v1_large_random``: speed does not depend on the values), the same 256² tiles cut from
the bundled real ortho, the same batch (8, ``canopy predict``'s CPU default) and threads, each
precision as ``canopy predict`` runs it (``HeightModel.predict_tensor``: fp32, bf16 autocast,
int8 = quantised backbone and head, one tile per call). Variants alternate within each repeat,
so machine load hits both models alike; one untimed batch first warms each up.

    python benchmarks/chmv2_vs_v1.py --threads 2 --repeats 2 --out benchmarks/results/chmv2_vs_v1_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tiles(n: int):
    import rasterio
    import torch

    with rasterio.open(ROOT / "canopy" / "data" / "sample_osbs_029.tif") as ds:
        rgb = ds.read()
    offsets = [(r, c) for r in (0, 72, 144) for c in (0, 72, 144)]
    return torch.from_numpy(np.stack([rgb[:, r:r + 256, c:c + 256]
                                      for r, c in offsets[:n]]).copy())


def main() -> None:
    import torch

    from canopy.model.checkpoints import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precisions", default="fp32,bf16,int8")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = tiles(args.batch)
    names = ("hrch_v1_large_random", "chmv2_random")
    precisions = args.precisions.split(",")
    models = {(n, p): load_model(n) for n in names for p in precisions}
    for (n, p), m in models.items():  # warm-up (and int8 quantisation) outside the timing
        m.predict_tensor(x[:2], p)
    runs: dict[str, list[float]] = {f"{n}/{p}": [] for n in names for p in precisions}
    for _ in range(args.repeats):
        for p in precisions:
            for n in names:
                t0 = time.perf_counter()
                models[(n, p)].predict_tensor(x, p)
                runs[f"{n}/{p}"].append(args.batch / (time.perf_counter() - t0))
    result = {
        "command": "python benchmarks/chmv2_vs_v1.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads": args.threads},
        "tile_px": 256, "batch": args.batch,
        "tiles_per_s": {k: [round(v, 3) for v in vs] for k, vs in runs.items()},
        "chmv2_over_v1": {p: [round(c / v, 3) for c, v in zip(runs[f"chmv2_random/{p}"],
                                                               runs[f"hrch_v1_large_random/{p}"])]
                          for p in precisions},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
