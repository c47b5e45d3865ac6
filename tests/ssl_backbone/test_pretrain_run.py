"""DINOv2 pretraining runs end to end (#14): determinism, exact resume, continuing from a
backbone, two processes equal one, healthy monitors, export, and `canopy pretrain` on real
imagery with its bad-input errors."""

from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch

from ssl_backbone.augment import CropConfig
from ssl_backbone.dinov2 import DINOv2, DINOv2Config, final_norm_tokens
from ssl_backbone.errors import CheckpointError
from ssl_backbone.pretrain import ImageFolderWindows, export_backbone, pretrain
from tests.conftest import SHARED_DATA, shared


class Textures:
    """Synthetic textured windows (smooth random fields, a few frequencies): a source of
    distinct images with no real content, for plumbing and determinism only."""

    def __init__(self, n: int = 32, window_px: int = 32):
        self.n, self.window_px = n, window_px

    def __len__(self):
        return self.n

    def window(self, index: int, gen: torch.Generator) -> torch.Tensor:
        g = torch.Generator().manual_seed(index)  # the image; gen picks nothing here
        cells = int(torch.randint(2, 9, (), generator=g))
        base = torch.rand(3, cells, cells, generator=g)
        s = self.window_px
        up = torch.nn.functional.interpolate(base[None], size=(s, s), mode="bicubic",
                                             align_corners=False)[0]
        return (up.clamp(0, 1) * 255).to(torch.uint8)


def write_png(path, h: int, w: int) -> None:
    from PIL import Image

    rgb = torch.randint(0, 255, (h, w, 3), dtype=torch.uint8).numpy()
    Image.fromarray(rgb).save(path)


def cfg_of(**kw) -> DINOv2Config:
    base = dict(arch="vit_micro", drop_path_rate=0.0, prototypes=64, head_hidden=32,
                head_bottleneck=16, batch_size=4, epochs=1, warmup_epochs=0.25,
                warmup_teacher_temp_epochs=0.25, freeze_last_layer_epochs=0.0, base_lr=2e-3,
                crops=CropConfig(global_size=32, local_size=16, n_local=2))
    base.update(kw)
    return DINOv2Config(**base)


def weights(path) -> dict:
    return torch.load(path, weights_only=False, map_location="cpu")["model"]


def test_a_run_is_deterministic_and_resumes_exactly(tmp_path):
    cfg = cfg_of(drop_path_rate=0.2)  # drop path draws from the global stream: restored too
    a = pretrain(cfg, Textures(), tmp_path / "a", log_every=1)
    b = pretrain(cfg, Textures(), tmp_path / "b", max_steps=3, log_every=1)
    assert (a.steps_done, a.total_steps, b.steps_done) == (8, 8, 3) and b.backbone_path is None
    b = pretrain(cfg, Textures(), tmp_path / "b", resume=True, log_every=1)
    assert b.steps_done == 8 and b.backbone_path is not None
    wa, wb = weights(tmp_path / "a" / "checkpoint.pt"), weights(tmp_path / "b" / "checkpoint.pt")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any("dino_head" in k for k in wa)  # heads are kept: anyone can continue the run
    la = (tmp_path / "a" / "log.csv").read_text().splitlines()
    lb = (tmp_path / "b" / "log.csv").read_text().splitlines()
    strip = [lambda rows: [r.rsplit(",", 1)[0] for r in rows]][0]  # drop the seconds column
    assert strip(la) == strip(lb) and len(la) == 9
    assert all(torch.isfinite(v).all() for v in wa.values() if v.is_floating_point())
    with pytest.raises(Exception, match="already holds a run"):
        pretrain(cfg, Textures(), tmp_path / "a")
    with pytest.raises(CheckpointError, match="another architecture or settings"):
        pretrain(cfg_of(arch="vit_tiny"), Textures(), tmp_path / "a", resume=True)


