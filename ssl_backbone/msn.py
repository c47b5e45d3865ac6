"""MSN (Assran et al. 2022, arXiv:2204.07141) and PMSN (arXiv:2210.07277), written from the
papers and the spec (../shared/specs/ssl.md §4): anchor views with patches dropped (only kept
patches are encoded) are matched, through learnable prototypes, to the sharpened prototype
assignment of an unmasked target view seen by the EMA encoder; a regulariser keeps the mean
assignment over the batch close to a prior — uniform (MSN's mean-entropy maximisation) or a
power law (PMSN, for class-imbalanced data such as overhead imagery: mostly field, forest or
water).

Invariants (tested in tests/ssl_backbone/test_ijepa_msn.py):

* the prototypes are parameters of the student and receive gradients from the anchors (the
  targets use them too, without gradient) — a known bug elsewhere passes ``.data`` and freezes
  them (spec §5.2);
* the regulariser uses the mean anchor probability over the *global* batch (all-reduced, as
  the official code; lightly's is per rank);
* PMSN's regulariser is KL(p̄ ‖ π): with π uniform it is MSN's ``log K − H(p̄)`` exactly. The
  other direction, KL(π ‖ p̄) (lightly's ``PMSNLoss``), is not MSN's term at a uniform prior;
  we keep the direction that generalises MSN so that ``prior_power = 0`` *is* MSN. Prototype k
  gets prior mass ∝ k^(−power): the prototypes are unordered, so which ones are "frequent" is
  decided by the learning (the prior fixes the shape of the histogram, not its labels).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ssl_backbone.augment import CropConfig
from ssl_backbone.config import from_dict as config_from_dict
from ssl_backbone.config import to_dict as config_to_dict
from ssl_backbone.errors import ConfigError
from ssl_backbone.losses import all_sum, sinkhorn_knopp, world_size

FORMAT_VERSION = 1


def _msn_crops() -> CropConfig:
    # target and anchor: 224 px, scale 0.3–1; 10 focal 96-px anchors, scale 0.05–0.3; colour
    # jitter strength 0.5 (0.4/0.4/0.4/0.1); blur 0.5 everywhere; no solarisation (spec §4.1)
    return CropConfig(global_size=224, global_scale=(0.3, 1.0), n_local=10, local_size=96,
                      local_scale=(0.05, 0.3), brightness=0.4, contrast=0.4, saturation=0.4,
                      hue=0.1, blur_p=(0.5, 0.5, 0.5), solarize_p=0.0)


@dataclass
class MSNConfig:
    """Every setting of an MSN/PMSN run; defaults are the official ViT-S/16 ones (spec §4.1)."""

    arch: str = "vit_small"
    init: str = ""
    drop_path_rate: float = 0.0
    crops: CropConfig = field(default_factory=_msn_crops)
    patch_drop: float = 0.15
    prototypes: int = 1024
    proj_hidden: int = 2048
    proj_dim: int = 256
    temperature: float = 0.1
    sharpen: float = 0.25
    sinkhorn: bool = True
    memax_weight: float = 1.0
    prior: str = "uniform"  # MSN; "power_law" is PMSN
    prior_power: float = 0.25
    base_lr: float = 1e-3  # × sqrt(global batch / 1024) (official: 1e-3 at 1,024)
    start_lr: float = 2e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 15.0
    epochs: float = 800.0
    schedule_scale: float = 1.25  # official: schedules span 1.25× the run (EMA ends ≈ 0.9992)
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    momentum_teacher: float = 0.996
    momentum_teacher_end: float = 1.0
    freeze_backbone_blocks: int = 0
    batch_size: int = 64
    seed: int = 0
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        def bad(f, why):
            raise ConfigError(f"msn {f} {why}", field=f)

        if self.prior not in ("uniform", "power_law"):
            bad("prior", f"must be uniform or power_law, got {self.prior!r}")
        if not 0.0 <= self.patch_drop < 1.0:
            bad("patch_drop", f"must be within [0, 1), got {self.patch_drop}")
        if self.prior_power < 0:
            bad("prior_power", f"must be ≥ 0, got {self.prior_power}")
        if not 0 < self.sharpen <= 1:
            bad("sharpen", f"must be within (0, 1], got {self.sharpen}")
        if self.prototypes < 2:
            bad("prototypes", "must be ≥ 2")
        if self.epochs <= 0:
            bad("epochs", f"must be > 0, got {self.epochs}")

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MSNConfig":
        return config_from_dict(cls, d, what="msn config")


# ---------------------------------------------------------------------------------- losses


def power_law_prior(k: int, power: float) -> torch.Tensor:
    """π_k ∝ k^(−power), k = 1 … K, summing to 1 (power 0: uniform)."""
    w = torch.arange(1, k + 1, dtype=torch.float64) ** (-power)
    return (w / w.sum()).float()


def sharpen(p: torch.Tensor, t: float) -> torch.Tensor:
    """p^(1/T) / Σ p^(1/T), computed as softmax(log p / T): the official power underflows to
    0/0 = NaN for small T (a test found it at T = 0.01)."""
    return torch.softmax(torch.log(p.clamp_min(1e-30)) / t, dim=1)


def prior_regulariser(mean_probs: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
    """KL(p̄ ‖ π) = Σ p̄ log(p̄ / π); ``prior`` None = uniform, i.e. MSN's log K − H(p̄)."""
    p = mean_probs
    logp = torch.log(p.clamp_min(1e-30))
    if prior is None:
        return (p * logp).sum() + math.log(p.numel())
    return (p * (logp - torch.log(prior.to(p.device, p.dtype)))).sum()


