"""Distillation against pretraining from scratch at equal student budget (issue 14, item 7), at
the scale a 2-core CPU allows.

1. A DINOv2 teacher, ViT-Ti/16, pretrained on 128-px windows of the real images in
   ../shared/data/overhead_rgb (``--teacher-steps`` steps).
2. Two ViT-Micro/16 students that see the same images (``--steps`` × ``--batch``): one
   distilled from that teacher (``canopy pretrain distill``'s defaults, crops and heads as the
   teacher's), one pretrained with DINOv2 from scratch (the settings of
   ``benchmarks/ssl_methods_compare.py``).
3. ``benchmarks/ssl_backbone_vs_random.py``'s ``compare``: the same frozen-backbone decoder on
   each student and on a random ViT-Micro, scored on the default model's held-out real lidar.

    python benchmarks/distill_compare.py --teacher-steps 600 --steps 300 --decoder-steps 300 --out benchmarks/results/distill_compare.json

The distilled student's extra cost (the teacher's forward pass) is reported as seconds.
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


def main() -> None:
    from canopy.pretrain_cli import RasterWindows
    from ssl_backbone.methods import config_for
    from ssl_backbone.pretrain import pretrain
    from ssl_backbone_vs_random import compare
    from ssl_methods_compare import configs

    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--decoder-steps", type=int, default=300)
    ap.add_argument("--distill-lr", type=float, default=0.01,
                    help="base lr of the distillation (its default, 2e-4, is for long runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=Path,
                    help="folder of an earlier invocation's runs: finished ones are reused "
                         "(resumed at their last step), their seconds read from their logs")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    source = RasterWindows(ROOT.parent / "shared" / "data" / "overhead_rgb", window_px=128)
    work = args.runs or Path(tempfile.mkdtemp(prefix="distill_compare_"))
    runs = {}

    def run(name, cfg, steps):
        t0 = time.perf_counter()
        resume = (work / name / "checkpoint.pt").exists()
        before = (json.loads((work / name / "summary.json").read_text())
                  if (work / name / "summary.json").exists() else None)
        result = pretrain(cfg, source, work / name, log_every=max(1, steps // 5), resume=resume)
        seconds = time.perf_counter() - t0
        if resume:  # the earlier sitting's time, loss and monitors, from its log and summary
            import csv

            rows = list(csv.DictReader(open(work / name / "log.csv")))
            seconds = float(rows[-1]["seconds"])
            result.last.update(before["last"])
            result.monitors.update(before["monitors"])
        runs[name] = {"seconds": round(seconds, 1),
                      "images_seen": result.steps_done * args.batch, "last": result.last,
                      "monitors": {k: v for k, v in result.monitors.items()
                                   if k in ("rankme", "entropy_gap", "collapsed")}}
        print(name, json.dumps(runs[name], default=str), flush=True)
        return result

    def epochs(steps):
        return steps * args.batch / len(source)

    teacher_cfg = {**configs(args.batch, epochs(args.teacher_steps))["dinov2"], "arch": "vit_tiny"}
    run("teacher_vit_tiny", config_for("dinov2", teacher_cfg), args.teacher_steps)
    student = configs(args.batch, epochs(args.steps))["dinov2"]
    scratch = run("dinov2_scratch", config_for("dinov2", student), args.steps)
    distilled = run("distilled", config_for("distill", {
        "teacher": str(work / "teacher_vit_tiny"), "arch": "vit_micro", "batch_size": args.batch,
        "epochs": epochs(args.steps), "warmup_epochs": epochs(args.steps) / 10,
        "base_lr": args.distill_lr, "freeze_last_layer_epochs": 0.0,
        "momentum_teacher": student["momentum_teacher"], "crops": student["crops"],
        "head_hidden": student["head_hidden"], "head_bottleneck": student["head_bottleneck"]}),
        args.steps)
    scores = compare({"distilled": distilled.backbone_path, "dinov2_scratch": scratch.backbone_path},
                     args.decoder_steps, threads=args.threads)
    out = {"command": "python benchmarks/distill_compare.py " + " ".join(sys.argv[1:]),
           "windows": len(source), "pretraining": runs, **scores}
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