def test_the_teacher_moves_only_through_the_ema(tmp_path):
    cfg = cfg_of(momentum_teacher=1.0, momentum_teacher_end=1.0)
    pretrain(cfg, Textures(), tmp_path / "r", max_steps=2)
    w = weights(tmp_path / "r" / "checkpoint.pt")
    torch.manual_seed(cfg.seed)
    from ssl_backbone.pretrain import build_backbone

    fresh = DINOv2(cfg, build_backbone(cfg)).state_dict()
    teacher = [k for k in w if k.startswith("teacher.")]
    assert teacher and all(torch.equal(w[k], fresh[k]) for k in teacher)
    assert not all(torch.equal(w[k], fresh[k]) for k in w if k.startswith("student.backbone."))


def test_continuing_from_a_backbone_starts_from_its_features(tmp_path):
    """--init: student and teacher start as the loaded backbone (same outputs at step 0), and
    the exported result loads where `canopy train --backbone` loads backbones."""
    from ssl_backbone.checkpoints import load_backbone, save_safetensors
    from ssl_backbone.pretrain import build_backbone
    from ssl_backbone.vit import build_vit

    torch.manual_seed(3)
    src = build_vit("vit_micro")
    save_safetensors(src.state_dict(), tmp_path / "released.safetensors")
    cfg = cfg_of(init=str(tmp_path / "released.safetensors"))
    model = DINOv2(cfg, build_backbone(cfg)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = final_norm_tokens(src.eval(), x)
        for which in (model.student, model.teacher):
            out = final_norm_tokens(which["backbone"], x)
            assert all(torch.equal(a, b) for a, b in zip(ref, out))
    result = pretrain(cfg, Textures(), tmp_path / "run")
    vit, vcfg = load_backbone(result.backbone_path)
    teacher = weights(tmp_path / "run" / "checkpoint.pt")
    assert torch.equal(vit.blocks[0].attn.qkv.weight, teacher["teacher.backbone.blocks.0.attn.qkv.weight"])
    student = export_backbone(tmp_path / "run", tmp_path / "student.safetensors", which="student")
    vs, _ = load_backbone(student)
    assert torch.equal(vs.norm.weight, teacher["student.backbone.norm.weight"])


class Stripes:
    """Eight kinds of synthetic image (stripe orientation, frequency and colour by class, random
    phase): something a short run can tell apart, so healthy monitors mean it learned."""

    window_px = 64

    def __len__(self):
        return 64

    def window(self, index: int, gen: torch.Generator) -> torch.Tensor:
        import math

        k = index % 8
        yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
        angle, freq = math.pi * k / 8, 2 + (k % 4) * 2
        phase = float(torch.rand((), generator=gen)) * 2 * math.pi
        v = torch.sin((xx * math.cos(angle) + yy * math.sin(angle)) * freq * 2 * math.pi / 64
                      + phase)
        colour = torch.tensor([k % 2, k // 2 % 2, k // 4 % 2]).float().view(3, 1, 1) * 0.5 + 0.25
        return ((v[None] * 0.5 + 0.5) * colour * 255).to(torch.uint8)


def test_a_short_run_learns_with_healthy_collapse_monitors(tmp_path):
    """E3 of the spec: on data with something to learn, the DINO loss falls and every monitor
    stays in its band (that monitors flag collapsed embeddings is tested in test_dinov2)."""
    plain = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)
    cfg = cfg_of(epochs=40, batch_size=16, warmup_epochs=5, warmup_teacher_temp_epochs=10,
                 base_lr=0.02, momentum_teacher=0.99,
                 crops=CropConfig(global_size=64, local_size=32, n_local=2, **plain))
    result = pretrain(cfg, Stripes(), tmp_path / "r", log_every=40)
    assert result.steps_done == 160
    assert result.collapsed == [], result.monitors
    import csv

    rows = list(csv.DictReader(open(tmp_path / "r" / "log.csv")))
    assert float(rows[-1]["dino"]) < 0.5 * math.log(cfg.prototypes)  # well below uniform
    assert "rankme" in rows[0] and len(rows) == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out: str, cfg_dict: dict, steps: int = 2,
               resume: bool = False, fsdp: bool = False, method: str = "dinov2",
               window: int = 32) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import ssl_backbone.runtime as runtime

    read = runtime.load_checkpoint

    def noted(path, **kw):  # which processes read the run's checkpoint
        with open(f"{out}.reads", "a") as f:
            f.write(f"{rank}\n")
        return read(path, **kw)

    runtime.load_checkpoint = noted
    try:
        from ssl_backbone.methods import config_for

        pretrain(config_for(method, cfg_dict), Textures(window_px=window), out, max_steps=steps,
                 resume=resume, fsdp=fsdp)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_two_gloo_processes_equal_one_process_on_the_whole_batch(tmp_path, centering):
    """Each rank takes its half of every batch; centres / Sinkhorn sums are all-reduced and
    gradients averaged, so two steps match one process with the doubled batch. KoLeo is off
    (rank-local by design, as in DINOv2) and so are masks (drawn per rank's batch)."""
    import torch.multiprocessing as mp

    common = dict(koleo_weight=0.0, mask_probability=0.0, centering=centering, epochs=2)
    two = cfg_of(batch_size=4, **common)
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path / "ddp"), two.to_dict()), nprocs=2)
    pretrain(cfg_of(batch_size=8, base_lr=two.base_lr, **common), Textures(), tmp_path / "one",
             max_steps=2)
    wd, wo = weights(tmp_path / "ddp" / "checkpoint.pt"), weights(tmp_path / "one" / "checkpoint.pt")
    # gradients (before clipping) are the whole batch's mean: AdamW alone would hide a sum
    import csv

    gd, go = (list(csv.DictReader(open(tmp_path / r / "log.csv")))[-1] for r in ("ddp", "one"))
    for name in ("grad_norm_backbone", "grad_norm_dino_head"):
        assert float(gd[name]) == pytest.approx(float(go[name]), rel=1e-4), name
    for k in wd:
        if wd[k].is_floating_point():
            torch.testing.assert_close(wd[k], wo[k], atol=2e-5, rtol=1e-4, msg=k)


