"""Distillation of a DINOv2 run into a student (ssl_backbone.distill, `canopy pretrain distill`):
the student learns to say what the frozen teacher says, the teacher never moves and is never
written into the run, runs resume exactly, and bad teachers are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from ssl_backbone.augment import OVERHEAD_MEAN, OVERHEAD_STD, CropConfig
from ssl_backbone.dinov2 import final_norm_tokens
from ssl_backbone.distill import DistillConfig, DistillDINOv2, load_teacher
from ssl_backbone.errors import CheckpointError, ConfigError
from ssl_backbone.methods import _normalise, config_for, method_of
from ssl_backbone.pretrain import build_backbone, pretrain
from tests.conftest import SHARED_DATA, shared
from tests.ssl_backbone.test_pretrain_run import Stripes, Textures, cfg_of, weights

PLAIN = CropConfig(global_size=64, local_size=32, n_local=2, jitter_p=0.0, grayscale_p=0.0,
                   blur_p=(0.0, 0.0, 0.0), solarize_p=0.0)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A DINOv2 run that has learned the eight kinds of Stripes (160 steps, ≈ 11 s)."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    cfg = cfg_of(epochs=40, batch_size=16, warmup_epochs=5, warmup_teacher_temp_epochs=10,
                 base_lr=0.02, momentum_teacher=0.99, crops=PLAIN)
    result = pretrain(cfg, Stripes(), out, log_every=160)
    assert result.collapsed == []
    return out


def distill_cfg(teacher, **kw) -> DistillConfig:
    base = dict(teacher=str(teacher), arch="vit_micro", head_hidden=32, head_bottleneck=16,
                batch_size=16, epochs=20, warmup_epochs=2, base_lr=0.05,
                freeze_last_layer_epochs=0.0, momentum_teacher=0.9, crops=PLAIN)
    base.update(kw)
    return config_for("distill", base)


def agreement(frozen, net) -> float:
    """Share of 64 fresh Stripes windows on which ``net``'s DINO head picks the frozen
    teacher's prototype."""
    src, gen = Stripes(), torch.Generator().manual_seed(99)
    x = _normalise(torch.stack([src.window(i, gen) for i in range(64)]), OVERHEAD_MEAN,
                   OVERHEAD_STD)
    with torch.no_grad():
        a = frozen["dino_head"](final_norm_tokens(frozen["backbone"], x)[0]).argmax(-1)
        b = net["dino_head"](final_norm_tokens(net["backbone"], x)[0]).argmax(-1)
    return float((a == b).float().mean())


def test_the_student_learns_to_say_what_the_frozen_teacher_says(teacher_run, tmp_path):
    """After 80 steps the released network (the student's EMA) picks the teacher's prototype
    on fresh windows; at step 0 it does not. The teacher run's head settings are inherited."""
    cfg = distill_cfg(teacher_run)
    assert cfg.prototypes == 64 and method_of(cfg).name == "distill"
    torch.manual_seed(cfg.seed)
    model = DistillDINOv2(cfg, build_backbone(cfg)).eval()
    frozen = model.frozen_teacher
    assert agreement(frozen, model.teacher) < 0.3
    result = pretrain(cfg, Stripes(), tmp_path / "s", log_every=80)
    assert result.steps_done == 80 and result.collapsed == [], result.monitors
    # no masking, so the iBOT term is taken on every patch of the global crops (the paper's)
    assert result.last["ibot"] > 0.1
    model.load_state_dict(weights(tmp_path / "s" / "checkpoint.pt"))
    assert agreement(frozen, model.teacher) >= 0.8
    # what `canopy pretrain export` writes is that EMA, in the student's size
    from ssl_backbone.checkpoints import load_backbone

    vit, vcfg = load_backbone(result.backbone_path)
    assert vcfg.embed_dim == 128 and torch.equal(
        vit.blocks[0].attn.qkv.weight, model.teacher["backbone"].blocks[0].attn.qkv.weight)
    meta = json.loads((tmp_path / "s" / "config.json").read_text())
    assert meta["method"] == "distill" and meta["config"]["teacher"] == str(teacher_run)


