"""A distillation run: the ``Run`` holding everything the loop touches, and ``build``, which makes it from a config
(and restores it from a checkpoint). Selection happens here, before the loop: which teacher and students, which
optimisers, precision, compilation, sharding.

Precision policy, stated once (``Run.autocast``): trainable networks keep fp32 master weights; with
``train.precision=bf16`` every network forward runs under one bf16 autocast, while the coefficient rules, the losses
and the optimisers stay in fp32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from sid.checkpoint import Owned, load_training_state, resolve_resume, restore
from sid.conditions import build_conditions
from sid.config import LAMBDA_PRESETS, halflives
from sid.ema import EMA
from sid.errors import SidError
from sid.generator import OneStepGenerator, load_generator, num_params
from sid.lora import lora_student, shares
from sid.losses import DistillationLoss, EncoderLogits
from sid.real_images import build_real_images
from sid.runtime import micro_batches, precision_policy
from sid.sharding import check_launch as check_sharding
from sid.sharding import device_mesh, meta_copy, shard, shard_holders, split_optimizer_state
from sid.teachers import Teacher, build_teacher


@dataclass
class Run:
    """Everything the loop touches, built before it starts."""

    cfg: object                          # the resolved, read-only config
    accelerator: Accelerator
    teacher: Teacher
    conditions: object                   # the data-free conditions source (sid/conditions.py)
    loss: DistillationLoss
    fake_score: torch.nn.Module          # f_ψ (unwrapped)
    generator: OneStepGenerator          # G_θ (unwrapped)
    fake_ddp: torch.nn.Module            # the same modules as prepared by Accelerate (DDP on several processes)
    generator_ddp: torch.nn.Module
    opt_fake: torch.optim.Optimizer
    opt_g: torch.optim.Optimizer
    ema: EMA                             # the main EMA (ema.halflife_nimg's first value): generator/
    batch_gpu: int                       # per-process micro-batch
    rounds: int                          # micro-batches per update (gradient accumulation)
    shared: frozenset = frozenset()      # ids of the teacher's tensors (LoRA students share them, frozen)
    template: torch.nn.Module | None = None  # sharded runs: the generator's architecture (meta), to gather into
    nimg: int = 0
    step: int = 0                        # iterations done
    seconds: float = 0.0                 # wall-clock seconds of the sessions before this one (resumed runs)
    bf16: bool = False
    precision: str = ""                  # where the precision came from (the config, or Accelerate's launch)
    resumed: dict | None = None          # the restored state's logger and NaN-guard sums (resumed runs)
    real: object = None                  # loss.kind=sida: the real images' stream (sid/real_images.py), else None
    logits: EncoderLogits | None = None  # loss.kind=sida: the fake score's encoder logit, else None
    more_emas: tuple = ()                # EMAs of the further half-lives of a list ema.halflife_nimg

    @property
    def emas(self) -> list[EMA]:
        """Every EMA of the generator, the main one first."""
        return [self.ema, *self.more_emas]
    changed: list[str] | None = None     # optimiser settings the config changed on resume

    @property
    def sharded(self) -> bool:
        return self.template is not None

    def autocast(self):
        """The one mixed-precision policy: network forwards in bf16 under autocast, everything else fp32.

        Stated here rather than through Accelerate's ``mixed_precision``, which is fixed once per process and
        autocasts only the prepared modules; a launch with ``--mixed_precision bf16`` selects this same policy
        (``runtime.precision_policy``).
        """
        return torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=self.bf16)


# Builders --------------------------------------------------------------------------------------------------------

def use_compile(compile: bool | None, device: torch.device) -> bool:
    """``perf.compile``: null compiles on GPUs, where the speed repays the compile time, and not on CPUs."""
    return device.type == "cuda" if compile is None else compile


def set_tf32(enabled: bool) -> None:
    """TF32 (10-bit mantissa) for fp32 matmuls and convolutions on CUDA; process-wide."""
    mode = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


def apply_perf(perf, bf16: bool, teacher: Teacher, students: list[torch.nn.Module]) -> None:
    """The ``perf`` switches that change how networks are stored; before optimisers and EMA are built."""
    networks = (teacher.denoiser, *students)
    if perf.grad_checkpointing:
        for net in networks:
            teacher.checkpoint_activations(net)
    if perf.channels_last:
        for net in networks:
            net.to(memory_format=torch.channels_last)
    if bf16 and perf.teacher_bf16:
        teacher.store_frozen(torch.bfloat16)


def build(cfg, accelerator: Accelerator, resume: str | None, trust_code: bool = False) -> Run:
    """Teacher, students, loss, optimisers and EMA, restored from a checkpoint when resuming."""
    device = accelerator.device
    bf16, precision = precision_policy(cfg.train.precision, accelerator)
    if device.type == "cuda":
        set_tf32(cfg.perf.tf32)
    torch.manual_seed(cfg.train.seed)          # identical networks on every process (also a random-init teacher)
    teacher = build_teacher(cfg.teacher, trust_code=trust_code)
    if cfg.perf.offload_codec:                  # before the move: the VAE and text encoder stay on the CPU
        teacher.offload_codec(device)
    sharding = sharding_of(accelerator)
    if sharding is not None:
        check_sharding(accelerator.num_processes)
    teacher.to(device, denoiser=sharding is None)   # sharded: each process's shard reaches the device when split
    conditions = build_conditions(cfg, teacher, accelerator.process_index, accelerator.num_processes)
    real = build_real_images(cfg, teacher, accelerator.process_index, accelerator.num_processes, device)
    shared = frozenset(shares(teacher.denoiser))
    fake_score = student(teacher, cfg.lora, cfg.lora.fake_score)
    generator = OneStepGenerator(student(teacher, cfg.lora, cfg.lora.generator), teacher.shape,
                                 initial_sigma(cfg.generator, teacher), cfg.generator.steps, cfg.generator.renoise)
    path = resolve_resume(resume, cfg.train.run_dir) if resume else None
    if cfg.generator.init and path is None:                  # a resumed run has its own generator
        start_from(generator, cfg.generator.init, cfg.lora.generator, trust_code)
    apply_perf(cfg.perf, bf16, teacher, [fake_score, generator])
    batch_gpu, rounds = micro_batches(cfg, accelerator.num_processes)
    loss = DistillationLoss.from_config(cfg.loss, teacher, per_process=batch_gpu * rounds)

    def adam(module, lr, betas):
        return torch.optim.Adam(own_parameters(module, shared), lr=lr, betas=tuple(betas), eps=cfg.optim.eps,
                                fused=cfg.perf.fused_adam or None)

    emas = [EMA(generator, h, cfg.ema.rampup, shared, name=f"ema-{h:g}" if i else "ema")
            for i, h in enumerate(halflives(cfg.ema.halflife_nimg))]
    nimg = step = 0
    seconds, resumed, changed = 0.0, None, []
    if path is not None:                        # the networks whole, before any sharding splits them
        state = load_training_state(path)
        restore(path, state, fake_score=Owned(fake_score, shared), generator=Owned(generator, shared),
                **{e.name: Owned(e.model, shared) for e in emas})
    template = None
    if sharding is None:
        for e in emas:
            e.to(device)
    else:                                       # FSDP2: every network split over the processes, block by block
        template = meta_copy(generator)
        mesh = device_mesh(device, accelerator.num_processes)
        offload = device.type != "cpu" and type(sharding.cpu_offload).__name__ == "CPUOffloadPolicy"
        # LoRA students hold the teacher's own layers: each such layer is one unit, sharded once for all three
        by_layer = cfg.lora.fake_score or cfg.lora.generator
        (shard_holders if by_layer else shard)(teacher.denoiser, mesh, sharding.reshard_after_forward, offload)
        for net, adapters in ((fake_score, cfg.lora.fake_score), (generator, cfg.lora.generator),
                              *((e.model, cfg.lora.generator) for e in emas)):
            (shard_holders if adapters else shard)(net, mesh, sharding.reshard_after_forward)
        shared = frozenset(shares(teacher.denoiser))       # the sharded layers hold new (sharded) tensors
        for e in emas:
            e.shared = shared
    opt_fake = adam(fake_score, cfg.optim.fake_lr, cfg.optim.fake_betas)
    opt_g = adam(generator, cfg.optim.g_lr, cfg.optim.g_betas)
    if path is not None:
        restore(path, state, convert=split_optimizer_state if sharding else None, opt_fake=opt_fake, opt_g=opt_g)
        nimg, step, seconds = state["nimg"], state["step"], state.get("seconds", 0.0)
        conditions.load_state_dict(state.get("conditions"))
        if real is not None:
            real.load_state_dict(state.get("real_images"))
        resumed = {k: state[k] for k in ("metrics", "nonfinite") if k in state}
        # The config's optimiser settings hold, not the checkpoint's (a lower learning rate on resume takes effect).
        changed = (apply_hyperparameters(opt_fake, "optim.fake", cfg.optim.fake_lr, cfg.optim.fake_betas, cfg.optim.eps)
                   + apply_hyperparameters(opt_g, "optim.g", cfg.optim.g_lr, cfg.optim.g_betas, cfg.optim.eps))
        accelerator.print(f"resumed from {path} at {nimg} images")
    logits = encoder_logits(teacher, fake_score) if cfg.loss.kind == "sida" else None   # hooked before compiling
    if use_compile(cfg.perf.compile, device):   # in place: state_dict keys and the EMA copy stay uncompiled
        accelerator.print("torch.compile: the networks compile during the first iterations (perf.compile=false: eager)")
        for net in (teacher.denoiser, fake_score, generator):
            net.compile()
    if sharding is None:                        # DDP on several processes; sharded networks synchronise themselves
        fake_ddp, generator_ddp, opt_fake, opt_g = accelerator.prepare(fake_score, generator, opt_fake, opt_g)
    else:
        fake_ddp, generator_ddp = fake_score, generator
    return Run(cfg, accelerator, teacher, conditions, loss, fake_score, generator, fake_ddp, generator_ddp, opt_fake,
               opt_g, emas[0], batch_gpu, rounds, shared, template, nimg, step, seconds, bf16=bf16, precision=precision,
               resumed=resumed, changed=changed, real=real, logits=logits, more_emas=tuple(emas[1:]))


def start_from(generator: OneStepGenerator, path: str, lora: bool, trust_code: bool) -> None:
    """``generator.init``: the generator's weights from an exported generator of the same architecture (SiD²A
    starts from a SiD generator; its fake score, as SiDA's code has it, from the teacher)."""
    if lora:
        raise SidError("generator.init loads a full generator's weights; lora.generator=true trains adapters over "
                       "the teacher: set one of them back")
    source = load_generator(path, trust_code=trust_code).denoiser.state_dict()
    own = generator.denoiser.state_dict()
    if source.keys() != own.keys() or any(source[k].shape != own[k].shape for k in own):
        raise SidError(f"generator.init={path} is a generator of another architecture than this teacher's; give a "
                       "generator distilled from the same teacher")
    generator.denoiser.load_state_dict(source)


