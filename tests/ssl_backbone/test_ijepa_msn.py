"""I-JEPA, MSN and PMSN on the one trainer: mask collator invariants, losses against clean
formulas written here, the context encoder's sequence length, prototypes that learn, the
PMSN-uniform = MSN equivalence, the global mean-entropy term under two gloo processes, and
short runs of each method through ``canopy pretrain`` (spec ../shared/specs/ssl.md §3, §4, §7)."""

from __future__ import annotations

import json
import math
import os
import socket

import numpy as np
import pytest
import torch

from ssl_backbone.errors import CheckpointError, ConfigError
from ssl_backbone.ijepa import IJEPA, IJEPAConfig, Predictor, multiblock_masks, sincos_2d, smooth_l1
from ssl_backbone.methods import config_for
from ssl_backbone.msn import (
    MSN, MSNConfig, msn_loss, power_law_prior, prior_regulariser, sharpen)
from ssl_backbone.pretrain import pretrain
from ssl_backbone.vit import build_vit
from tests.conftest import SHARED_DATA, shared
from tests.ssl_backbone.test_pretrain_run import Textures, weights


# ------------------------------------------------------------------------------ I-JEPA masks


def test_multiblock_masks_keep_the_papers_statistics_and_never_overlap():
    """256 px / 16 px patches (16×16 grid), batches of 64: targets ≈ 44 patches per block, kept
    context ≈ 72 per image (the official collator's measured means over 50 batches, spec
    §3.1; ours 44.8 and 72.2), ±10 %; context and targets disjoint; equal lengths in a batch;
    the last row and column reachable (official: never)."""
    cfg = IJEPAConfig()
    gen = torch.Generator().manual_seed(0)
    tgt_sizes, ctx_sizes = [], []
    covered = torch.zeros(256, dtype=torch.bool)
    for _ in range(50):
        ctx, tgt = multiblock_masks(64, 16, 16, cfg, gen)
        assert ctx.shape[0] == 64 and tgt.shape[:2] == (64, 4)
        for b in range(64):
            c = set(ctx[b].tolist())
            assert len(c) == ctx.shape[1]  # no repeats
            for m in range(4):
                assert not c & set(tgt[b, m].tolist())
                covered[tgt[b, m]] = True
        tgt_sizes.append(tgt.shape[2])
        ctx_sizes.append(ctx.shape[1])
    assert np.mean(tgt_sizes) == pytest.approx(43.8, rel=0.1)
    assert np.mean(ctx_sizes) == pytest.approx(72.2, rel=0.1)
    grid = covered.view(16, 16)
    assert grid[-1].any() and grid[:, -1].any()


def test_impossible_mask_settings_are_one_clear_error():
    with pytest.raises(ConfigError, match="leave no context"):
        IJEPAConfig(targets=6, target_scale=(0.2, 0.3))
    with pytest.raises(ConfigError, match="no context of ≥ 10 patches"):
        multiblock_masks(2, 4, 4, IJEPAConfig(), torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------ I-JEPA model


def test_smooth_l1_is_the_formula():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 7, 9, generator=g) * 2, torch.randn(5, 7, 9, generator=g)
    u = (a - b).double().abs()
    ref = torch.where(u < 1, 0.5 * u ** 2, u - 0.5).mean()
    assert float(smooth_l1(a, b)) == pytest.approx(float(ref), rel=1e-6)  # fp32 against fp64


def test_sincos_positions_are_the_2d_formula_and_fixed():
    dim, h, w = 16, 3, 5
    pos = sincos_2d(dim, h, w).double().numpy()
    q = dim // 4
    omega = 1.0 / 10000 ** (np.arange(q) / q)
    for r in range(h):
        for c in range(w):
            want = np.concatenate([np.sin(r * omega), np.cos(r * omega),
                                   np.sin(c * omega), np.cos(c * omega)])
            np.testing.assert_allclose(pos[r * w + c], want, atol=1e-7)
    pred = Predictor(32, 16, 1, 2)
    assert not any("pos" in n for n, _ in pred.named_parameters())  # not trainable


def test_the_context_encoder_sees_only_context_tokens():
    cfg = IJEPAConfig(arch="vit_micro", image_size=128, predictor_dim=32, predictor_heads=2,
                      predictor_depth=1)
    model = IJEPA(cfg, build_vit("vit_micro"))
    ctx, tgt = multiblock_masks(2, 8, 8, cfg, torch.Generator().manual_seed(0))
    seen = []
    hook = model.student["backbone"].blocks[0].register_forward_hook(
        lambda m, i, o: seen.append(o.shape[1]))
    terms = model.losses(torch.randn(2, 3, 128, 128), ctx, tgt)
    hook.remove()
    prefix = model.student["backbone"].num_prefix_tokens
    assert seen == [prefix + ctx.shape[1]] and ctx.shape[1] < 64 // 2
    assert terms["total"].requires_grad
    pred = model.student["predictor"](torch.randn(2, ctx.shape[1], 128), ctx, tgt, (8, 8))
    assert pred.shape == (4 * 2, tgt.shape[2], 128)  # (M·B, |T|, D_enc)