def test_the_teacher_never_moves_nor_enters_the_checkpoint_and_runs_resume_exactly(
        teacher_run, tmp_path, monkeypatch):
    cfg = distill_cfg(teacher_run, epochs=1, batch_size=4, drop_path_rate=0.1)
    before, _, _ = load_teacher(teacher_run)
    made, init = [], DistillDINOv2.__init__

    def keep(self, *args, **kwargs):  # the very model the trainer steps, to inspect after
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(DistillDINOv2, "__init__", keep)
    src = Textures(window_px=64)
    a = pretrain(cfg, src, tmp_path / "a")
    model = made[0]  # the frozen teacher in memory after 8 optimiser and EMA steps
    after = model.frozen_teacher.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.state_dict().items())
    assert not any(p.requires_grad for p in model.frozen_teacher.parameters())
    assert not set(map(id, model.frozen_teacher.parameters())) & set(map(id, model.parameters()))
    pretrain(cfg, src, tmp_path / "b", max_steps=3)
    b = pretrain(cfg, src, tmp_path / "b", resume=True)
    assert a.steps_done == b.steps_done == 8
    wa, wb = weights(tmp_path / "a" / "checkpoint.pt"), weights(tmp_path / "b" / "checkpoint.pt")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert {k.split(".")[0] for k in wa} == {"student", "teacher", "dino_center", "ibot_center"}


def test_a_centring_student_starts_from_the_teachers_centre(teacher_run):
    _, _, centers = load_teacher(teacher_run)
    assert float(centers["dino_center.center"].abs().sum()) > 0  # the teacher run moved it
    cfg = distill_cfg(teacher_run)
    model = DistillDINOv2(cfg, build_backbone(cfg))
    assert torch.equal(model.dino_center.center, centers["dino_center.center"])
    sk = DistillDINOv2(distill_cfg(teacher_run, centering="sinkhorn_knopp"), build_backbone(cfg))
    assert float(sk.dino_center.center.abs().sum()) == 0


def test_unfit_teachers_and_students_are_refused_by_name(teacher_run, tmp_path):
    with pytest.raises(ConfigError, match="teacher is required") as e:
        config_for("distill", {"arch": "vit_micro"})
    assert e.value.field == "teacher"
    with pytest.raises(CheckpointError, match="no checkpoint.pt"):
        distill_cfg(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="prototypes must be the teacher's") as e:
        distill_cfg(teacher_run, prototypes=128)
    assert e.value.field == "prototypes"
    cfg = distill_cfg(teacher_run, arch="vit_micro")
    from dataclasses import replace

    from ssl_backbone.vit import build_vit

    other = build_vit(replace(build_backbone(cfg).cfg, patch_size=8))
    with pytest.raises(ConfigError, match="patch size .8. must be the teacher's .16."):
        DistillDINOv2(cfg, other)
    ij = tmp_path / "ij"  # an I-JEPA run folder, as the trainer writes it (no DINO head)
    ij.mkdir()
    (ij / "checkpoint.pt").write_bytes(b"")
    (ij / "config.json").write_text(json.dumps({"method": "ijepa", "config": {}, "backbone": {}}))
    with pytest.raises(CheckpointError, match="a ijepa run; distillation needs a DINOv2 run"):
        distill_cfg(tmp_path / "ij")


