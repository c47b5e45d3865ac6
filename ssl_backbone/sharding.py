"""Fully sharded data parallel pretraining (FSDP, PyTorch's per-parameter ``fully_shard``):
each of N processes keeps 1/N of every parameter, gradient and optimizer moment, gathering a
block's weights only while the block runs. For backbones whose student, teacher and AdamW
state do not fit one device; the step computed is the one data-parallel (DDP) pretraining
computes, in the same checkpoint format.

Units: every transformer block (``…blocks.N``: backbones of student, teacher and Gram teacher,
the I-JEPA predictor) is its own unit, and the method's module is the root unit holding the rest
(embeddings, heads, prototypes). The trainer calls the method's ``losses``, not ``forward``, so
that method is registered as a forward method of the root: its weights are gathered when it
starts and the gradients reduce-scattered (averaged over processes) after backward. A
distillation teacher is outside the module tree and stays whole on every process.

A resumed sharded run reads its checkpoint on the first process only (N copies of a model too
big for one device may not fit one host either): the others get everything but the weights and
moments, which FSDP then sends out shard by shard.

Invariant: a sharded run's checkpoint is the file an unsharded run writes: the full state dict
(the same names) and the optimizer state keyed by parameter index, group by group. Why it holds:
the state is gathered whole through ``torch.distributed.checkpoint.state_dict`` and its
name-keyed optimizer state is renumbered in the optimizer's own parameter order (what
``Optimizer.state_dict`` does); loading runs the same mapping backwards and hands each process
its shard. So a run may be resumed with or without sharding, and the trainer's export reads
either.
"""

from __future__ import annotations

import re

import torch
from torch import nn

_BLOCK = re.compile(r"(^|.*\.)blocks\.\d+$")


def shard_model(model: nn.Module, device: str) -> nn.Module:
    """Shard ``model`` (a method's module, on ``device``) in place over the default process
    group. The mesh is made for ``device``'s type: left to itself FSDP picks the machine's
    accelerator, which moves a CPU run onto the GPU."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    for name, module in list(model.named_modules()):
        if _BLOCK.match(name):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "losses")
    return model


def local_elements(model: nn.Module) -> int:
    """Parameter elements this process holds (its shards under FSDP, everything otherwise)."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel()
               for p in model.parameters())


def read_on_first(path, info) -> dict:
    """A pretraining checkpoint read by the first process; every other process gets its small
    entries (step, configs, RNG streams) and empty ``model``/``optimizer`` entries. A file the
    first process cannot read raises the same error everywhere (the others would wait forever)."""
    import torch.distributed as dist

    from ssl_backbone.errors import CheckpointError
    from ssl_backbone.runtime import (
        PRETRAIN_CHECKPOINT_FORMAT, PRETRAIN_CHECKPOINT_VERSION, load_checkpoint)

    state, header = None, [None]
    if info.is_main:
        try:
            state = load_checkpoint(path, format=PRETRAIN_CHECKPOINT_FORMAT,
                                    version=PRETRAIN_CHECKPOINT_VERSION)
            header[0] = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
        except CheckpointError as exc:
            header[0] = {"error": str(exc)}
    dist.broadcast_object_list(header, src=0)
    if "error" in header[0]:
        raise CheckpointError(header[0]["error"])
    return state if info.is_main else {**header[0], "model": {}, "optimizer": {}}


def _names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names in the optimizer's order (the order its state_dict numbers them)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]


class ShardedModelState:
    """``state_dict``/``load_state_dict`` of a sharded model as its full state dict (every
    process takes part; the full dict lands on, and is loaded from, the first process: the
    others give and get an empty one)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))

    def load_state_dict(self, sd: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, sd, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True))


class ShardedOptimizerState:
    """The optimizer's state of a sharded model in ``Optimizer.state_dict``'s own format
    (parameters numbered in order), gathered whole; see the module docstring."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_optimizer_state_dict)

        osd = get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        if not osd:  # not the first process
            return {}
        index = {n: i for i, n in enumerate(_names(self.model, self.optimizer))}
        groups = [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]
        return {"state": {index[n]: s for n, s in osd["state"].items()}, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_optimizer_state_dict)

        names = _names(self.model, self.optimizer)
        osd = {"state": {names[int(i)]: s for i, s in sd["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]}
                                for g in sd["param_groups"]]} if sd else {}
        # not strict: a parameter a method never uses (I-JEPA's and MSN's mask token) has no
        # moments, in the file as in the optimizer
        set_optimizer_state_dict(self.model, self.optimizer, osd, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True, strict=False))


__all__ = ["ShardedModelState", "ShardedOptimizerState", "local_elements", "read_on_first",
           "shard_model"]
