"""The memory plan of a distillation run (``sid train --dry-run``): the bytes each process holds, before anything
is allocated, and which settings to change when they exceed the accelerator's memory.

The states follow from the parameter counts and the settings. The frozen teacher is stored in bf16 under bf16
precision with ``perf.teacher_bf16`` (else fp32), its VAE and text encoders likewise unless ``perf.offload_codec``
keeps them on the CPU. Each student holds fp32 weights and Adam's two fp32 moments, the generator also its EMA; a
LoRA student holds its adapters only, over the teacher's own weights. Gradients exist for one student at a time
(each update frees them). Sharding over N processes (FSDP) divides the teacher's and the students' states by N.

The activations are measured: one generator step (the larger of the two steps: it keeps the generator's, the
teacher's and the fake score's activations for its backward pass, guided halves included) runs on the meta device
(sizes without memory or arithmetic) at micro-batches of 1 and 2, every network in the compute dtype, while a
dispatch mode adds up the bytes of the tensors it makes; the plan extrapolates to ``optim.batch_gpu``. A latent
pipeline's networks are built there from their configs alone (a hub id's configs and tokenizers are fetched, not
its weights); other teachers, small, are built as training builds them and moved there. Under bf16 autocast the
generator's trained weights also have bf16 copies (autocast keeps them for the backward pass). Allocator slack and
fragmentation are not counted: leave ~10% free.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

from sid.config import halflives
from sid.generator import OneStepGenerator
from sid.lora import lora_student, shares
from sid.losses import DistillationLoss
from sid.precond import Preconditioned
from sid.runtime import micro_batches
from sid.teachers import build_architecture

GIB = 1024**3
MEASURED: dict[str, tuple[float, float]] = {}   # the activations' memo: the settings they depend on -> their bytes
ADAM_MOMENTS = 2                                    # fp32 exp_avg and exp_avg_sq per trained parameter


@dataclass
class Plan:
    """Bytes per process, by what holds them, for ``processes`` processes (sharded or not)."""

    rows: list[tuple[str, float]]
    processes: int = 1
    sharded: bool = False
    batch_gpu: int = 1
    activation: tuple[float, float] = (0.0, 0.0)    # (bytes per sample, bytes per step) of the activations
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(b for _, b in self.rows)

    def table(self) -> str:
        how = f"{self.processes} process{'es' if self.processes > 1 else ''}" + (", sharded" if self.sharded else "")
        width = max(len(what) for what, _ in self.rows)
        lines = [f"memory plan, per process ({how}; micro-batch {self.batch_gpu}):"]
        lines += [f"  {what:<{width}}  {gib(b):>9}" for what, b in self.rows]
        lines.append(f"  {'total':<{width}}  {gib(self.total):>9}")
        return "\n".join(lines + [f"  {note}" for note in self.notes])


def gib(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if b >= GIB else f"{b / 2**20:.1f} MiB"


def count(module: torch.nn.Module, exclude: frozenset = frozenset()) -> int:
    return sum(p.numel() for p in module.parameters() if id(p) not in exclude)


def plan(cfg, processes: int = 1, sharded: bool = False, on_gpu: bool = True, trust_code: bool = False) -> Plan:
    """The memory plan of ``cfg`` on ``processes`` processes (``sharded``: FSDP), for a GPU run (``on_gpu``: what
    ``train.precision=auto`` and the settings mean there)."""
    batch_gpu, _ = micro_batches(cfg, processes)
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and on_gpu)
    frozen = 2 if bf16 and cfg.perf.teacher_bf16 else 4
    stored = "bf16" if frozen == 2 else "fp32"
    teacher = build_architecture(cfg.teacher, trust_code=trust_code)
    network = count(teacher.denoiser)
    shared = frozenset(shares(teacher.denoiser))
    students = {name: lora_student(teacher, cfg.lora) if getattr(cfg.lora, name) else teacher.make_student()
                for name in ("fake_score", "generator")}
    trained = {name: count(net, shared) for name, net in students.items()}
    codec = sum(count(part) for part in (teacher.components() or {}).values() if isinstance(part, torch.nn.Module))
    split = processes if sharded else 1
    kind = {name: "adapters" if getattr(cfg.lora, name) else "weights" for name in students}
    rows = [(f"teacher, frozen ({stored})", network * frozen / split)]
    if codec and not cfg.perf.offload_codec:
        rows.append((f"VAE and text encoders, frozen ({stored})", codec * frozen))
    for name, label in (("fake_score", "fake score"), ("generator", "generator")):
        rows.append((f"{label}: {kind[name]} (fp32)", trained[name] * 4 / split))
        rows.append((f"{label}: Adam moments", ADAM_MOMENTS * trained[name] * 4 / split))
    emas = len(halflives(cfg.ema.halflife_nimg))
    rows.append((f"generator: EMA {kind['generator']}" + (f" × {emas}" if emas > 1 else ""),
                 emas * trained["generator"] * 4 / split))
    rows.append(("gradients (one student at a time)", max(trained.values()) * 4 / split))
    key = json.dumps([OmegaConf.to_container(cfg[k], resolve=True) for k in ("teacher", "loss", "lora")]
                     + [cfg.perf.grad_checkpointing, bf16, trust_code], sort_keys=True, default=str)
    if key not in MEASURED:                          # a replan that changes none of them measures nothing again
        MEASURED[key] = activations(cfg, teacher, students, bf16)
    per_sample, per_step = MEASURED[key]
    rows.append(("activations, one generator step", per_step + per_sample * batch_gpu))
    if bf16:
        rows.append(("generator: bf16 copies of its trained weights (autocast)", trained["generator"] * 2))
    notes = [f"parameters: teacher {network:,}, VAE and text encoders {codec:,}, trained "
             f"{trained['fake_score']:,} (fake score) and {trained['generator']:,} (generator)",
             f"activations measured at micro-batches 1 and 2: {gib(per_sample)} per sample + {gib(per_step)}"]
    if codec and cfg.perf.offload_codec:
        notes.append(f"VAE and text encoders ({gib(codec * frozen)}) wait in CPU memory (perf.offload_codec)")
    return Plan(rows, processes, sharded, batch_gpu, (per_sample, per_step), notes)


class PeakBytes(TorchDispatchMode):
    """The peak of the bytes held by the tensors created while it is active (meta tensors too): each storage
    counted from its creation until it is freed, at its size (storages resized in place, as FSDP frees and refills
    its gathered parameters, counted at their new size); views and in-place results (their op's schema says they
    alias an input) are not new memory; a sharded tensor (DTensor) is its piece on this process."""

    def __init__(self, devices: tuple[str, ...] | None = None):
        """``devices``: count only tensors on these device types (None: all, the meta device's too)."""
        super().__init__()
        self.live = self.peak = 0
        self.held = {}                                 # id(storage) -> the bytes counted for it
        self.devices = devices

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out                                 # a view or an in-place result: no new memory
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, DTensor):                 # a sharded tensor holds its piece on this process
                t = t.to_local()
            if isinstance(t, torch.Tensor):
                self.count(t.untyped_storage())
        return out

    def count(self, storage) -> None:
        """A storage at its present size, from now until it is freed (once; later sizes by ``resized``)."""
        if id(storage) in self.held or (self.devices is not None and storage.device.type not in self.devices):
            return
        self.held[id(storage)] = 0
        weakref.finalize(storage, self.release, id(storage))
        self.resized(storage)

    def resized(self, storage) -> None:
        if id(storage) in self.held:
            size = storage.nbytes()
            self.live += size - self.held[id(storage)]
            self.held[id(storage)] = size
            self.peak = max(self.peak, self.live)

    def release(self, key: int) -> None:
        self.live -= self.held.pop(key, 0)

    def __enter__(self):
        resize = self._resize = torch.UntypedStorage.resize_

        def resized(storage, size):                    # FSDP frees and refills storages in place
            out = resize(storage, size)
            self.count(storage)
            self.resized(storage)
            return out

        torch.UntypedStorage.resize_ = resized
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)