def test_fsdp_shards_the_run_and_computes_the_step_data_parallel_does(tmp_path):
    """Two gloo processes with FSDP hold half the parameters each, and two steps give the
    weights one process gets on the whole batch; a sharded run stopped after one step resumes
    sharded or unsharded (one checkpoint format) as if it had not stopped."""
    import torch.multiprocessing as mp

    common = dict(koleo_weight=0.0, mask_probability=0.0, epochs=2, drop_path_rate=0.0)
    two = cfg_of(batch_size=4, **common)
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path / "fsdp"), two.to_dict(), 2, False,
                               True), nprocs=2)
    pretrain(cfg_of(batch_size=8, base_lr=two.base_lr, **common), Textures(), tmp_path / "one",
             max_steps=2)
    wf, wo = weights(tmp_path / "fsdp" / "checkpoint.pt"), weights(tmp_path / "one" / "checkpoint.pt")
    assert wf.keys() == wo.keys()
    for k in wf:
        if wf[k].is_floating_point():
            torch.testing.assert_close(wf[k], wo[k], atol=2e-5, rtol=1e-4, msg=k)
    held = {r: json.loads((tmp_path / r / "summary.json").read_text())[
        "parameter_elements_per_process"] for r in ("fsdp", "one")}
    # half each, but for tensors whose first dimension does not split (a [1, N, D] position
    # table stays on the first process)
    assert held["fsdp"] < 0.53 * held["one"]
    assert json.loads((tmp_path / "fsdp" / "config.json").read_text())["fsdp"] is True
    # resume: one sharded step, then one more sharded and, from the same file, one unsharded
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path / "b"), two.to_dict(), 1, False,
                               True), nprocs=2)
    import shutil

    shutil.copytree(tmp_path / "b", tmp_path / "c")
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path / "b"), two.to_dict(), 1, True,
                               True), nprocs=2)
    # the sharded resume read the file on the first process only (the others got shards)
    assert (tmp_path / "b.reads").read_text().split() == ["0"]
    (tmp_path / "d").mkdir()  # a file the first process cannot read stops every process
    (tmp_path / "d" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(mp.ProcessRaisedException, match="cannot read"):
        mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path / "d"), two.to_dict(), 1, True,
                                   True), nprocs=2)
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path / "c"), two.to_dict(), 1, True,
                               False), nprocs=2)
    for run in ("b", "c"):
        wr = weights(tmp_path / run / "checkpoint.pt")
        for k in wf:
            if wf[k].is_floating_point():
                torch.testing.assert_close(wr[k], wf[k], atol=1e-6, rtol=1e-5, msg=f"{run}: {k}")