def msn_loss(anchor_z: torch.Tensor, target_z: torch.Tensor, prototypes: torch.Tensor, *,
             temperature: float = 0.1, sharpen_t: float = 0.25, use_sinkhorn: bool = True,
             memax_weight: float = 1.0, prior: torch.Tensor | None = None
             ) -> dict[str, torch.Tensor]:
    """``anchor_z`` [V·B, d] (anchor view v of image b at row v·B + b), ``target_z`` [B, d],
    ``prototypes`` [K, d]. Cross-entropy of each anchor's soft-nearest-prototype assignment
    against its image's sharpened (and Sinkhorn-balanced) target assignment, averaged over
    anchors, plus ``memax_weight`` × KL(p̄ ‖ prior) over the global batch's mean anchor
    assignment (p̄ all-reduced)."""
    q = F.normalize(prototypes, dim=1)
    a = F.normalize(anchor_z, dim=1)
    probs = F.softmax(a @ q.t() / temperature, dim=1)
    with torch.no_grad():
        t = F.normalize(target_z, dim=1)
        target = sharpen(F.softmax(t @ q.detach().t() / temperature, dim=1), sharpen_t)
        if use_sinkhorn:
            # rows of probabilities: Sinkhorn on their logs (exp(log p) = p; the max shift cancels)
            target = sinkhorn_knopp(torch.log(target.clamp_min(1e-30)), 1.0)
        views = anchor_z.shape[0] // target_z.shape[0]
        target = target.repeat(views, 1)
    ce = torch.mean(torch.sum(-target * torch.log(probs.clamp_min(1e-30)), dim=1))
    if world_size() > 1:
        # differentiable all-reduce: its backward sums every rank's gradient of the shared p̄,
        # which the trainer's gradient averaging turns back into the one-process gradient
        # (c10d's all_reduce has no backward: the term would get 1/W of its gradient)
        from torch.distributed.nn.functional import all_reduce as all_reduce_with_grad

        n = all_sum(torch.tensor(float(probs.shape[0]), device=probs.device))
        mean_probs = all_reduce_with_grad(probs.sum(dim=0)) / n
    else:
        mean_probs = probs.mean(dim=0)
    reg = prior_regulariser(mean_probs, prior)
    return {"msn": ce, "memax": reg, "total": ce + memax_weight * reg,
            "teacher_probs": target[: target_z.shape[0]].detach()}


# ---------------------------------------------------------------------------------- model


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training-mode statistics are those of the *global* batch when several
    processes run: N processes of B samples normalise as one process of N·B, as the official
    MSN gets by converting to SyncBatchNorm. Written here because torch's SyncBatchNorm runs on
    CUDA only, and CPU runs under gloo (and the tests that hold DDP to one process) need it
    too. Mean and variance come from sums all-reduced with their gradient (two passes: the
    mean, then squared deviations from it), the running statistics as BatchNorm keeps them
    (unbiased variance of the global batch). In one process, or in eval mode, it is
    ``nn.BatchNorm1d`` itself; its state dict is BatchNorm1d's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() <= 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce as all_reduce_with_grad

        xf = x.float()
        n = all_sum(torch.tensor(float(x.shape[0]), device=x.device))
        mean = all_reduce_with_grad(xf.sum(dim=0)) / n
        var = all_reduce_with_grad(((xf - mean) ** 2).sum(dim=0)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean, alpha=m)
                self.running_var.mul_(1 - m).add_(var * n / (n - 1).clamp_min(1), alpha=m)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