def test_canopy_pretrain_distill_on_real_imagery_and_its_bad_input(teacher_run, tmp_path, capsys):
    from tests.test_predict import run_cli

    shared("overhead_rgb")
    (tmp_path / "s.yaml").write_text(
        "head_hidden: 32\nhead_bottleneck: 16\nbatch_size: 4\nepochs: 1\n"
        "crops: {global_size: 64, local_size: 32, n_local: 2}\n")
    common = ["--imagery", SHARED_DATA / "overhead_rgb", "--window", 64, "--config",
              tmp_path / "s.yaml", "--arch", "vit_micro", "--device", "cpu", "--precision", "fp32"]
    code, out, err = run_cli("pretrain", "distill", "--teacher", teacher_run, *common,
                             "-o", tmp_path / "run", "--max-steps", 2, capsys=capsys)
    assert code == 0, err
    assert "stopped at step 2/" in out and "continue with --resume" in out
    for teacher, message in [(tmp_path / "none", "no checkpoint.pt"),
                             (teacher_run.parent, "no checkpoint.pt")]:
        code, out, err = run_cli("pretrain", "distill", "--teacher", teacher, *common,
                                 "-o", tmp_path / "bad", capsys=capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code != 0 and len(lines) == 1 and message in lines[0], err
        assert not (tmp_path / "bad").exists()


def edited_teacher(teacher_run, out, crops=None, grow=False, bands=None):
    """A copy of the teacher run with its crops settings or recorded bands changed, or grown to
    read 4 bands (the 4th kernel the mean of the RGB ones, as `--init` grows a backbone)."""
    import shutil

    shutil.copytree(teacher_run, out)
    meta = json.loads((out / "config.json").read_text())
    meta["config"]["crops"].update(crops or {})
    if bands:
        meta["bands"] = bands
    if grow:
        ck = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
        for k, v in ck["model"].items():
            if k.endswith("backbone.patch_embed.proj.weight"):
                ck["model"][k] = torch.cat([v, v.mean(dim=1, keepdim=True)], dim=1)
        ck["backbone"]["in_chans"] = meta["backbone"]["in_chans"] = 4
        torch.save(ck, out / "checkpoint.pt")
    (out / "config.json").write_text(json.dumps(meta))
    return out


def test_the_student_normalises_its_crops_as_the_teacher_run_did(teacher_run, tmp_path):
    """The teacher sees the student's crops: they must be normalised as in the teacher's own
    run. Its mean/std are inherited; another value is refused by name."""
    mean, std = [0.5, 0.45, 0.4], [0.2, 0.2, 0.2]
    other = edited_teacher(teacher_run, tmp_path / "t", crops={"mean": mean, "std": std})
    cfg = config_for("distill", {"teacher": str(other), "arch": "vit_micro",
                                 "crops": {"global_size": 64, "local_size": 32}})
    assert cfg.crops.mean == tuple(mean) and cfg.crops.std == tuple(std)
    assert cfg.crops.global_size == 64  # what the student gives is kept
    built = config_for("distill", {"teacher": str(other), "crops": CropConfig(global_size=64)})
    assert built.crops.mean == tuple(mean)  # a built CropConfig's default mean chose nothing
    with pytest.raises(ConfigError, match=r"crops.mean must be the teacher's") as e:
        config_for("distill", {"teacher": str(other), "crops": {"mean": list(OVERHEAD_MEAN)}})
    assert e.value.field == "crops.mean"
    with pytest.raises(ConfigError, match="crops mean needs 3 values .R,G,B. or 4"):
        CropConfig(mean=(0.5, 0.5))


def test_distill_reads_the_teachers_bands_by_default(teacher_run, tmp_path, capsys):
    """A 4-band teacher gives a 4-band student on R,G,B,NIR imagery with no --bands, and a
    teacher that read its imagery as bands 3,2,1 gives a student that reads it so too."""
    from tests.test_bands import OSBS, rgbn_from_real_rgb
    from tests.test_predict import run_cli

    four = edited_teacher(teacher_run, tmp_path / "t4", grow=True)
    img = rgbn_from_real_rgb(shared(*OSBS, "OSBS_029.tif"), tmp_path / "rgbn.tif")
    (tmp_path / "s.yaml").write_text(
        "head_hidden: 32\nhead_bottleneck: 16\nbatch_size: 2\nepochs: 1\n"
        "crops: {global_size: 64, local_size: 32, n_local: 2}\n")
    common = ["--window", 64, "--config", tmp_path / "s.yaml", "--arch", "vit_micro",
              "--device", "cpu", "--precision", "fp32", "--max-steps", 1]
    code, out, err = run_cli("pretrain", "distill", "--teacher", four, "--imagery", img, *common,
                             "-o", tmp_path / "run", capsys=capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["backbone"]["in_chans"] == 4
    code, out, err = run_cli("pretrain", "distill", "--teacher", four, "--imagery",
                             shared(*OSBS, "OSBS_029.tif"), *common, "-o", tmp_path / "bad",
                             capsys=capsys)
    assert code != 0 and "RGB+NIR" in err, err
    bgr = edited_teacher(teacher_run, tmp_path / "t321", bands=[3, 2, 1])
    code, out, err = run_cli("pretrain", "distill", "--teacher", bgr, "--imagery",
                             shared(*OSBS, "OSBS_029.tif"), *common, "-o", tmp_path / "r321",
                             capsys=capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "r321" / "config.json").read_text())["bands"] == [3, 2, 1]
