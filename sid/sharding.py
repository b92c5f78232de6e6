"""Sharded data parallel (FSDP2, ``torch.distributed.fsdp.fully_shard``) for teachers too big for one GPU.

Each network is split over the processes: the frozen teacher (no gradients), the fake score and the generator
(with their gradients and Adam moments) and the generator's EMA, block by block (the children of a diffusers
model's block lists, then the whole), so that a forward gathers one block at a time. Gradients still reach the
generator through the frozen teacher and fake score, whose parameters take none. The precision policy stays sid's
own (bf16 autocast, fp32 masters): no FSDP mixed-precision policy is set, so the masters are gathered in fp32.

With LoRA students, which hold the teacher's own layers, each layer that holds parameters is its own unit instead
(``shard_holders``): sharded once, gathered by whichever network calls it; the adapters are sharded as units of
their own, their gradients reduce-scattered and their Adam moments split like any student's.

The files stay what they are without sharding: a training state holds every network's full tensors and Adam's
moments by parameter index (gathered for the main process to write; read by every process and split again), so
a run resumes on any number of processes, sharded or not, and the export is a plain generator.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from sid.ema import holders
from sid.errors import SidError


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def blocks(module: nn.Module) -> list[nn.Module]:
    """The units a network is sharded by: the children of its block lists (``nn.ModuleList``: a UNet's down and up
    blocks, a transformer's layers), outermost lists only."""
    units, inside = [], set()
    for name, child in module.named_modules():
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(child, nn.ModuleList) and len(child):
            units += [block for block in child if any(True for _ in block.parameters())]
            inside.add(name + ".")
    return units


def device_mesh(device: torch.device, processes: int):
    """The one-dimensional mesh of all processes the networks are split over."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (processes,))


def shard(module: nn.Module, mesh, reshard: bool = True, offload: bool = False) -> nn.Module:
    """``fully_shard`` the module's blocks, then the module itself, over ``mesh`` (in place). ``offload``: its shards
    wait in CPU memory (a frozen teacher's, FSDP's CPU offload)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    policy = CPUOffloadPolicy() if offload else OffloadPolicy()
    for block in blocks(module):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, offload_policy=policy)
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard, offload_policy=policy)
    return module


def shard_holders(module: nn.Module, mesh, reshard: bool = True, offload: bool = False) -> nn.Module:
    """``fully_shard`` each module that holds parameters itself and is not sharded yet, each its own unit (in
    place). For networks that share layers (LoRA students: the teacher's frozen layers, wrapped by their adapters):
    a shared layer is one unit, sharded once and gathered by whichever network calls it; a unit nests in no other,
    so no network's root claims the layers the others share."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

    policy = CPUOffloadPolicy() if offload else OffloadPolicy()
    for holder in holders(module):
        if not isinstance(holder, FSDPModule):
            fully_shard(holder, mesh=mesh, reshard_after_forward=reshard, offload_policy=policy)
    return module


def meta_copy(module: nn.Module) -> nn.Module:
    """The module's architecture on the meta device (no memory): what a gathered state is loaded into."""
    memo = {id(t): (nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=t.requires_grad)
                    if isinstance(t, nn.Parameter) else torch.empty_like(t, device="meta"))
            for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo=memo)


def full(t, keep: bool):
    """A tensor whole: a sharded one gathered from every process (a collective: every process calls it in the same
    order), on the CPU where ``keep``, else dropped (None); others as they are."""
    if isinstance(t, torch.Tensor):
        t = t.full_tensor() if is_sharded(t) else t.detach()
        return t.cpu() if keep else None
    return t if keep else None


def full_state(state: dict, keep: bool) -> dict:
    """``full`` of every tensor of a module's state dict (nested dicts and lists of an optimiser's too), in a fixed
    order on every process; the whole state where ``keep``, else an empty dict."""
    def walk(obj):
        if isinstance(obj, dict):
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(walk(v) for v in obj)
        return full(obj, keep)

    out = walk(state)
    return out if keep else {}


def loaded(template: nn.Module, state: dict) -> nn.Module:
    """A plain module of ``template``'s architecture (a ``meta_copy``) holding a gathered ``state``."""
    plain = copy.deepcopy(template)
    plain.load_state_dict(state, assign=True)
    return plain


def split_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A full optimiser state (by parameter index) for an optimiser over sharded parameters: each per-parameter
    tensor of a parameter's shape cut as the parameter is (its mesh and placements)."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param = {}
    for index, entry in state["state"].items():
        p = params[index]
        per_param[index] = {k: distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements)
                            if isinstance(v, torch.Tensor) and is_sharded(p) and v.shape == p.shape else v
                            for k, v in entry.items()}
    return {**state, "state": per_param}


def check_launch(processes: int) -> None:
    """Sharding needs two processes or more."""
    if processes < 2:
        raise SidError("a sharded launch (accelerate's FSDP) runs one process here: sharding splits the networks "
                       "over 2 or more processes; launch with --num_processes 2 or more, or without --use_fsdp")