def test_canopy_pretrain_fsdp_under_torchrun_on_real_imagery(tmp_path):
    """What a user types: torchrun, two processes, --fsdp, on real overhead images."""
    import subprocess
    import sys

    from tests.conftest import SHARED_DATA, shared

    shared("overhead_rgb")
    (tmp_path / "s.yaml").write_text(
        "arch: vit_micro\nprototypes: 64\nhead_hidden: 32\nhead_bottleneck: 16\nbatch_size: 2\n"
        "epochs: 1\ncrops: {global_size: 64, local_size: 32, n_local: 2}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    env["OMP_NUM_THREADS"] = "1"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={_free_port()}", "-m", "canopy.cli", "pretrain", "--config",
         str(tmp_path / "s.yaml"), "--imagery", str(SHARED_DATA / "overhead_rgb"), "--window", "64",
         "--max-steps", "2", "--fsdp", "--device", "cpu", "--precision", "fp32", "--quiet",
         "-o", str(tmp_path / "run")], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "stopped at step 2/" in run.stdout
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["fsdp"] is True and meta["world_size"] == 2
    assert set(weights(tmp_path / "run" / "checkpoint.pt")) >= {"student.backbone.pos_embed"}


@pytest.mark.parametrize("method", ["ijepa", "msn", "distill"])
def test_fsdp_runs_every_method_as_data_parallel_does(method, tmp_path):
    """The same two processes with and without sharding: the same weights after two steps, the
    sharded run stopped after one and resumed (I-JEPA's predictor blocks are sharded units too;
    MSN's prototypes sit in the root; a distillation teacher stays whole on each process; the
    mask token I-JEPA and MSN never use has no optimizer state to restore)."""
    import torch.multiprocessing as mp

    small = {"ijepa": dict(image_size=64, predictor_dim=64, predictor_heads=2, predictor_depth=1,
                           min_keep=2),
             "msn": dict(prototypes=16, proj_hidden=32, proj_dim=16,
                         crops={"global_size": 32, "local_size": 16, "n_local": 2})}.get(method)
    if method == "distill":
        pretrain(cfg_of(batch_size=4, epochs=1), Textures(), tmp_path / "teacher")
        small = dict(teacher=str(tmp_path / "teacher"), head_hidden=32, head_bottleneck=16,
                     koleo_weight=0.0, crops={"global_size": 32, "local_size": 16, "n_local": 2})
    cfg = dict(arch="vit_micro", batch_size=4, epochs=2, drop_path_rate=0.0, **small)
    for run, fsdp, steps, resume in (("ddp", False, 2, False), ("fsdp", True, 1, False),
                                     ("fsdp", True, 1, True)):
        mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path / run), cfg, steps, resume,
                                   fsdp, method, 64), nprocs=2)
    wd, wf = (weights(tmp_path / r / "checkpoint.pt") for r in ("ddp", "fsdp"))
    assert wd.keys() == wf.keys()
    for k in wd:
        if wd[k].is_floating_point():
            torch.testing.assert_close(wf[k], wd[k], atol=2e-5, rtol=1e-4, msg=k)


