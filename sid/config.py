"""The configuration: the schema (``sid/schema.py``), YAML presets that only override, dotted CLI overrides,
validation.

``load_config(["fmnist"], ["loss.lam=1.0"])`` merges schema defaults < each YAML (a file, or a preset shipped
in ``configs/``, installed as ``sid.configs``) < the dotlist, validates every value, and returns a read-only config.
"""

from __future__ import annotations

import importlib.resources
import math
import os
from pathlib import Path
from typing import NamedTuple

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from sid.errors import SidError, described, first_line
from sid.schema import MAX_STEPS, RENOISE, TEACHER_KINDS, Config, LossConfig, TeacherTrainingConfig

# λ of the generator loss L_λ = w <f_φ - f_ψ, (f_φ - x_g) - λ (f_φ - f_ψ)> by name (docs/losses.md); λ is SiD's α.
LAMBDA_PRESETS = {
    "sid": 1.2,       # SiD's default: ½Q - 0.2P
    "lambda1": 1.0,   # the fake-score channel alone, ½Q (SiD-LSG, SiDA, FGM in practice)
    "fgm": 0.5,       # the exact gradient ½∇D; ½(|f_φ - x_g|² - |f_ψ - x_g|²)
    "l2": 0.0,        # SiD's L2 alone, ½Q + P
}


def resolve_lam(lam: str | float) -> float:
    """``loss.lam`` as it is written (a preset name or a number) -> λ."""
    if str(lam) in LAMBDA_PRESETS:
        return LAMBDA_PRESETS[str(lam)]
    try:
        return float(lam)
    except ValueError:
        raise SidError(f"loss.lam={lam!r} is neither a number nor a preset; presets: {LAMBDA_PRESETS}") from None