class FusedAttention(torch.autograd.Function):
    """Attention as a fused kernel (flash or memory-efficient, as GPUs and CPUs run it) holds it, on the meta
    device, where ``scaled_dot_product_attention`` would materialise the attention matrix: the output and its
    log-sum-exp saved for backward, the inputs' gradients made there."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, *_ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def fused_attention():
    """``torch.nn.functional.scaled_dot_product_attention`` as ``FusedAttention`` for the duration."""
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def attention(query, key, value, *args, **kwargs):      # called by position, or by name (diffusers' dispatch)
        return FusedAttention.apply(query, key, value)

    functional.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


def activations(cfg, teacher, students: dict, bf16: bool) -> tuple[float, float]:
    """(bytes per sample, bytes per step) of one generator step's activations and temporaries on the meta device:
    the peak of what it allocates at micro-batches of 1 and 2 (each parameter gradient dropped as it is made: the
    states' rows count gradients), every network in the compute dtype (bf16 under bf16 autocast)."""
    fake, generator = students["fake_score"], OneStepGenerator(students["generator"], teacher.shape, 2.5)
    networks = (teacher.denoiser, fake, generator)
    if cfg.perf.grad_checkpointing:
        for net in networks:
            teacher.checkpoint_activations(net)
    if bf16:                                           # autocast computes in bf16; the meta device has no autocast
        for net in (teacher.denoiser, fake, generator.denoiser):
            (net.net if isinstance(net, Preconditioned) else net).to(torch.bfloat16)
    fake.eval().requires_grad_(False)
    generator.train()
    trained = [p for p in generator.parameters() if p.requires_grad]
    hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in trained]
    peaks = []
    for n in (1, 2):
        loss = DistillationLoss.from_config(cfg.loss, teacher, per_process=n)
        cond = example_condition(teacher, n)
        with fused_attention(), PeakBytes() as tracker:
            x_g = generator(torch.randn(n, *teacher.shape, device="meta"), cond)
            loss.generator(teacher.denoiser, fake, x_g, cond).sum().backward()
        peaks.append(tracker.peak)
    for hook in hooks:
        hook.remove()
    per_sample = max(peaks[1] - peaks[0], 0)
    return float(per_sample), float(max(peaks[0] - per_sample, 0))