def encoder_logits(teacher: Teacher, fake_score: torch.nn.Module) -> EncoderLogits:
    """SiDA's logit on the fake score: the channel mean of its last encoder block's output."""
    block = teacher.encoder_end(fake_score)
    if block is None:
        raise SidError(f"loss.kind=sida reads its logit from the fake score's encoder, and this {teacher.spec['kind']} "
                       "teacher's network has none sid knows (EDM's UNets, diffusers UNets, analytic teachers' MLPs): "
                       "use loss.kind=sid or dmd")
    return EncoderLogits(block)


def sharding_of(accelerator: Accelerator):
    """Accelerate's FSDP plugin when the launch asks for sharding (``accelerate launch --use_fsdp``, or an
    accelerate config file's ``distributed_type: FSDP``), else None. Its settings are read (``fsdp_version`` 2,
    ``reshard_after_forward``, ``cpu_offload`` for the frozen teacher's shards); sid shards the networks itself
    (``sid.sharding``), since Accelerate's wrapper prepares one trained model with its optimiser, where SiD has a
    frozen teacher, two students and an EMA. On CPUs Accelerate launches gloo processes without sharding them:
    the launcher's ``ACCELERATE_USE_FSDP`` is read then."""
    launched = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if accelerator.distributed_type != DistributedType.FSDP and not launched:
        return None
    plugin = getattr(accelerator.state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise SidError(f"accelerate's FSDP version {plugin.fsdp_version}: sid shards with FSDP2; launch with "
                       "--fsdp_version 2 (or fsdp_version: 2 in the accelerate config file)")
    return plugin


def student(teacher: Teacher, lora, adapters: bool) -> torch.nn.Module:
    """A trainable denoiser that starts as the teacher: LoRA adapters over its weights (``lora.fake_score``,
    ``lora.generator``), or the family's own student (a copy)."""
    return lora_student(teacher, lora) if adapters else teacher.make_student()


def own_parameters(module: torch.nn.Module, shared: frozenset) -> list[torch.nn.Parameter]:
    """The parameters a student trains: all of a copy's; a LoRA student's adapters (not the teacher's weights)."""
    return [p for p in module.parameters() if id(p) not in shared]


def set_training(module: torch.nn.Module, on: bool, shared: frozenset) -> None:
    """Train mode and gradients of a student's own parameters on (its update) or off (frozen in the other's)."""
    module.train(on)
    for p in own_parameters(module, shared):
        p.requires_grad_(on)


def kind_of(generator: OneStepGenerator, random_steps: bool = False) -> str:
    """"one-step", or "4-step (fresh noise, 1..4 steps drawn each iteration)"."""
    if generator.steps == 1:
        return "one-step"
    drawn = f", 1..{generator.steps} steps drawn each iteration" if random_steps else ""
    return f"{generator.steps}-step ({generator.renoise} noise{drawn})"


def initial_sigma(section, teacher: Teacher) -> float:
    """The generator's σ_init: ``generator.sigma_init``, or the σ of the teacher's timestep ``generator.t_init``
    (SiD-LSG's 625: the VP image of σ_init = 2.5)."""
    if section.t_init is None:
        return float(section.sigma_init)
    sigmas = teacher.timestep_sigmas()
    if sigmas is None or section.t_init >= len(sigmas):
        what = "has continuous time" if sigmas is None else f"has timesteps 0..{len(sigmas) - 1}"
        raise SidError(f"generator.t_init={section.t_init}: this {teacher.spec['kind']} teacher {what}; set "
                       "generator.t_init=null and give generator.sigma_init")
    return float(sigmas[section.t_init])


def apply_hyperparameters(optimizer: torch.optim.Optimizer, name: str, lr: float, betas, eps: float) -> list[str]:
    """Set a restored optimiser's learning rate, betas and eps to the config's; returns what changed."""
    changed = []
    for group in optimizer.param_groups:
        for key, value in (("lr", float(lr)), ("betas", tuple(float(b) for b in betas)), ("eps", float(eps))):
            if group[key] != value:
                label = f"{name}_{key}" if key != "eps" else "optim.eps"
                changed.append(f"{label} {group[key]} -> {value}")
                group[key] = value
    return sorted(set(changed))


def describe(run: Run) -> str:
    """One line on what is about to run: teacher, loss, batch, machine, budget, folder."""
    cfg, acc, params = run.cfg, run.accelerator, num_params(run.teacher.denoiser)
    size = f"{params / 1e6:.2f}M parameters, " if params else ""
    named = f" ({cfg.loss.lam})" if str(cfg.loss.lam) in LAMBDA_PRESETS else ""
    processes = (f"{acc.num_processes} {acc.device.type} process{'es' if acc.num_processes > 1 else ''}"
                 f"{', sharded (FSDP2)' if run.sharded else ''}")
    budget = f"{cfg.train.total_nimg:,} images" + (f" or {cfg.train.max_seconds:g} s" if cfg.train.max_seconds else "")
    member = {"dmd": "DMD (outputs detached)", "sim": f"SIM (pseudo-Huber c = {cfg.loss.sim_c:g})"}.get(
        cfg.loss.kind, f"λ = {run.loss.lam:g}{named}")
    if cfg.loss.kind == "sida":
        member = (f"SiDA at {member} (GAN from {cfg.loss.gan_start_nimg:,} images, the generator from "
                  f"{cfg.loss.g_start_nimg:,}){run.real.describe()}")
    if cfg.optim.fake_updates > 1:
        member += f", {cfg.optim.fake_updates} fake-score updates per generator update"
    return (f"distilling the {cfg.teacher.kind} teacher ({size}samples {'×'.join(map(str, run.teacher.shape))}) "
            f"into a {kind_of(run.generator, cfg.generator.random_steps)} generator{run.conditions.describe()}: "
            f"{member}, weighting {cfg.loss.weighting}{native(run.loss)}, "
            f"{adapters(run)}batch {cfg.optim.batch} on {processes}, "
            f"{'bf16 autocast' if run.bf16 else 'fp32'} ({run.precision})"
            f"{', compiled' if use_compile(cfg.perf.compile, acc.device) else ''}; "
            f"{f'from {run.nimg:,} ' if run.nimg else ''}to {budget}, in {cfg.train.run_dir}"
            f"{'; from the config, not the checkpoint: ' + ', '.join(run.changed) if run.changed else ''}")


def adapters(run: Run) -> str:
    """The LoRA students, for ``describe``: which, their rank and trained parameters."""
    lora = [name for name, on in (("fake score", run.cfg.lora.fake_score), ("generator", run.cfg.lora.generator)) if on]
    if not lora:
        return ""
    trained = sum(p.numel() for p in own_parameters(run.generator if run.cfg.lora.generator else run.fake_score,
                                                          run.shared))
    return f"{' and '.join(lora)} as rank-{run.cfg.lora.rank} LoRA adapters ({trained:,} parameters each), "


def native(loss: DistillationLoss) -> str:
    """What of the loss differs from SiD's defaults, for ``describe``: time, fake loss, guidance."""
    parts = []
    if loss.time == "timesteps":
        parts.append(f"timesteps {loss.timesteps[0]}..{loss.timesteps[1]}")
    elif loss.time != "karras":
        parts.append(f"{loss.time} time")
    if loss.fake_weight is not None:
        parts.append("the teacher's own fake-score loss")
    scales = (loss.guide_fake_train, loss.guide_fake, loss.guide_teacher)
    if any(k != 1 for k in scales):
        parts.append("guidance κ1 {:g}, κ2 = κ3 {:g}, κ4 {:g}".format(*scales))
    return "".join(f", {p}" for p in parts)