# Accelerate's trackers (``log_with``), by the names Accelerate gives them.
TRACKERS = ("tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab", "trackio")
CHOICES = {
    "teacher.kind": TEACHER_KINDS,
    "teacher.diffusers.prediction_type": (None, "epsilon", "v_prediction", "sample", "edm", "flow"),
    "loss.kind": ("sid", "dmd", "sida", "sim"),
    "loss.weighting": ("sid", "x0", "eps", "one_minus_t", "velocity"),
    "generator.renoise": RENOISE,
    "loss.time": ("karras", "timesteps", "logit_normal"),
    "loss.fake_loss": ("edm", "native"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.tracker": ("auto", "none", *TRACKERS),
}
# Every number of the distillation config and its valid range: (key, test, the range as the error line says it).
def _positive(v): return v > 0                                                       # noqa: E704
def _count(v): return isinstance(v, int) and v >= 1                                  # noqa: E704


RANGES = [
    ("optim.batch", _count, "a positive integer"),
    ("lora.rank", lambda v: 1 <= v <= 65536, "in [1, 65536]"),
    ("lora.alpha", lambda v: v is None or v > 0, "> 0, or null for the rank"),
    ("lora.targets", lambda v: len(v) > 0 and all(isinstance(t, str) and t for t in v), "a list of module names"),
    ("optim.g_lr", _positive, "> 0"), ("optim.fake_lr", _positive, "> 0"), ("optim.eps", _positive, "> 0"),
    ("generator.sigma_init", _positive, "> 0"),
    ("loss.rho", _positive, "> 0"), ("loss.p_std", _positive, "> 0"),
    ("loss.g_scale", _positive, "> 0"), ("loss.fake_scale", _positive, "> 0"),
    ("loss.t_max", lambda v: 0 < v <= 1, "in (0, 1] (a fraction of the Karras schedule)"),
    ("loss.timesteps", lambda v: len(v) == 2 and 0 <= v[0] <= v[1], "two timesteps lo <= hi, e.g. [20, 979]"),
    ("eval.resolution", lambda v: v is None or 8 <= v <= 4096, "in [8, 4096], or null for the generated size"),
    ("teacher.diffusers.resolution", lambda v: v is None or 8 <= v <= 8192,
     "in [8, 8192] pixels, or null for the network's own size"),
    ("teacher.diffusers.max_sequence_length", lambda v: v is None or 1 <= v <= 8192,
     "in [1, 8192] tokens, or null for the pipeline's own"),
    ("generator.steps", lambda v: 1 <= v <= MAX_STEPS, f"in [1, {MAX_STEPS}]"),
    ("optim.fake_updates", lambda v: 1 <= v <= 100, "in [1, 100] (fake-score updates per generator update)"),
    ("generator.t_init", lambda v: v is None or v >= 0, "a timestep >= 0, or null for generator.sigma_init"),
    ("loss.augment", lambda v: 0 <= v <= 1, "in [0, 1] (a probability per transform; 0: off)"),
    *((f"loss.{key}", lambda v: 0 <= v <= 100, "in [0, 100] (a guidance scale; 1: none)")
      for key in ("guide_fake_train", "guide_fake", "guide_teacher")),
    ("loss.drop_cond", lambda v: 0 <= v < 1, "in [0, 1) (a probability)"),
    ("loss.sim_c", _positive, "> 0"),
    ("loss.gan_scale", lambda v: v >= 0, ">= 0"), ("loss.d_scale", lambda v: v >= 0, ">= 0"),
    ("loss.gan_start_nimg", lambda v: v >= 0, ">= 0"), ("loss.g_start_nimg", lambda v: v >= 0, ">= 0"),
    ("optim.fake_clip", lambda v: v is None or v > 0, "> 0, or null for the member's own"),
    ("conditions.class_probs", lambda v: all(p >= 0 for p in v) and (not v or sum(v) > 0), "non-negative, not all 0"),
    ("loss.sigma_min", lambda v: v is None or v > 0, "> 0, or null for the teacher's"),
    ("loss.sigma_max", lambda v: v is None or v > 0, "> 0, or null for the teacher's"),
    ("ema.halflife_nimg", lambda v: valid_halflives(v), ">= 0 (0: no EMA), or a list of distinct such numbers"),
    ("ema.rampup", lambda v: v >= 0, ">= 0"),
    ("train.total_nimg", _count, "a positive integer"), ("train.log_every_nimg", _count, "a positive integer"),
    ("train.sample_every_nimg", _count, "a positive integer"), ("train.ckpt_every_nimg", _count, "a positive integer"),
    ("train.keep_ckpts", _count, "a positive integer"), ("train.num_samples", _count, "a positive integer"),
    ("train.max_nonfinite_steps", _count, "a positive integer"),
    ("train.max_seconds", lambda v: v >= 0, ">= 0 (0: off)"),
    ("train.seed", lambda v: 0 <= v < 2**63, "in [0, 2^63)"),
    ("eval.every_nimg", lambda v: v >= 0, ">= 0 (0: off)"), ("eval.num", lambda v: 2 <= v <= 10**7, "in [2, 10^7]"),
    ("teacher.analytic.modes", _count, "a positive integer"), ("teacher.analytic.mode_std", _positive, "> 0"),
    ("teacher.analytic.student_width", lambda v: 1 <= v <= 65536, "in [1, 65536]"),
    ("teacher.analytic.student_depth", lambda v: 1 <= v <= 64, "in [1, 64]"),
    ("teacher.analytic.student_fit_steps", lambda v: v >= 0, ">= 0"),
    ("teacher.analytic.shape", lambda v: len(v) >= 1 and all(1 <= s <= 4096 for s in v), "sizes in [1, 4096]"),
    ("teacher.python.shape", lambda v: all(1 <= s <= 4096 for s in v), "sizes in [1, 4096]"),
    ("teacher.analytic.weights", lambda v: all(w >= 0 for w in v) and (not v or sum(v) > 0), "non-negative, not all 0"),
    ("teacher.diffusers.sigma_data", _positive, "> 0"), ("teacher.edm_pickle.sigma_data", _positive, "> 0"),
    ("teacher.edm_pickle.dropout", lambda v: v is None or 0 <= v < 1, "in [0, 1), or null for the pickled rate"),
]


def halflives(value) -> list[float]:
    """``ema.halflife_nimg`` as a list: one number, or several (one EMA each, the first the main one)."""
    return [float(v) for v in value] if isinstance(value, (list, tuple, ListConfig)) else [float(value)]


def valid_halflives(value) -> bool:
    try:
        values = halflives(value)
    except (TypeError, ValueError):
        return False
    return bool(values) and all(v >= 0 for v in values) and len(set(values)) == len(values)


def check_lambda(cfg: DictConfig) -> None:
    if not math.isfinite(resolve_lam(cfg.loss.lam)):
        raise SidError(f"loss.lam={cfg.loss.lam} must be a finite number")
    if cfg.optim.fake_updates > 1 and cfg.loss.reuse_generator_batch:
        raise SidError(f"optim.fake_updates={cfg.optim.fake_updates} needs fresh samples for each fake-score update; "
                       "loss.reuse_generator_batch=true fits the generator step's one batch: set one of them back")


def check_member(cfg: DictConfig) -> None:
    """What a member of the family needs and what it cannot take: SiDA reads real images, no other member does."""
    kind, source = cfg.loss.kind, cfg.data.source
    if cfg.data.cache and not source:
        raise SidError("data.cache caches the images of data.source, and none is given: set data.source, or "
                       "data.cache=null")
    if kind != "sida" and source:
        raise SidError(f"data.source is read by loss.kind=sida only; loss.kind={kind} is data-free: set "
                       "data.source=null, or loss.kind=sida")
    if kind != "sida":
        return
    if not source:
        raise SidError("loss.kind=sida reads real images: set data.source (fashion-mnist:train, an .npz, or a folder "
                       "of images)")
    if cfg.loss.guide_fake_train != 1 or cfg.loss.guide_fake != 1:
        raise SidError("loss.kind=sida reads its logit from one forward of the fake score, and guidance on the fake "
                       "score runs two: leave loss.guide_fake_train and loss.guide_fake at 1")
    if cfg.loss.reuse_generator_batch:
        raise SidError("loss.kind=sida draws the fake step's samples beside its real images: set "
                       "loss.reuse_generator_batch=false")


def check_pairs(cfg: DictConfig) -> None:
    """Values that are valid only together: Adam's betas, the σ range, the micro-batch, the mixture's weights."""
    for name in ("g_betas", "fake_betas"):
        betas = list(cfg.optim[name])
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise SidError(f"optim.{name}={betas} must be two numbers in [0, 1)")
    lo, hi = cfg.loss.sigma_min, cfg.loss.sigma_max
    if lo is not None and hi is not None and not lo < hi:
        raise SidError(f"loss.sigma_min={lo} must be below loss.sigma_max={hi}")
    batch, batch_gpu = cfg.optim.batch, cfg.optim.batch_gpu
    if batch_gpu is not None and not (1 <= batch_gpu <= batch and batch % batch_gpu == 0):
        raise SidError(f"optim.batch_gpu={batch_gpu} must be a positive divisor of optim.batch={batch}, or null")
    weights = list(cfg.teacher.analytic.weights)
    if weights and len(weights) != cfg.teacher.analytic.modes:
        raise SidError(f"teacher.analytic.weights has {len(weights)} values for teacher.analytic.modes="
                       f"{cfg.teacher.analytic.modes}: give one per mode, or none")


def check_teacher(cfg: DictConfig) -> None:
    """What the chosen teacher kind needs from its section, and what it cannot take."""
    if cfg.eval.every_nimg and cfg.teacher.kind != "analytic" and not cfg.eval.fid_ref:
        raise SidError("eval.every_nimg needs eval.fid_ref (reference statistics from `sid fid ref`)")
    if cfg.teacher.kind == "diffusers" and not (cfg.teacher.diffusers.path or cfg.teacher.diffusers.unet_config):
        raise SidError("teacher.kind=diffusers needs teacher.diffusers.path (a local folder or hub id)")
    if cfg.teacher.kind == "edm_pickle" and not cfg.teacher.edm_pickle.path:
        raise SidError("teacher.kind=edm_pickle needs teacher.edm_pickle.path (an EDM .pkl file or URL)")
    if cfg.teacher.kind == "python" and not (cfg.teacher.python.factory and cfg.teacher.python.shape):
        raise SidError("teacher.kind=python needs teacher.python.factory (package.module:function) and "
                       "teacher.python.shape (one sample's shape, e.g. [3, 32, 32])")
    if (cfg.lora.fake_score or cfg.lora.generator) and cfg.teacher.kind == "analytic":
        raise SidError("lora.fake_score and lora.generator adapt a network teacher's weights; an analytic teacher's "
                       "students are MLPs fitted to it: leave them false")


# The teacher-training config's choices and ranges, in the same terms.
TEACHER_CHOICES = {"loss.objective": ("edm", "flow"), "train.precision": ("auto", "fp32", "bf16")}
TEACHER_RANGES = [
    *((key, _count, "a positive integer") for key in ("optim.batch", "train.total_nimg", "train.log_every_nimg",
                                                      "train.sample_every_nimg", "train.ckpt_every_nimg",
                                                      "train.keep_ckpts")),
    ("optim.lr", _positive, "> 0"), ("loss.sigma_data", _positive, "> 0"), ("loss.p_std", _positive, "> 0"),
    ("optim.warmup_nimg", lambda v: v >= 0, ">= 0"),
    ("ema.halflife_nimg", lambda v: isinstance(v, (int, float)) and v >= 0, "a number >= 0 (0: no EMA)"),
    ("ema.rampup", lambda v: v >= 0, ">= 0"), ("train.seed", lambda v: 0 <= v < 2**63, "in [0, 2^63)"),
]


class Rules(NamedTuple):
    """What a schema's values may be, beyond their types: each key's choices; each number's range (key, test, the
    range as the error line says it); checks of values valid only together."""

    choices: dict
    ranges: list
    checks: tuple = ()


UNBOUNDED = ("generator.sigma_init",)      # the numbers that may be +∞ (σ_init: pure noise, a flow teacher's t = 1)
RULES = {Config: Rules(CHOICES, RANGES, (check_lambda, check_member, check_pairs, check_teacher)),
         TeacherTrainingConfig: Rules(TEACHER_CHOICES, TEACHER_RANGES)}


def validate(cfg: DictConfig, schema_class=Config) -> None:
    """Reject, in one line naming the key, values the schema's types cannot: a value that is not among its key's
    choices, a number that is not finite or not in its range, values that are invalid together."""
    rules = RULES[schema_class]
    for key, allowed in rules.choices.items():
        if OmegaConf.select(cfg, key) not in allowed:
            raise SidError(f"{key}={OmegaConf.select(cfg, key)!r} is invalid; choose one of {allowed}")
    for key, value in _numbers(OmegaConf.to_container(cfg, resolve=True)):
        if isinstance(value, float) and not math.isfinite(value) and not (value == math.inf and key in UNBOUNDED):
            raise SidError(f"{key}={value} must be a finite number")
    for key, test, valid in rules.ranges:
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
        if not test(value):
            raise SidError(f"{key}={value!r} is out of range: it must be {valid}")
    for check in rules.checks:
        check(cfg)



def _leaves(node, prefix: str = ""):
    """(dotted key, value) for every value in a nested container that is not a container."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, (dict, list)):
            yield from _leaves(v, key)
        else:
            yield key, v


def _numbers(node):
    """(dotted key, number) for every number in a nested container."""
    return ((k, v) for k, v in _leaves(node) if isinstance(v, (int, float)) and not isinstance(v, bool))


def unresolvable(cfg: DictConfig) -> str:
    """The first key whose value cannot be resolved, for an error that names none."""
    for key, _ in _leaves(OmegaConf.to_container(cfg, resolve=False)):
        try:
            OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
        except OmegaConfBaseException:
            return key
    return "?"


def _valid_keys(node, prefix: str) -> str:
    keys = sorted(node.keys()) if isinstance(node, DictConfig) else []
    return f"valid keys under {prefix or 'the top level'}: {', '.join(keys)}"


def _friendly(e: OmegaConfBaseException, schema: DictConfig, source: str, moved: dict, removed: dict) -> SidError:
    key = getattr(e, "full_key", "") or ""
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    if isinstance(e, ConfigKeyError) and key in moved:
        return SidError(f"config key {key!r} in {source} is now {moved[key]!r}: write {moved[key]}=...")
    if isinstance(e, ConfigKeyError) and key in removed:
        return SidError(f"config key {key!r} in {source} is gone: {removed[key]}")
    if isinstance(e, ConfigKeyError):
        node = OmegaConf.select(schema, parent) if parent else schema
        return SidError(f"unknown config key {key!r} in {source}; {_valid_keys(node, parent)}")
    return SidError(f"bad value for config key {key!r} in {source}: {first_line(e, 1000)}")


# Keys that are gone, each with what to do instead (one line when a file or the command line names one).
REMOVED = {Config: {
    "train.tensorboard": "the tracker is now chosen by train.tracker: auto (TensorBoard when installed), none, "
                         "or one of " + ", ".join(TRACKERS),
    "teacher.edm_pickle.trust": "permission to run a file's code comes from the command line, never from a file: "
                                "pass --trust-code (trust_code=True in Python)"}}
# Keys of the teacher config before it shared the distillation config's sections: each names its new place.
MOVED = {TeacherTrainingConfig: {
    "source": "data.source", "xflip": "data.xflip", "objective": "loss.objective", "sigma_data": "loss.sigma_data",
    "p_mean": "loss.p_mean", "p_std": "loss.p_std", "batch": "optim.batch", "lr": "optim.lr",
    "warmup_nimg": "optim.warmup_nimg", "ema_halflife_nimg": "ema.halflife_nimg", "ema_rampup": "ema.rampup",
    **{key: f"train.{key}" for key in ("total_nimg", "seed", "precision", "run_dir", "log_every_nimg",
                                       "sample_every_nimg", "ckpt_every_nimg", "keep_ckpts", "export_fp16",
                                       "progress")}}}
def presets_folder() -> Path:
    """The shipped presets: the package ``sid.configs`` when installed (from a wheel; an editable install maps it
    to the clone's ``configs/``), else the ``configs/`` beside ``sid/`` in a clone used without installing."""
    try:
        return Path(str(importlib.resources.files("sid.configs")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "configs"


PRESETS = presets_folder()


def preset_names() -> list[str]:
    """The shipped presets, by the names ``--config`` takes: ``fmnist``, ``teacher/fmnist``, ..."""
    return sorted(p.relative_to(PRESETS).with_suffix("").as_posix() for p in PRESETS.rglob("*.yaml"))


def find_config(name) -> Path:
    """A YAML file's path, or a shipped preset's name (``fmnist`` is ``configs/fmnist.yaml``)."""
    path = Path(name)
    if _is_file(path):
        return path
    preset = PRESETS / (str(path) if path.suffix == ".yaml" else f"{path}.yaml")
    if not path.is_absolute() and ".." not in path.parts and _is_file(preset):     # a name, not a path
        return preset
    shown = str(name) if len(str(name)) <= 200 else str(name)[:200] + "..."
    raise SidError(f"config {shown}: no such file, and no shipped preset of that name ({', '.join(preset_names())})")


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:                      # a name too long for the file system, say
        return False


MAX_YAML_BYTES, MAX_YAML_VALUES = 1 << 20, 100_000


def read_yaml(path: Path) -> DictConfig:
    """A config file as a mapping; anything else (a YAML error, tabs, duplicate keys, tags, a binary file, aliases
    that expand beyond reason, a list at the top) is one line naming the file."""
    import io

    import yaml

    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise ValueError(f"it is larger than {MAX_YAML_BYTES >> 20} MB; a config is a few lines")
        text = path.read_bytes().decode("utf-8")
        if _expanded_size(yaml.compose(text, Loader=yaml.SafeLoader)) > MAX_YAML_VALUES:
            raise ValueError(f"its aliases expand to more than {MAX_YAML_VALUES:,} values")
        node = OmegaConf.load(io.StringIO(text))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        reason = described(e)
        if isinstance(e, yaml.MarkedYAMLError) and e.problem:       # what is wrong, and where
            mark = e.problem_mark
            reason = f"{type(e).__name__}: {e.problem}" + (f", line {mark.line + 1} column {mark.column + 1}"
                                                           if mark else "")
        raise SidError(f"config {path} is not a readable YAML file ({reason})") from None
    if not isinstance(node, DictConfig):
        raise SidError(f"config {path} holds a {type(node).__name__.replace('Config', '').lower() or 'value'}, not "
                       "a mapping of settings (key: value)")
    return node


def _expanded_size(node, limit: int = MAX_YAML_VALUES) -> int:
    """How many nodes a YAML node graph holds with every alias expanded, counting no further than ``limit``."""
    count, stack = 0, [node]
    while stack and count <= limit:
        current = stack.pop()
        count += 1
        if current is None:
            continue
        value = current.value
        if isinstance(value, list):
            stack.extend(v for pair in value for v in (pair if isinstance(pair, tuple) else (pair,)))
    return count


WITHOUT_LAMBDA = {"dmd": "its generator gradient, ω (f_ψ − f_φ) through x_g alone, is the same for every λ",
                  "sim": "its divergence is the pseudo-Huber one of loss.sim_c, not SiD's λ-family"}


def set_aside_lambda(cfg: DictConfig, command_line: DictConfig) -> None:
    """λ has no meaning for ``loss.kind=dmd`` or ``sim`` (``WITHOUT_LAMBDA`` says why): a λ asked for on the command
    line is refused in one line; a preset's is set back to the default."""
    kind = cfg.loss.kind
    if kind not in WITHOUT_LAMBDA or str(cfg.loss.lam) == LossConfig.lam:
        return
    if OmegaConf.select(command_line, "loss.lam") is not None:
        raise SidError(f"loss.lam={cfg.loss.lam} has no meaning for loss.kind={kind}: {WITHOUT_LAMBDA[kind]}; "
                       "leave loss.lam unset")
    cfg.loss.lam = LossConfig.lam


def load_config(files=(), overrides=(), schema_class=None) -> DictConfig:
    """Schema defaults, then each YAML file or preset (``find_config``), then (no GPU visible) the ``on_cpu``
    settings, then ``key=value`` overrides; validated and read-only.

    ``schema_class`` defaults to the distillation ``Config``; ``TeacherTrainingConfig`` is the other schema.
    """
    schema_class = schema_class or Config
    schema = OmegaConf.structured(schema_class)
    moved, removed = MOVED.get(schema_class, {}), REMOVED.get(schema_class, {})
    cfg = schema
    for path in map(find_config, files):
        try:
            cfg = OmegaConf.merge(cfg, read_yaml(path))
        except OmegaConfBaseException as e:
            raise _friendly(e, schema, str(path), moved, removed) from None
    try:
        command_line = OmegaConf.merge(*(dotted(item) for item in overrides)) if overrides else OmegaConf.create()
        cfg = OmegaConf.merge(cfg, command_line)
    except OmegaConfBaseException as e:
        raise _friendly(e, schema, "the command line", moved, removed) from None
    if cfg.on_cpu:
        try:
            on_cpu = OmegaConf.merge(cfg, cfg.on_cpu, command_line)      # checked on every machine
        except OmegaConfBaseException as e:
            raise _friendly(e, schema, "on_cpu", moved, removed) from None
        if not gpu_visible():
            cfg = on_cpu
    try:                                 # every ${...} now, not at the first save an interval later
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or unresolvable(cfg)
        raise SidError(f"config key {key!r} cannot be resolved ({first_line(e)}): give it a value") \
            from None
    for key in PATH_KEYS:                # ~ is the home folder, as in a shell (not a folder named ~)
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str) and value.startswith("~"):
            OmegaConf.update(cfg, key, os.path.expanduser(value))
        long = [part for part in Path(str(value or "")).parts if len(os.fsencode(part)) > NAME_MAX]
        if long:
            raise SidError(f"{key}: its part {long[0][:40]}... is {len(os.fsencode(long[0]))} bytes long, and file "
                           f"systems take at most {NAME_MAX} per name: give a shorter path")
    if schema_class is Config:
        set_aside_lambda(cfg, command_line)
    validate(cfg, schema_class)
    OmegaConf.set_readonly(cfg, True)  # after merging: read-only nodes do not merge (omegaconf#1102)
    return cfg


# The keys that name files or folders (of either schema), and the longest name of one part of a path (Linux's,
# macOS's and Windows' file systems alike).
NAME_MAX = 255
PATH_KEYS = ("train.run_dir", "teacher.diffusers.path", "teacher.edm_pickle.path", "conditions.prompts",
             "conditions.cache", "eval.fid_ref", "eval.prompts", "eval.clip", "eval.fid_weights", "data.source",
             "data.cache")


def dotted(item: str) -> DictConfig:
    """One ``key=value`` override as a config (the value read as YAML), or one line saying what is wrong with it."""
    import yaml

    try:
        return OmegaConf.from_dotlist([item])
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or first_line(e)
        raise SidError(f"the override {item!r} has a value that is not YAML ({problem}): balance its brackets, or "
                       "quote it (key='...')") from None


def gpu_visible() -> bool:
    import torch  # late: --dry-run and config errors stay fast

    return torch.cuda.is_available()


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg)


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def plain(node):
    """A config node as plain Python (dicts, lists, scalars); anything else unchanged."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def as_tuple(node) -> tuple:
    return tuple(node) if isinstance(node, (ListConfig, list, tuple)) else (node,)
