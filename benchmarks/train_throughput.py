"""Training throughput of ``canopy train``'s step (chips per second), fp32 vs bf16 autocast.

Times the real training step (``canopy.train.loop.compute_loss`` + backward + AdamW) on random
uint8 chips, after warm-up steps, for a frozen backbone (decoder only, the default) and for a
fully trained backbone (from scratch / fine-tuning), on the CPU or a GPU.

    python benchmarks/train_throughput.py --threads 1           # vit_micro and vit_tiny, 128 px, CPU
    python benchmarks/train_throughput.py --arch vit_small --device cuda --batch-size 32

Prints a table and, with ``--json FILE``, writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def bench(arch: str, chip: int, batch: int, precision: str, finetune: int, steps: int,
          warmup: int, device: str, n_bins: int = 256) -> dict:
    from canopy.train.datasets import collate
    from canopy.train.loop import (
        TrainConfig, TrainForward, build_model, compute_loss, head_prior_scale, init_decoder,
        param_groups, set_trainable)

    torch.manual_seed(0)
    cfg = TrainConfig(out_dir="unused", arch=arch, chip_size=chip, batch_size=batch, n_bins=n_bins,
                      precision=precision, finetune_blocks=finetune, steps=steps, device=device)
    model, _ = build_model(cfg)
    init_decoder(model)
    first = set_trainable(model, finetune)
    dev = torch.device(device)
    model.to(dev).train()
    fwd = TrainForward(model, first)
    opt = torch.optim.AdamW(param_groups(model, cfg, 1.0))
    gen = torch.Generator().manual_seed(0)
    samples = [{"image": torch.randint(0, 256, (3, chip, chip), generator=gen).float(),
                "valid": torch.ones(chip, chip, dtype=torch.bool),
                "target": torch.rand(chip, chip, generator=gen) * 20,
                "shots": torch.zeros(0, 3), "index": i} for i in range(batch)]
    batch_ = collate(samples)
    scale = head_prior_scale(model.cfg.decoder.n_bins)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step():
        terms = compute_loss(fwd, model, batch_, cfg, dev, scale)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()

    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return {"arch": arch, "chip_px": chip, "batch": batch, "n_bins": n_bins, "precision": precision,
            "backbone": "frozen" if finetune == 0 else "trained", "device": device,
            "chips_per_s": steps * batch / dt, "s_per_step": dt / steps,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "trainable_m": sum(p.numel() for p in trainable) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["vit_micro", "vit_tiny"])
    ap.add_argument("--chip-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--n-bins", type=int, default=256)
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--backbone", nargs="+", default=["frozen", "trained"], choices=["frozen", "trained"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"device {args.device}{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}")
    print(f"{'arch':10} {'backbone':8} {'prec':5} {'chip':>4} {'batch':>5} {'bins':>4} {'chips/s':>8} {'s/step':>7}")
    for arch in args.arch:
        for backbone in args.backbone:
            for precision in args.precision:
                r = bench(arch, args.chip_size, args.batch_size, precision,
                          0 if backbone == "frozen" else -1, args.steps, args.warmup, args.device,
                          args.n_bins)
                rows.append(r)
                print(f"{arch:10} {r['backbone']:8} {precision:5} {r['chip_px']:>4} {r['batch']:>5} {args.n_bins:>4} "
                      f"{r['chips_per_s']:>8.1f} {r['s_per_step']:>7.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