class Projection(nn.Module):
    """MSN's projection head: Linear–BN–GELU, Linear–BN–GELU, Linear (hidden 2048 → 256); the
    BatchNorms over the global batch (:class:`GlobalBatchNorm1d`)."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), GlobalBatchNorm1d(hidden), nn.GELU(),
                                 nn.Linear(hidden, hidden), GlobalBatchNorm1d(hidden), nn.GELU(),
                                 nn.Linear(hidden, out))

    def forward(self, x):
        return self.mlp(x)


class MSN(nn.Module):
    """``student``: ``backbone``, ``head`` and ``prototypes``; ``teacher``: EMA ``backbone`` and
    ``head`` (the targets use the student's prototypes, without gradient, as the official)."""

    def __init__(self, cfg: MSNConfig, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg
        d = backbone.cfg.embed_dim
        head = Projection(d, cfg.proj_hidden, cfg.proj_dim)
        protos = nn.ParameterDict({"weight": nn.Parameter(
            torch.empty(cfg.prototypes, cfg.proj_dim).uniform_(-1 / math.sqrt(cfg.proj_dim),
                                                               1 / math.sqrt(cfg.proj_dim)))})
        self.student = nn.ModuleDict({"backbone": backbone, "head": head, "prototypes": protos})
        self.teacher = nn.ModuleDict({"backbone": copy.deepcopy(backbone), "head": copy.deepcopy(head)})
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        for i, blk in enumerate(backbone.blocks):
            if i < cfg.freeze_backbone_blocks:
                for p in blk.parameters():
                    p.requires_grad_(False)
        prior = None if cfg.prior == "uniform" else power_law_prior(cfg.prototypes, cfg.prior_power)
        self.register_buffer("prior", prior if prior is not None else torch.empty(0), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        if mode:  # as the official target encoder: its head's BatchNorm on the batch's statistics
            for m in self.teacher["head"].modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.train()
        return self

    @staticmethod
    def _cls(backbone, x, keep=None):
        tokens, grid = backbone.prepare_tokens(x, keep=keep)
        out, _ = backbone.run_blocks(tokens, grid=grid, keep=keep)
        return backbone.norm(out)[:, 0]

    def losses(self, target: torch.Tensor, anchor: torch.Tensor, focal: torch.Tensor | None,
               keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """``target`` [B, C, S, S], ``anchor`` [B, C, S, S] (encoded with only the patches in
        ``keep`` [B, K]), ``focal`` [n·B, C, s, s] (focal view j of every image, j by j)."""
        cfg = self.cfg
        with torch.no_grad():
            t_cls = self._cls(self.teacher["backbone"], target)
            t_z = self.teacher["head"](t_cls)
        cls = [self._cls(self.student["backbone"], anchor, keep)]
        if focal is not None and focal.shape[0]:
            cls.append(self._cls(self.student["backbone"], focal))
        z = self.student["head"](torch.cat(cls))  # one head call: BatchNorm over every anchor
        terms = msn_loss(z, t_z, self.student["prototypes"]["weight"],
                         temperature=cfg.temperature, sharpen_t=cfg.sharpen,
                         use_sinkhorn=cfg.sinkhorn, memax_weight=cfg.memax_weight,
                         prior=self.prior if self.prior.numel() else None)
        terms["teacher_embeddings"] = t_cls.detach()
        return terms

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        for name in ("backbone", "head"):
            t = list(self.teacher[name].parameters())
            s = [p.detach() for p in self.student[name].parameters()]
            torch._foreach_mul_(t, momentum)
            torch._foreach_add_(t, s, alpha=1 - momentum)
            for tb, sb in zip(self.teacher[name].buffers(), self.student[name].buffers()):
                tb.copy_(sb)  # BatchNorm statistics follow the student

    def clip_gradients(self, max_norm: float) -> dict[str, float]:
        norms = {}
        params = [p for name in ("backbone", "head") for p in self.student[name].parameters()
                  if p.grad is not None]
        if params:  # official: the encoder with its projection head, together; not the prototypes
            norms["backbone"] = float(torch.nn.utils.clip_grad_norm_(
                params, max_norm if max_norm > 0 else float("inf")))
        return norms


def patch_keep(batch: int, n: int, drop: float, gen: torch.Generator) -> torch.Tensor:
    """[B, n − ⌊n·drop⌋] kept patch indices, one random subset shared by the batch (official)."""
    k = n - int(n * drop)
    keep = torch.randperm(n, generator=gen)[:k].sort().values
    return keep[None].expand(batch, -1).contiguous()