def test_image_folder_source_and_its_errors(tmp_path):
    (tmp_path / "imgs").mkdir()
    write_png(tmp_path / "imgs" / "a.png", 70, 90)
    write_png(tmp_path / "imgs" / "b.png", 20, 20)
    src = ImageFolderWindows(tmp_path / "imgs", window_px=32)
    assert len(src) == 70 * 90 // 32 ** 2 and len(src.skipped) == 1
    assert src.window(3, torch.Generator().manual_seed(0)).shape == (3, 32, 32)
    from ssl_backbone.pretrain import DataError

    with pytest.raises(DataError, match="no readable"):
        ImageFolderWindows(tmp_path / "imgs", window_px=128)


# ------------------------------------------------------------------ canopy pretrain


def test_canopy_pretrain_on_real_overhead_imagery(tmp_path, capsys):
    from tests.test_predict import run_cli

    shared("overhead_rgb")
    (tmp_path / "tiny.yaml").write_text(
        "arch: vit_micro\ndrop_path_rate: 0.0\nprototypes: 64\nhead_hidden: 32\n"
        "head_bottleneck: 16\nbatch_size: 4\nepochs: 1\n"
        "crops: {global_size: 48, local_size: 16, n_local: 2}\n")
    code, out, err = run_cli("pretrain", "--config", tmp_path / "tiny.yaml", "--imagery",
                             SHARED_DATA / "overhead_rgb", "--window", 64, "-o", tmp_path / "run",
                             "--max-steps", 2, "--device", "cpu", "--precision", "fp32",
                             capsys=capsys)
    assert code == 0, err
    assert "stopped at step 2/" in out and "continue with --resume" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps_done"] == 2
    code, out, err = run_cli("pretrain", "export", tmp_path / "run", "-o",
                             tmp_path / "b.safetensors", capsys=capsys)
    assert code == 0 and (tmp_path / "b.safetensors").exists(), err


