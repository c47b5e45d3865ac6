"""The shared training runtime: schedules at their boundaries, RNG capture, checkpoints, exact resume."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from ssl_backbone.errors import CheckpointError
from ssl_backbone.runtime import (
    DistInfo, WarmupCosine, capture_rng_state, init_distributed, load_checkpoint,
    restore_rng_state, restore_training_state, save_checkpoint, seed_all, training_state)


def test_warmup_cosine_at_its_boundaries():
    s = WarmupCosine(total_steps=10, warmup_steps=4, base=2.0, final=0.5)
    assert s(0) == pytest.approx(0.5)      # first step: one warm-up increment, not 0
    assert s(3) == pytest.approx(2.0)      # last warm-up step reaches the base value
    assert s(4) == pytest.approx(2.0)      # cosine starts at the base
    assert s(9) == pytest.approx(0.5 + 1.5 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))  # last step run
    assert s(10) == pytest.approx(0.5) and s(1000) == pytest.approx(0.5)  # after it: final
    values = [s(k) for k in range(4, 11)]
    assert all(a > b for a, b in zip(values, values[1:]))
    # no warm-up: the first step runs at the base value
    assert WarmupCosine(total_steps=10, base=2.0, final=0.5)(0) == pytest.approx(2.0)
    # a warm-up from a non-zero start
    assert WarmupCosine(total_steps=10, warmup_steps=2, base=1.0, start=0.5)(0) == pytest.approx(0.75)


def test_warmup_cosine_rises_for_ema_momentum():
    m = WarmupCosine(total_steps=100, base=0.992, final=1.0)
    values = [m(k) for k in range(101)]
    assert values[0] == pytest.approx(0.992) and values[-1] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(values, values[1:]))


def test_warmup_cosine_drives_lambda_lr_step_by_step():
    """As an LR multiplier: the k-th optimizer step runs at base_lr × schedule(k)."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    s = WarmupCosine(total_steps=6, warmup_steps=2, final=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, s)
    for k in range(6):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * s(k))
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.01)


def _draws() -> tuple:
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)])


def test_rng_capture_restore_replays_every_stream():
    seed_all(11)
    state = capture_rng_state()
    first = _draws()
    seed_all(12)  # move every stream elsewhere
    assert all(a != b for a, b in zip(_draws(), first))
    restore_rng_state(state)
    assert _draws() == first  # torch, numpy and python each replay (compared one by one)


def test_checkpoint_roundtrip_and_format_checks(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"step": 3, "w": torch.arange(4)}, format="demo", version=2)
    ck = load_checkpoint(path, format="demo", version=2)
    assert ck["step"] == 3 and torch.equal(ck["w"], torch.arange(4)) and ck["version"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left
    with pytest.raises(CheckpointError, match="not a 'other' checkpoint"):
        load_checkpoint(path, format="other", version=2)
    with pytest.raises(CheckpointError, match="version 2"):
        load_checkpoint(path, format="demo", version=1)  # written by a newer trainer
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "junk.pt", format="demo", version=2)


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"step": 1}, format="demo", version=1)
    real_save = torch.save

    def crash(obj, f, *a, **k):  # half a file, then the process "dies"
        f.write(b"PK\x03\x04 half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2}, format="demo", version=1)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(path, format="demo", version=1)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def _job(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(total_steps=8, warmup_steps=2))
    return model, opt, sched


def _steps(model, opt, sched, n):
    for _ in range(n):  # dropout and the data draw from the global streams
        x = torch.randn(16, 4) + float(np.random.rand()) + random.random()
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_training_state_resumes_bit_for_bit(tmp_path):
    model, opt, sched = _job()
    seed_all(5)
    _steps(model, opt, sched, 4)
    save_checkpoint(tmp_path / "ck.pt", training_state(4, {"model": model, "optimizer": opt,
                                                           "scheduler": sched}, note="x"),
                    format="demo", version=1)
    _steps(model, opt, sched, 4)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    seed_all(99)  # a fresh process: other weights, other random streams
    model2, opt2, sched2 = _job(seed=1)
    ck = load_checkpoint(tmp_path / "ck.pt", format="demo", version=1)
    step = restore_training_state(ck, {"model": model2, "optimizer": opt2, "scheduler": sched2})
    assert step == 4 and ck["note"] == "x"
    _steps(model2, opt2, sched2, 4)
    for k, v in straight.items():
        assert torch.equal(v, model2.state_dict()[k]), k
    with pytest.raises(CheckpointError, match="no 'ema'"):
        restore_training_state(ck, {"ema": model2})


def test_one_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo() and info.is_main and info.world_size == 1