# ------------------------------------------------------------------------------ MSN / PMSN


def _ref_msn(anchor, target, protos, tau=0.1, t=0.25, lam=1.0, iters=3):
    """The MSN objective written out in float64: soft-NN assignments, sharpened targets,
    Sinkhorn (3 iterations on probabilities), cross-entropy + λ·(log K − H(p̄))."""
    a = torch.nn.functional.normalize(anchor.double(), dim=1)
    z = torch.nn.functional.normalize(target.double(), dim=1)
    q = torch.nn.functional.normalize(protos.double(), dim=1)
    p = torch.softmax(a @ q.T / tau, dim=1)
    pt = torch.softmax(z @ q.T / tau, dim=1) ** (1 / t)
    pt = pt / pt.sum(1, keepdim=True)
    Q = pt.T / pt.sum()
    k, n = Q.shape
    for _ in range(iters):
        Q = Q / Q.sum(1, keepdim=True) / k
        Q = Q / Q.sum(0, keepdim=True) / n
    pt = (Q * n).T
    pt = pt.repeat(anchor.shape[0] // target.shape[0], 1)
    ce = (-(pt * p.log()).sum(1)).mean()
    pbar = p.mean(0)
    return ce, (pbar * pbar.log()).sum() + math.log(k)


def test_msn_loss_equals_the_formula():
    g = torch.Generator().manual_seed(3)
    b, views, d, k = 6, 11, 32, 128
    anchor, target = torch.randn(views * b, d, generator=g), torch.randn(b, d, generator=g)
    protos = torch.randn(k, d, generator=g)
    terms = msn_loss(anchor, target, protos)
    ce, reg = _ref_msn(anchor, target, protos)
    assert float(terms["msn"]) == pytest.approx(float(ce), rel=1e-5)
    assert float(terms["memax"]) == pytest.approx(float(reg), abs=1e-6)
    assert float(terms["total"]) == pytest.approx(float(ce + reg), rel=1e-5)


def test_pmsn_with_a_uniform_prior_is_msn_and_the_power_law_is_a_distribution():
    g = torch.Generator().manual_seed(4)
    k = 64
    pbar = torch.softmax(torch.randn(k, generator=g, dtype=torch.float64) * 3, 0)  # clustered
    uniform = power_law_prior(k, 0.0).double()
    assert float(prior_regulariser(pbar, uniform)) == pytest.approx(
        float(prior_regulariser(pbar, None)), abs=1e-12)
    # the other direction (lightly's KL(π ‖ p̄)) is not MSN's term on clustered assignments
    kl_other = float((uniform * (uniform.log() - pbar.log())).sum())
    assert abs(kl_other - float(prior_regulariser(pbar, None))) > 0.1
    pi = power_law_prior(k, 0.25)
    assert float(pi.sum()) == pytest.approx(1.0) and bool((pi[1:] < pi[:-1]).all())
    # a p̄ shaped like the prior costs nothing; the uniform one does, under a power law
    assert float(prior_regulariser(pi.double(), pi.double())) == pytest.approx(0.0, abs=1e-12)
    assert float(prior_regulariser(uniform, pi.double())) > 0


def test_sharpening_and_sinkhorn_targets():
    g = torch.Generator().manual_seed(5)
    p = torch.softmax(torch.randn(8, 16, generator=g), 1)
    torch.testing.assert_close(sharpen(p, 1.0), p)
    assert float(sharpen(p, 0.01).max(1).values.min()) > 0.99
    terms = msn_loss(torch.randn(16, 8, generator=g), torch.randn(8, 8, generator=g),
                     torch.randn(16, 8, generator=g))
    torch.testing.assert_close(terms["teacher_probs"].sum(1), torch.ones(8), atol=1e-5, rtol=0)


def test_prototypes_receive_gradients_and_learn():
    cfg = MSNConfig(arch="vit_micro", prototypes=16, proj_hidden=32, proj_dim=8)
    model = MSN(cfg, build_vit("vit_micro"))
    from ssl_backbone.msn import patch_keep

    x = torch.randn(4, 3, 64, 64)
    terms = model.losses(x, x.flip(-1), torch.randn(8, 3, 32, 32),
                         patch_keep(4, 16, 0.15, torch.Generator().manual_seed(0)))
    terms["total"].backward()
    grad = model.student["prototypes"]["weight"].grad
    assert grad is not None and float(grad.abs().sum()) > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memax_rank(rank: int, port: int, anchors, targets, protos, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        b = targets.shape[0] // 2
        # this rank's half of the images, every view of them
        views = anchors.shape[0] // targets.shape[0]
        mine = torch.cat([anchors[v * 2 * b + rank * b: v * 2 * b + (rank + 1) * b] for v in range(views)])
        protos = protos.clone().requires_grad_(True)
        terms = msn_loss(mine, targets[rank * b:(rank + 1) * b], protos, use_sinkhorn=False)
        terms["memax"].backward()
        torch.save({"memax": float(terms["memax"]), "grad": protos.grad}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_mean_entropy_term_uses_the_global_batch_under_two_processes(tmp_path):
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(6)
    b, views, d, k = 8, 3, 16, 32
    anchors, targets = torch.randn(views * b, d, generator=g) * 3, torch.randn(b, d, generator=g)
    protos = torch.randn(k, d, generator=g)
    out = str(tmp_path / "memax")
    mp.spawn(_memax_rank, args=(_free_port(), anchors, targets, protos, out), nprocs=2)
    p1 = protos.clone().requires_grad_(True)
    one = msn_loss(anchors, targets, p1, use_sinkhorn=False)["memax"]
    one.backward()
    whole = float(one)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    for r in ranks:
        assert r["memax"] == pytest.approx(whole, abs=1e-6)
    # the trainer averages gradients over ranks: that must be the one-process gradient
    # (c10d's all_reduce has no backward, which would leave the term half its gradient here)
    torch.testing.assert_close((ranks[0]["grad"] + ranks[1]["grad"]) / 2, p1.grad, atol=1e-6, rtol=1e-4)
    # a rank-local mean (lightly's) would differ: the halves are not alike
    half = float(msn_loss(anchors.view(views, b, d)[:, : b // 2].reshape(-1, d),
                          targets[: b // 2], protos, use_sinkhorn=False)["memax"])
    assert abs(half - whole) > 1e-3


# ------------------------------------------------------------------------------ runs


def _cfg(method: str, **kw):
    common = dict(arch="vit_micro", batch_size=4, epochs=1, warmup_epochs=0.25)
    if method == "ijepa":
        common.update(image_size=128, predictor_dim=32, predictor_heads=2, predictor_depth=2)
    else:
        common.update(prototypes=32, proj_hidden=32, proj_dim=16,
                      crops=dict(global_size=64, local_size=32, n_local=2))
    common.update(kw)
    return config_for(method, common)


@pytest.mark.parametrize("method", ["ijepa", "msn", "pmsn"])
def test_each_method_runs_resumes_exactly_and_exports(tmp_path, method):
    src = Textures(n=24, window_px=128)
    pretrain(_cfg(method), src, tmp_path / "a", max_steps=3)
    pretrain(_cfg(method), src, tmp_path / "b", max_steps=2)
    pretrain(_cfg(method), src, tmp_path / "b", max_steps=1, resume=True)
    wa, wb = weights(tmp_path / "a" / "checkpoint.pt"), weights(tmp_path / "b" / "checkpoint.pt")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert json.loads((tmp_path / "a" / "config.json").read_text())["method"] == method
    r = pretrain(_cfg(method), src, tmp_path / "a", resume=True)
    assert r.backbone_path is not None and not r.collapsed, r.monitors
    from ssl_backbone.checkpoints import load_backbone

    vit, _ = load_backbone(r.backbone_path)
    teacher = {k[len("teacher.backbone."):]: v for k, v in weights(tmp_path / "a" / "checkpoint.pt").items()
               if k.startswith("teacher.backbone.")}
    for k, v in vit.state_dict().items():
        if k in teacher:
            assert torch.equal(v, teacher[k]), k
    # another method in the same folder is another run
    other = "msn" if method == "ijepa" else "ijepa"
    with pytest.raises(CheckpointError, match="another architecture or settings"):
        pretrain(_cfg(other), src, tmp_path / "a", resume=True)


def test_prototypes_change_in_a_run(tmp_path):
    """The optimizer moves the prototypes (passing ``.data`` to the loss would freeze them)."""
    src = Textures(n=24, window_px=128)
    pretrain(_cfg("msn"), src, tmp_path / "r", max_steps=1)
    one = weights(tmp_path / "r" / "checkpoint.pt")["student.prototypes.weight"].clone()
    pretrain(_cfg("msn"), src, tmp_path / "r", max_steps=1, resume=True)
    two = weights(tmp_path / "r" / "checkpoint.pt")["student.prototypes.weight"]
    assert float((two - one).abs().max()) > 1e-6


@pytest.mark.parametrize("method", ["ijepa", "pmsn"])
def test_canopy_pretrain_methods_on_real_overhead_imagery(tmp_path, capsys, method):
    from tests.test_predict import run_cli

    shared("overhead_rgb")
    text = ("arch: vit_micro\nbatch_size: 4\nepochs: 1\n" +
            ("image_size: 128\npredictor_dim: 32\npredictor_heads: 2\npredictor_depth: 1\n"
             if method == "ijepa" else
             "prototypes: 32\nproj_hidden: 32\nproj_dim: 16\n"
             "crops: {global_size: 64, local_size: 32, n_local: 2}\n"))
    (tmp_path / "tiny.yaml").write_text(text)
    extra = ["--prior-power", "0.5"] if method == "pmsn" else []
    code, out, err = run_cli("pretrain", "--method", method, "--config", tmp_path / "tiny.yaml",
                             "--imagery", SHARED_DATA / "overhead_rgb", "--window", 128,
                             "-o", tmp_path / "run", "--max-steps", 2, "--device", "cpu",
                             "--precision", "fp32", *extra, capsys=capsys)
    assert code == 0, err
    assert "stopped at step 2/" in out
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["method"] == method
    if method == "pmsn":
        assert saved["config"]["prior"] == "power_law" and saved["config"]["prior_power"] == 0.5
    head = "jepa" if method == "ijepa" else "msn"
    assert f"{head} " in err  # the progress line names the method's loss terms


@pytest.mark.parametrize("method", ["ijepa", "msn"])
def test_init_continues_from_a_backbone_for_every_method(tmp_path, method):
    """--init is the same code path for every method: student and EMA encoder start as the
    loaded backbone (same features at step 0), and a run continues from it."""
    from ssl_backbone.checkpoints import save_safetensors
    from ssl_backbone.dinov2 import final_norm_tokens
    from ssl_backbone.methods import method_of
    from ssl_backbone.pretrain import build_backbone

    torch.manual_seed(3)
    src = build_vit("vit_micro")
    save_safetensors(src.state_dict(), tmp_path / "released.safetensors")
    cfg = _cfg(method, init=str(tmp_path / "released.safetensors"))
    model = method_of(cfg).build(cfg, build_backbone(cfg)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = final_norm_tokens(src.eval(), x)
        for which in (model.student, model.teacher):
            out = final_norm_tokens(which["backbone"], x)
            assert all(torch.equal(a, b) for a, b in zip(ref, out))
    r = pretrain(cfg, Textures(n=24, window_px=128), tmp_path / "run", max_steps=2)
    assert r.steps_done == 2


def _head_rank(rank: int, port: int, x, state, out: str) -> None:
    import torch.distributed as dist

    from ssl_backbone.msn import Projection

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        head = Projection(8, 16, 4)
        head.load_state_dict(state)
        b = x.shape[0] // 2
        y = head(x[rank * b:(rank + 1) * b])
        (y.square().mean()).backward()
        torch.save({"y": y.detach(), "grads": {k: p.grad for k, p in head.named_parameters()},
                    "buffers": head.state_dict()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_the_projection_heads_batchnorm_uses_the_global_batch_under_two_processes(tmp_path):
    """As the official's SyncBatchNorm: two gloo processes with half the batch each give the
    outputs, averaged gradients and running statistics of one process with the whole batch."""
    import torch.multiprocessing as mp

    from ssl_backbone.msn import Projection

    torch.manual_seed(0)
    head = Projection(8, 16, 4)
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g) * 3 + 2])
    state = {k: v.clone() for k, v in head.state_dict().items()}
    out = str(tmp_path / "head")
    mp.spawn(_head_rank, args=(_free_port(), x, state, out), nprocs=2)
    y = head(x)
    (y.square().mean()).backward()
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), atol=1e-5, rtol=1e-4)
    for name, p in head.named_parameters():
        torch.testing.assert_close((ranks[0]["grads"][name] + ranks[1]["grads"][name]) / 2, p.grad,
                                   atol=1e-5, rtol=1e-4)
    for name, v in head.state_dict().items():
        torch.testing.assert_close(ranks[0]["buffers"][name], v, atol=1e-5, rtol=1e-4)
    # per-process BatchNorm would not: the halves are unlike (second one shifted and wider)
    local = Projection(8, 16, 4)
    local.load_state_dict(state)
    assert not torch.allclose(local(x[:6]), y[:6].detach(), atol=1e-3)
