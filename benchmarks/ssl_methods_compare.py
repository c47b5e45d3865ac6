"""DINOv2, I-JEPA, MSN and PMSN at equal budget, then the same decoder on each and on a random
backbone, scored on held-out real lidar (issue 17, item 4), at the scale a 2-core CPU allows.

Pretraining: ViT-Micro/16 (128 wide, 4 deep) from scratch on windows of the real images in
../shared/data/overhead_rgb (``canopy pretrain``'s reader), the same number of images seen by
every method (``--steps`` × ``--batch``), each method's defaults with crops shrunk to the 128 px
windows (DINOv2 and MSN: 128 px global/target crops, 2–4 local crops of 48 px; I-JEPA: 128 px).
Then ``benchmarks/ssl_backbone_vs_random.py``'s ``compare``: the default model's real training
pairs and held-out split, decoder only (backbone frozen), same steps and seed for every backbone.

    python benchmarks/ssl_methods_compare.py --steps 150 --decoder-steps 300 --out benchmarks/results/ssl_methods_compare.json

At this scale the numbers say whether the plumbing carries a signal, not which method wins at
scale; docs/pretraining.md says so next to them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def configs(batch: int, epochs: float) -> dict:
    small_crops = {"global_size": 128, "local_size": 48}
    common = {"arch": "vit_micro", "batch_size": batch, "epochs": epochs, "warmup_epochs": epochs / 10}
    return {
        "dinov2": {**common, "prototypes": 1024, "head_hidden": 512, "head_bottleneck": 128,
                   "ibot_prototypes": 1024, "warmup_teacher_temp_epochs": epochs / 5,
                   "freeze_last_layer_epochs": 0.0, "momentum_teacher": 0.99, "base_lr": 0.01,
                   "drop_path_rate": 0.0, "crops": {**small_crops, "n_local": 4}},
        "ijepa": {**common, "image_size": 128, "predictor_dim": 128, "predictor_heads": 4,
                  "predictor_depth": 3, "base_lr": 0.01, "start_lr": 0.002},
        "msn": {**common, "prototypes": 256, "proj_hidden": 512, "proj_dim": 128,
                "base_lr": 0.01, "start_lr": 0.002, "crops": {**small_crops, "n_local": 4}},
        "pmsn": {**common, "prototypes": 256, "proj_hidden": 512, "proj_dim": 128,
                 "base_lr": 0.01, "start_lr": 0.002, "crops": {**small_crops, "n_local": 4}},
    }


def curves(log_csv: Path) -> list[dict]:
    """The run's logged rows: loss and the collapse monitors step by step."""
    import csv

    keep = ("step", "total", "rankme", "normalised_std", "entropy_gap", "distinct_argmax",
            "collapsed")
    with open(log_csv) as f:
        return [{k: (v if k == "collapsed" else float(v)) for k, v in row.items()
                 if k in keep and v != ""} for row in csv.DictReader(f)]


def main() -> None:
    from canopy.pretrain_cli import RasterWindows
    from ssl_backbone.methods import config_for
    from ssl_backbone.pretrain import pretrain
    from ssl_backbone_vs_random import compare

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--decoder-steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["dinov2", "ijepa", "msn", "pmsn"])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    source = RasterWindows(ROOT.parent / "shared" / "data" / "overhead_rgb", window_px=128)
    epochs = args.steps * args.batch / len(source)
    work = Path(tempfile.mkdtemp(prefix="ssl_methods_"))
    backbones, pretraining = {}, {}
    for method in args.methods:
        cfg = config_for(method, configs(args.batch, epochs)[method])
        t0 = time.perf_counter()
        result = pretrain(cfg, source, work / method, log_every=max(1, args.steps // 10))
        pretraining[method] = {"seconds": round(time.perf_counter() - t0, 1),
                               "images_seen": result.steps_done * args.batch,
                               "last": result.last, "monitors": {
                                   k: v for k, v in result.monitors.items()
                                   if k in ("rankme", "entropy_gap", "collapsed")},
                               "curves": curves(work / method / "log.csv")}
        backbones[method] = result.backbone_path
        print(method, json.dumps(pretraining[method], default=str), flush=True)
    scores = compare(backbones, args.decoder_steps, threads=args.threads)
    out = {"command": "python benchmarks/ssl_methods_compare.py " + " ".join(sys.argv[1:]),
           "windows": len(source), "pretraining": pretraining, **scores}
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
