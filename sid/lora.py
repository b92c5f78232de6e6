"""Students as LoRA adapters over the frozen teacher's weights (``lora.fake_score``, ``lora.generator``; peft).

A LoRA student is the teacher's network with low-rank adapters, W x + (α / r) B A x, on the modules ``lora.targets``
names. Its base weights *are* the teacher's: the same layers holding the same tensors, frozen, never copied, so the
teacher, a LoRA fake score and a LoRA generator cost one network plus adapters instead of three networks (and a
sharded run shards each such layer once for all three). B starts at zero (peft's
default), so a student starts as the teacher, as a full copy does. The export merges the adapters into a full
network (``merged``), which loads like any generator; ``save_adapter`` also writes the adapter alone, in peft's
format, for the teacher's network.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from sid.checkpoint import write_error
from sid.ema import sharing_memo
from sid.errors import SidError


def shares(module: nn.Module) -> set[int]:
    """The ids of a module's parameters and buffers (what a LoRA student built on it shares)."""
    return {id(t) for t in (*module.parameters(), *module.buffers())}


def lora_config(section):
    """peft's ``LoraConfig`` of the ``lora`` section: rank, scale α / r (α = r unless given), target modules."""
    from peft import LoraConfig

    return LoraConfig(r=section.rank, lora_alpha=section.alpha or section.rank, target_modules=list(section.targets))


def lora_student(teacher, section) -> nn.Module:
    """A trainable student of ``teacher`` whose base weights are the teacher's own tensors (frozen) and whose
    adapters, on the modules ``section.targets`` names inside ``teacher.lora_target``, are its only parameters."""
    try:
        from peft import inject_adapter_in_model
    except ImportError:
        raise SidError("lora.fake_score and lora.generator need peft: pip install 'sid-distill[lora]' (or peft)") \
            from None

    student = copy.deepcopy(teacher.denoiser, memo=sharing_memo(teacher.denoiser, shares(teacher.denoiser)))
    target = teacher.lora_target(student)
    try:
        inject_adapter_in_model(lora_config(section), target)
    except ValueError:                                          # peft: the targets matched no module
        names = sorted({name.rsplit(".", 1)[-1] for name, m in target.named_modules()
                        if isinstance(m, (nn.Linear, nn.Conv2d))})
        raise SidError(f"lora.targets={list(section.targets)} match no module of the teacher's network; its linear "
                       f"and convolution layers are named {', '.join(names[:12])}{', ...' if len(names) > 12 else ''}: "
                       "name some of those") from None
    return student.train()


def is_lora(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


@torch.no_grad()
def merged(model: nn.Module) -> nn.Module:
    """A float32 copy of a LoRA student on the CPU (made tensor by tensor: no second copy on the accelerator) with
    every adapter merged into its base weight (W + (α / r) B A) and the adapter layers gone: the plain architecture
    of a full student, which exports and loads as one."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    memo = {id(p): nn.Parameter(p.detach().to("cpu", torch.float32, copy=True), requires_grad=False)
            for p in model.parameters()}
    memo.update({id(b): b.detach().to("cpu", copy=True) for b in model.buffers()})
    model = copy.deepcopy(model, memo=memo)
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    return model


def save_adapter(model: nn.Module, teacher, section, folder: Path) -> None:
    """The adapter of a LoRA generator alone in peft's format (``adapter_config.json``, ``adapter_model.safetensors``,
    keys relative to the teacher's network: ``inject_adapter_in_model`` + ``set_peft_model_state_dict`` on the
    teacher's network, or diffusers' ``load_lora_adapter``, rebuild the generator's network)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(teacher.lora_target(model))
    config = lora_config(section)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().contiguous().cpu() for k, v in state.items()},
                  folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps(config.to_dict(), indent=2, default=list))
    except OSError as e:
        raise SidError(f"could not write the adapter to {folder} ({write_error(e)}); free space and resume") from None