def example_condition(teacher, n: int):
    """A condition of the teacher's kind for ``n`` samples (meta tensors): encoded empty prompts, class 0, none."""
    if teacher.text_to_image:
        return teacher.encode([""] * n)
    if teacher.label_dim:
        return torch.zeros(n, teacher.label_dim, device="meta")
    return None


def advice(cfg, current: Plan, memory: float, processes: int, replan) -> list[str]:
    """What to change when ``current`` exceeds ``memory`` bytes: each setting that saves memory, in the order they
    cost least (activation checkpointing, smaller micro-batches, the codec on the CPU, LoRA students, sharding over
    more processes), applied one after another until the plan fits; ``replan(overrides, processes, sharded)``
    gives the plan with those settings."""
    if current.total <= memory:
        return [f"fits in {gib(memory)} with {gib(memory - current.total)} to spare"]
    lines = [f"exceeds {gib(memory)} by {gib(current.total - memory)}; in turn:"]
    overrides, shards, sharded = [], processes, current.sharded
    steps = []
    if not cfg.perf.grad_checkpointing:
        steps.append(["perf.grad_checkpointing=true"])
    if current.batch_gpu > 1:
        steps.append(["optim.batch_gpu=1"])
    if not cfg.perf.offload_codec:
        steps.append(["perf.offload_codec=true"])
    if not (cfg.lora.fake_score and cfg.lora.generator):
        steps.append(["lora.fake_score=true", "lora.generator=true"])
    steps.append(None)                                              # sharding over 8 processes (one node)
    for step in steps:
        if step is None:                               # the most processes of one node (8) the batch divides into
            shards, sharded = max((k for k in range(2, 9) if cfg.optim.batch % k == 0), default=0), True
            if shards <= processes:
                break
            what = f"accelerate launch --use_fsdp --num_processes {shards} (sharded over {shards} GPUs)"
        else:
            overrides += step
            what = " ".join(step)
        result = replan(list(overrides), shards, sharded)
        lines.append(f"  {what}: {gib(result.total)}{'  <- fits' if result.total <= memory else ''}")
        if result.total <= memory:
            return lines
    lines.append("  still too much: shard over more processes (--num_processes), or use a GPU with more memory")
    return lines
