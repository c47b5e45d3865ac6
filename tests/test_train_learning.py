"""A short training run that has to learn, and exact resume (N steps = N/2 + resume + N/2)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from canopy.train.datasets import ChipDataset, SyntheticSpec, collate, synthetic_records
from canopy.train.loop import (
    CHECKPOINT_NAME, TrainConfig, TrainForward, build_model, init_decoder, set_trainable, train)


# runs that keep the random micro backbone frozen say so; that is expected here
pytestmark = pytest.mark.filterwarnings("ignore:the vit_micro backbone has random weights")

@pytest.fixture(scope="module")
def synthetic_chips():
    """Eight 128-m scenes for training, two other scenes for validation (0.5 m, 64-px chips)."""
    tr, _ = synthetic_records(SyntheticSpec(8, scene_px=256, gsd=0.5, seed=0), 64, 32)
    va, _ = synthetic_records(SyntheticSpec(2, scene_px=256, gsd=0.5, seed=99), 64, 64)
    return tr, va


def micro_config(out, **kw) -> TrainConfig:
    base = dict(out_dir=str(out), arch="vit_micro", n_bins=64, gsd=0.5, chip_size=64,
                batch_size=8, precision="fp32", threads=1, log_every=25)
    base.update(kw)
    return TrainConfig(**base)


def test_training_on_synthetic_scenes_learns(tmp_path, synthetic_chips):
    """Validation MAE must fall clearly below the mean-height baseline, with a map that follows
    the scene (not a constant, which is what a collapsed decoder produces)."""
    from canopy.evaluate.metrics import mae, r2
    from canopy.model.checkpoints import load_model

    tr, va = synthetic_chips
    torch.manual_seed(0)
    cfg = micro_config(tmp_path / "run", steps=150, finetune_blocks=-1, seed=0, lr=2e-3)
    result = train(cfg, tr, va)
    v = result.final_val
    assert result.finished and result.model_dir is not None
    assert v["val_mae"] < 0.8 * v["baseline_mae"], v
    # most pixels are bare ground, so "0 m everywhere" is a stronger constant than the mean
    labels = np.concatenate([r.target.ravel() for r in va])
    assert v["val_mae"] < 0.95 * np.abs(labels).mean(), v
    # log.csv has a validation row per epoch, and validation improved on the first one
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    vals = [float(r["val_mae"]) for r in rows if r["kind"] == "val"]
    assert len(vals) == math.ceil(150 / (len(tr) // 8)) and vals[-1] < vals[0]
    # the written model reproduces the validation number and its map has structure
    model = load_model(result.model_dir)
    assert model.cfg.trained and model.cfg.gsd == 0.5 and model.cfg.tile_size == 64
    batch = collate([ChipDataset(va).sample(i, 0) for i in range(len(va))])
    rgb = torch.from_numpy(np.stack([r.image for r in va]))  # the uint8 chips validation saw
    pred = model.predict_tensor(rgb).numpy().ravel()
    ref = torch.stack(batch["targets"]).numpy().ravel()
    assert mae(pred, ref) == pytest.approx(v["val_mae"], rel=1e-4)
    assert pred.std() > 1.0 and r2(pred, ref) > 0.1
    card = (result.model_dir / "MODEL_CARD.md").read_text()
    assert "mean-height baseline" in card and "150 steps" in card


def test_exact_resume(tmp_path, synthetic_chips):
    """Everything that moves is in the checkpoint: weights, AdamW moments, the LR schedule, the
    RNG streams (drop-path masks of cosub) and the data position (epoch, step)."""
    tr, va = synthetic_chips
    tr, va = tr[:24], va[:4]  # 3 steps per epoch: the resume point falls inside epoch 1
    common = dict(steps=8, finetune_blocks=2, cosub=True, drop_path=0.3, seed=5, log_every=1,
                  checkpoint_every=100)
    train(micro_config(tmp_path / "full", **common), tr, va)  # its checkpoint is compared below
    half = train(micro_config(tmp_path / "split", stop_after_steps=4, **common), tr, va)
    assert not half.finished and half.model_dir is None
    assert (tmp_path / "split" / CHECKPOINT_NAME).exists()
    import shutil

    shutil.copytree(tmp_path / "split", tmp_path / "perturbed")
    events = []
    rest = train(micro_config(tmp_path / "split", **common), tr, va, resume=True,
                 progress=events.append)
    assert rest.finished and rest.steps_done == 8
    # it resumed: the steps run after the checkpoint are 5..8 only (a run that restarted from
    # step 0 with the same seed would reach the same weights, so the weights alone cannot tell)
    assert sorted({e.done for e in events if e.unit == "steps" and e.message is None}) == [5, 6, 7, 8]
    a = torch.load(tmp_path / "full" / CHECKPOINT_NAME, weights_only=False)
    b = torch.load(tmp_path / "split" / CHECKPOINT_NAME, weights_only=False)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 8
    # the log reads as one run: every step once, identical losses
    la = [r for r in csv.DictReader(open(tmp_path / "full" / "log.csv"))]
    lb = [r for r in csv.DictReader(open(tmp_path / "split" / "log.csv"))]
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]
    # and the checkpoint is what it continued from: perturbed weights in it give other weights
    ck_path = tmp_path / "perturbed" / CHECKPOINT_NAME
    ck = torch.load(ck_path, weights_only=False)
    ck["model"]["decode_head.project.conv.weight"] += 0.01
    torch.save(ck, ck_path)
    train(micro_config(tmp_path / "perturbed", **common), tr, va, resume=True)
    d = torch.load(ck_path, weights_only=False)
    assert not torch.equal(d["model"]["decode_head.project.conv.weight"],
                           a["model"]["decode_head.project.conv.weight"])
    # and a different seed gives different weights (the test would catch a no-op)
    other = train(micro_config(tmp_path / "other", **{**common, "seed": 6}), tr, va)
    c = torch.load(other.out_dir / CHECKPOINT_NAME, weights_only=False)
    assert not torch.equal(c["model"]["decode_head.project.conv.weight"],
                           a["model"]["decode_head.project.conv.weight"])


def test_resume_refuses_other_settings(tmp_path, synthetic_chips):
    from canopy.errors import InputError, OutputError

    tr, va = synthetic_chips
    cfg = micro_config(tmp_path / "r", steps=2, stop_after_steps=1, seed=1)
    train(cfg, tr[:16], va[:2])
    with pytest.raises(InputError, match="lr"):
        train(micro_config(tmp_path / "r", steps=2, seed=1, lr=5e-4), tr[:16], va[:2], resume=True)
    with pytest.raises(OutputError, match="not empty"):  # an OutputExistsError: remedy resume
        train(micro_config(tmp_path / "r", steps=2, seed=1), tr[:16], va[:2])


def test_a_run_saved_before_a_setting_existed_resumes(tmp_path, synthetic_chips):
    """A checkpoint from before TrainConfig.in_bands lacks the key (and RGB runs still leave it
    out, for the release before it); one release wrote it for RGB too. Either way it is the
    default, so the run resumes instead of being refused as a run with other settings."""
    tr, va = synthetic_chips
    cfg = micro_config(tmp_path / "r", steps=2, stop_after_steps=1, seed=1)
    train(cfg, tr[:16], va[:2])
    path = next((tmp_path / "r").rglob("checkpoint*.pt"))
    state = torch.load(path, weights_only=False, map_location="cpu")
    assert "in_bands" not in state["train_config"]
    state["train_config"]["in_bands"] = 3
    torch.save(state, path)
    result = train(micro_config(tmp_path / "r", steps=2, seed=1), tr[:16], va[:2], resume=True)
    assert result.finished and result.steps_done == 2


def test_train_config_reads_back_and_a_bad_checkpoint_is_one_error(tmp_path, synthetic_chips):
    import json

    from canopy.errors import InputError
    from canopy.train.augment import NO_AUGMENT
    from canopy.train.losses import LossConfig
    from ssl_backbone.errors import ConfigError

    cfg = micro_config(tmp_path / "c", steps=2, loss=LossConfig(gedi_weight=0.5), augment=NO_AUGMENT)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="unknown loss config keys") as err:
        TrainConfig.from_dict({**cfg.to_dict(), "loss": {"silog": 1.0}})
    assert err.value.field == "loss.silog"
    tr, va = synthetic_chips
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="resume: .*cannot read"):
        train(cfg, tr[:8], va[:1], resume=True)


def test_training_forward_matches_the_model(synthetic_chips):
    """The frozen-prefix forward used for training computes what the model computes."""
    cfg = micro_config("/unused", steps=1)
    model, _ = build_model(cfg)
    init_decoder(model)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    ref = model(x)
    for blocks in (0, 2, -1):
        first = set_trainable(model, blocks)
        out = TrainForward(model, first)(x)[0]
        assert torch.allclose(out, ref, atol=1e-5), blocks
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    # -1 trains everything the forward pass uses, embeddings included; the final norm and the
    # iBOT mask token take no part in the tapped features (DDP would stall on them)
    assert frozen == {"backbone.mask_token", "backbone.norm.weight", "backbone.norm.bias"}


def test_two_process_ddp_matches_one_process(tmp_path, synthetic_chips):
    """torchrun with 2 CPU processes (gloo) trains on the same global batches as one process:
    both processes join one process group of two, each loads its own half of every global
    batch (disjoint halves whose union is the one-process batch), and the weights match.
    Guards against: WORLD_SIZE ignored (two independent one-process runs write the same
    weights, which the weight check alone cannot tell from DDP) and every rank loading the
    whole batch (all-reduced identical gradients also match)."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "ddp_job.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).resolve().parents[1])!r})
        from canopy.train.datasets import SyntheticSpec, synthetic_records
        from canopy.train.loop import TrainConfig, train
        from canopy.train.augment import NO_AUGMENT
        from canopy.train.losses import LossConfig
        # SiLog is not a mean over pixels (a square root of a variance), so the average of two
        # half-batch gradients differs from the whole batch's; L1 and the penalty are means.
        tr, _ = synthetic_records(SyntheticSpec(2, scene_px=128, gsd=0.5, seed=0), 64, 64)
        cfg = TrainConfig(out_dir=sys.argv[1], arch="vit_micro", n_bins=64, gsd=0.5,
                          chip_size=64, batch_size=4, steps=2, precision="fp32", threads=1,
                          seed=3, augment=NO_AUGMENT, loss=LossConfig(silog_weight=0.0))
        # record what this process loaded and the process group it trained in
        import json, os
        import torch.distributed as dist
        from canopy.train import datasets
        seen, sample = [], datasets.ChipDataset.sample
        def recording(self, i, epoch):
            seen.append([int(epoch), int(i)])
            return sample(self, i, epoch)
        datasets.ChipDataset.sample = recording
        train(cfg, tr, [])
        world = dist.get_world_size() if dist.is_initialized() else 1
        with open(sys.argv[1] + f".rank{{os.environ.get('RANK', '0')}}.json", "w") as f:
            json.dump({{"world": world, "seen": seen}}, f)
    """))
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("WORLD_SIZE", "RANK")}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_port=29517", str(script), str(tmp_path / "ddp")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "single")],
                         capture_output=True, text=True, timeout=120, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    a = torch.load(tmp_path / "ddp" / CHECKPOINT_NAME, weights_only=False)["model"]
    b = torch.load(tmp_path / "single" / CHECKPOINT_NAME, weights_only=False)["model"]
    # gradients are averaged over two half-batches instead of one batch: same to rounding
    for key in b:
        assert torch.allclose(a[key], b[key], rtol=1e-3, atol=1e-5), key
    # and two processes trained, each on its half of the same global batches
    ranks = [json.loads((tmp_path / f"ddp.rank{r}.json").read_text()) for r in (0, 1)]
    single = json.loads((tmp_path / "single.rank0.json").read_text())
    assert [r["world"] for r in ranks] == [2, 2] and single["world"] == 1
    per_step = 4 // 2  # global batch 4, two processes
    assert len(single["seen"]) == 2 * 4 and all(len(r["seen"]) == 2 * per_step for r in ranks)
    for step in range(2):
        halves = [{tuple(s) for s in r["seen"][step * per_step:(step + 1) * per_step]}
                  for r in ranks]
        assert not halves[0] & halves[1]
        assert halves[0] | halves[1] == {tuple(s) for s in single["seen"][step * 4:(step + 1) * 4]}


def test_a_diverging_run_stops_with_one_error_and_no_model(tmp_path, synthetic_chips):
    """A learning rate that sends the loss to NaN stops training at that step with an error
    naming the setting; no model folder appears (before: a NaN model written as trained)."""
    from canopy.errors import TrainingDivergedError

    tr, va = synthetic_chips
    cfg = micro_config(tmp_path / "d", steps=30, finetune_blocks=-1, seed=0, lr=1e12,
                       grad_clip=1e12, checkpoint_every=1)
    with pytest.raises(TrainingDivergedError) as err:
        train(cfg, tr[:16], va[:2])
    assert "diverged at step" in str(err.value) and "lr" in str(err.value)
    assert not (tmp_path / "d" / "model").exists()
    assert not (tmp_path / "d" / "summary.json").exists()


def test_a_model_with_nan_weights_is_refused_when_loaded(tmp_path, micro_model):
    from canopy.errors import CheckpointError
    from canopy.model.checkpoints import load_model, save_native

    broken = load_model("micro")
    with torch.no_grad():
        broken.decode_head.project.conv.weight[0, 0, 0, 0] = float("nan")
    save_native(broken, tmp_path / "nan_model")
    with pytest.raises(CheckpointError, match="NaN or infinite values .*decode_head.project.conv.weight"):
        load_model(tmp_path / "nan_model")


def test_resume_can_extend_the_steps(tmp_path, synthetic_chips):
    """Issue #13: `canopy train --resume` could not extend --steps. It can: the run goes on
    from its checkpoint, keeps its warm-up and stretches the cosine decay to the new total."""
    tr, va = synthetic_chips
    common = dict(seed=3, log_every=1, checkpoint_every=100)
    train(micro_config(tmp_path / "r", steps=4, **common), tr[:16], va[:2])
    events = []
    more = train(micro_config(tmp_path / "r", steps=7, **common), tr[:16], va[:2], resume=True,
                 progress=events.append)
    assert more.finished and more.steps_done == 7
    assert sorted({e.done for e in events if e.unit == "steps" and e.message is None}) == [5, 6, 7]
    assert any("extending the run from 4 to 7 steps" in (e.message or "") for e in events)
    rows = [r for r in csv.DictReader(open(tmp_path / "r" / "log.csv")) if r["kind"] == "train"]
    lrs = [float(r["lr"]) for r in rows]
    assert [int(r["step"]) for r in rows] == list(range(1, 8))
    assert lrs[4] > lrs[3] * 0.5 and lrs[-1] < lrs[4]  # decay restarted over the longer run
    from canopy.errors import OptionError

    with pytest.raises(OptionError, match="fewer than the 7 already done"):
        train(micro_config(tmp_path / "r", steps=5, **common), tr[:16], va[:2], resume=True)


@pytest.fixture(scope="module")
def gedi_chips():
    """Chips of two synthetic scenes that hold GEDI-like shots (RH95 at mis-located positions)."""
    recs, report = synthetic_records(SyntheticSpec(2, scene_px=256, gsd=0.5, seed=0,
                                                   with_gedi=True), 64, 32)
    chips = [r for r in recs if len(r.shots)]
    assert report.shots > 0 and len(chips) >= 16
    return chips


def test_the_gedi_loss_trains_the_model(tmp_path, gedi_chips):
    """README: "an optional GEDI footprint loss tolerant to geolocation error". With GEDI shots
    as the only supervision (SiLog and L1 weighted 0) the footprint loss falls as the model
    learns (measured: mean of the first ten logged steps 6.1, of the last ten 2.7); with the
    dense losses as well, the GEDI term changes the weights; every training row of log.csv
    carries its value. Guards against: the GEDI loss switched off in canopy/train/loop.py
    (branch skipped, or computed but not added to the total), gedi_loss returning zero, and
    shots dropped on the way to the loss."""
    from canopy.train.losses import LossConfig

    gedi_only = LossConfig(gedi_weight=1.0, silog_weight=0.0, l1_weight=0.0)
    train(micro_config(tmp_path / "only", steps=30, seed=1, lr=2e-3, log_every=1,
                       loss=gedi_only), gedi_chips, [])
    rows = [r for r in csv.DictReader(open(tmp_path / "only" / "log.csv")) if r["kind"] == "train"]
    g = np.array([float(r["gedi"]) for r in rows])
    assert len(g) == 30 and np.isfinite(g).all() and (g > 0).all()
    assert g[-10:].mean() < 0.7 * g[:10].mean(), g

    weights = {}
    for name, w in (("dense", 0.0), ("dense_gedi", 1.0)):
        train(micro_config(tmp_path / name, steps=4, seed=1, log_every=1,
                           loss=LossConfig(gedi_weight=w)), gedi_chips, [])
        rows = list(csv.DictReader(open(tmp_path / name / "log.csv")))
        logged = [float(r["gedi"]) for r in rows if r["kind"] == "train"]
        assert len(logged) == 4
        assert (np.isfinite(logged).all() and min(logged) > 0) if w else np.isnan(logged).all()
        weights[name] = torch.load(tmp_path / name / CHECKPOINT_NAME, weights_only=False)["model"]
    key = "decode_head.project.conv.weight"
    assert not torch.equal(weights["dense"][key], weights["dense_gedi"][key])