@pytest.mark.parametrize("args, message", [
    (["--config", "{bad_yaml}"], "unknown dinov2 config keys: ['teacher_tmp']"),
    (["--config", "{ratio_yaml}"], "mask_ratio must be 0"),
    (["--init", "{junk}"], "--init"),
    (["--imagery", "{empty}"], "holds no readable 8-bit RGB image"),
    (["--window", "16"], "smaller than the 48-px crop"),
])
def test_canopy_pretrain_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    from tests.test_predict import run_cli

    (tmp_path / "imgs").mkdir()
    write_png(tmp_path / "imgs" / "a.png", 96, 96)
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.yaml").write_text("teacher_tmp: 0.07\n")
    (tmp_path / "ratio.yaml").write_text("mask_ratio: [0.1, 1.5]\n")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "tiny.yaml").write_text(
        "arch: vit_micro\nprototypes: 64\nhead_hidden: 32\nhead_bottleneck: 16\nbatch_size: 2\n"
        "crops: {global_size: 48, local_size: 16, n_local: 2}\n")
    subs = {"bad_yaml": tmp_path / "bad.yaml", "ratio_yaml": tmp_path / "ratio.yaml",
            "junk": tmp_path / "junk.pth", "empty": tmp_path / "empty"}
    base = {"--config": tmp_path / "tiny.yaml", "--imagery": tmp_path / "imgs", "--window": "64"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value.format(**subs)
    argv = ["pretrain", *[x for kv in base.items() for x in kv], "-o", tmp_path / "run",
            "--device", "cpu", "--precision", "fp32"]
    code, out, err = run_cli(*argv, capsys=capsys)
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_gram_anchoring_runs_against_a_refreshed_snapshot_of_the_teacher(tmp_path):
    """DINOv3's Gram anchoring as an option: its loss is logged, and the Gram teacher is the
    EMA teacher's backbone as of its last refresh (every 0.25 epoch = 2 steps here)."""
    import csv

    cfg = cfg_of(gram_weight=1.0, gram_refresh_epochs=0.25)
    pretrain(cfg, Textures(), tmp_path / "r", max_steps=4, log_every=1)
    rows = list(csv.DictReader(open(tmp_path / "r" / "log.csv")))
    assert all(math.isfinite(float(r["gram"])) for r in rows)
    assert float(rows[0]["gram"]) == pytest.approx(0.0, abs=1e-6)  # snapshot = start weights
    w = weights(tmp_path / "r" / "checkpoint.pt")
    gram = {k[len("gram_teacher."):]: v for k, v in w.items() if k.startswith("gram_teacher.")}
    teacher = {k[len("teacher.backbone."):]: v for k, v in w.items()
               if k.startswith("teacher.backbone.")}
    assert gram.keys() == teacher.keys() and all(torch.equal(gram[k], teacher[k]) for k in gram)


def test_pretraining_runs_on_a_rope_backbone_from_scratch_and_continued(tmp_path):
    """The dinov3 family (RoPE, registers) pretrains with the same method: from scratch, and
    continued from a DINOv3 file (#20), whose teacher starts as the loaded backbone."""
    from ssl_backbone.checkpoints import load_backbone, save_safetensors
    from ssl_backbone.vit import build_vit

    a = pretrain(cfg_of(arch="dinov3_vit_micro"), Textures(), tmp_path / "scratch", max_steps=2)
    assert a.steps_done == 2 and all(math.isfinite(v) for v in a.last.values())
    torch.manual_seed(1)
    src = build_vit("dinov3_vit_micro")
    sd = {k.replace("reg_token", "storage_tokens"): v for k, v in src.state_dict().items()}
    save_safetensors(sd, tmp_path / "dinov3.safetensors")
    b = pretrain(cfg_of(init=str(tmp_path / "dinov3.safetensors"), epochs=0.25), Textures(),
                 tmp_path / "continued")
    assert b.backbone_path is not None
    vit, vcfg = load_backbone(b.backbone_path)
    assert vcfg.family == "dinov3" and vcfg.reg_tokens == 4
    w = weights(tmp_path / "continued" / "checkpoint.pt")
    assert torch.equal(vit.reg_token, w["teacher.backbone.reg_token"])


def test_two_processes_resume_exactly_with_drop_path(tmp_path):
    """Under two processes a run stopped and resumed equals the uninterrupted one: each rank
    gets its own RNG streams back (drop path draws differ per rank), not rank 0's."""
    import torch.multiprocessing as mp

    cfg = cfg_of(batch_size=4, drop_path_rate=0.2, koleo_weight=0.0, epochs=2).to_dict()
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path / "a"), cfg, 3), nprocs=2)
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path / "b"), cfg, 1), nprocs=2)
    mp.spawn(_rank_main, args=(2, _free_port(), str(tmp_path / "b"), cfg, 2, True), nprocs=2)
    wa, wb = weights(tmp_path / "a" / "checkpoint.pt"), weights(tmp_path / "b" / "checkpoint.pt")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_a_run_saved_before_a_config_field_existed_still_resumes(tmp_path):
    """Checkpoints written before ViTConfig.in_chans (bands) existed lack the key, and one
    release wrote it for RGB too: either way the run is the same (the field's default), so
    resuming it must not be refused as another architecture."""
    cfg = cfg_of()
    pretrain(cfg, Textures(), tmp_path / "r", max_steps=2)
    path = tmp_path / "r" / "checkpoint.pt"
    state = torch.load(path, weights_only=False, map_location="cpu")
    assert "in_chans" not in state["backbone"]  # RGB runs stay readable by older releases
    state["backbone"]["in_chans"] = 3
    torch.save(state, path)
    result = pretrain(cfg, Textures(), tmp_path / "r", resume=True)
    assert result.steps_done == 8
    with pytest.raises(CheckpointError, match="another architecture or settings"):
        pretrain(cfg_of(prototypes=32), Textures(), tmp_path / "r", resume=True)
