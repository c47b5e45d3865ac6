"""Does a DINOv2-pretrained backbone help the height decoder? (#14 item 8)

Trains the decoder of ``canopy train`` twice with identical settings, data, seed and steps —
(a) on a pretrained backbone (``--backbone``, e.g. a ``canopy pretrain`` export), (b) on a
randomly initialised backbone of the same architecture — with the backbone frozen (what
``canopy train`` does by default), on the default model's real data and held-out split
(``canopy.train.default_model``: the eastern 40 % of each real scene never trained on), and
scores both on the held-out lidar CHMs.

    python benchmarks/ssl_backbone_vs_random.py --backbone runs/dinov2_vitt16_cpu/backbone.safetensors --steps 600 --out benchmarks/results/ssl_vs_random_vitt.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


class _MeanHeight:
    """Stands in for default_model's gradient-boosting baseline (not needed here)."""

    def __init__(self, value: float):
        self.value = value

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.full(features.shape[0], self.value, np.float32)


def compare(backbones: dict, steps: int, threads: int = 1, finetune_blocks: int = 0) -> dict:
    """Decoder trained on each backbone (``{label: path}``, one architecture) and on a random
    one of that architecture; held-out scores per site and pooled."""
    from canopy.model.checkpoints import load_model
    from canopy.train.datasets import label_mean
    from block_holdout import Recipe, build_records, evaluate_held_out
    from canopy.train.loop import TrainConfig, train
    from ssl_backbone.checkpoints import load_backbone

    torch.set_num_threads(threads)
    _, vcfg = load_backbone(next(iter(backbones.values())))
    recipe = replace(Recipe(), steps=steps, threads=threads)
    work = Path(tempfile.mkdtemp(prefix="ssl_vs_random_"))
    train_records, val_records, targets, summary = build_records(recipe, work / "data")
    mean_height = label_mean(train_records)
    results = {}
    runs = [(label, dict(backbone_path=str(path))) for label, path in backbones.items()]
    for name, kw in runs + [("random", dict(arch=_variant_of(vcfg)))]:
        t0 = time.perf_counter()
        cfg = TrainConfig(
            out_dir=str(work / name), n_bins=recipe.n_bins, max_height_m=recipe.max_height_m,
            gsd=recipe.gsd, chip_size=recipe.chip_size, steps=recipe.steps,
            batch_size=recipe.batch_size, lr=recipe.lr, finetune_blocks=finetune_blocks,
            precision="fp32", seed=recipe.seed, device="cpu", threads=recipe.threads,
            model_name=f"decoder_on_{name}", log_every=50, checkpoint_every=200, **kw)
        result = train(cfg, train_records, val_records)
        model = load_model(result.model_dir)
        (work / f"eval_{name}").mkdir()
        ev = evaluate_held_out(model, _MeanHeight(mean_height), mean_height, targets,
                               work / f"eval_{name}")
        results[name] = {"held_out": {s: r["model"] for s, r in ev["sites"].items()},
                         "pooled": ev["pooled"]["model"], "val": result.final_val,
                         "seconds": round(time.perf_counter() - t0, 1)}
        results["mean_height_baseline"] = ev["pooled"]["mean_height"]
        print(name, json.dumps(results[name]["pooled"]), flush=True)
    return {"architecture": vcfg.to_dict(), "held_out": summary["held out"], "steps": steps,
            "finetune_blocks": finetune_blocks, "results": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--finetune-blocks", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    res = compare({"pretrained": args.backbone}, args.steps, args.threads, args.finetune_blocks)
    out = {"command": "python benchmarks/ssl_backbone_vs_random.py " + " ".join(sys.argv[1:]),
           "backbone": str(args.backbone), **res}
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def _variant_of(vcfg) -> str:
    from ssl_backbone.vit import VARIANTS

    for name, v in VARIANTS.items():
        if (v.embed_dim, v.depth, v.patch_size, v.family) == (
                vcfg.embed_dim, vcfg.depth, vcfg.patch_size, vcfg.family):
            return name
    raise SystemExit(f"no named variant has the backbone's shape {vcfg}")


if __name__ == "__main__":
    main()
