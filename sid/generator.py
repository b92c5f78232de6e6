"""The one-step generator G_θ(z, labels) = D_θ(σ_init z; σ_init, labels) (SiD, Zhou et al. 2024: σ_init = 2.5; σ_init =
∞ is pure noise, a flow teacher's t = 1 as SiD-DiT's generator), and its export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sid.checkpoint import fsync, tensors_checksum, write_error
from sid.errors import SidError, described, first_line
from sid.guidance import part
from sid.precond import check_pure_noise
from sid.schema import MAX_STEPS, RENOISE
from sid.steps import generate
from sid.teachers import (
    ability,
    backbone_values,
    denoiser_from_spec,
    export_native,
    load_native,
    note_native,
    spec_kind,
)

WEIGHTS, CONFIG = "generator.safetensors", "generator.json"


class OneStepGenerator(nn.Module):
    """Owns σ_init, its steps (K, and how it re-noises between them: ``sid.steps``), the sample shape and the
    label convention: callers pass only z (and one-hot labels). K = 1 is SiD's one-step generator."""

    def __init__(self, denoiser: nn.Module, shape, sigma_init: float = 2.5, steps: int = 1, renoise: str = "fresh"):
        super().__init__()
        self.denoiser, self.shape, self.sigma_init = denoiser, tuple(shape), float(sigma_init)
        self.steps, self.renoise = int(steps), renoise
        if math.isinf(self.sigma_init):                        # pure noise: one line now where it has no meaning
            check_pure_noise(denoiser)

    @property
    def label_dim(self) -> int:
        return self.denoiser.label_dim

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None, steps: int | None = None,
                first: int | None = None, noise: list | None = None) -> torch.Tensor:
        """G(z): its K steps, or ``steps`` on their own schedule; ``first``: only the first that many of them (SiD-DiT
        trains on a step count drawn each iteration); ``noise``: the fresh noise of the later steps."""
        return generate(self.denoiser, z, self.sigma_init, steps or self.steps, self.renoise, labels, first, noise)

    def random_inputs(self, n: int, device=None, generator: torch.Generator | None = None):
        """z ~ N(0, I) and, for class-conditional generators, uniformly drawn one-hot labels."""
        z = torch.randn(n, *self.shape, device=device, generator=generator)
        if not self.label_dim:
            return z, None
        classes = torch.randint(self.label_dim, (n,), device=device, generator=generator)
        return z, nn.functional.one_hot(classes, self.label_dim).float()

    def inputs_for_seeds(self, seeds, classes=None, device=None):
        """z (and one-hot labels) for one image per seed, as EDM's generate.py: each seed's draws come from its
        own CPU generator, so an image depends only on its seed. ``classes``: one class index per seed, or None
        for labels drawn from the seed."""
        zs, labels = [], []
        for i, seed in enumerate(seeds):
            z, label = self.random_inputs(1, generator=torch.Generator().manual_seed(int(seed)))
            if label is not None and classes is not None:
                label = nn.functional.one_hot(torch.tensor([int(classes[i])]), self.label_dim).float()
            zs.append(z)
            labels.append(label)
        labels = torch.cat(labels).to(device) if self.label_dim else None
        return torch.cat(zs).to(device), labels

    def fresh_noise_for_seeds(self, seeds, count: int, device=None) -> list[torch.Tensor]:
        """The fresh noise of ``count`` later steps for each seed, drawn from its own generator after its z and
        label, so that a few-step image too depends only on its seed."""
        draws = []
        for seed in seeds:
            g = torch.Generator().manual_seed(int(seed))
            self.random_inputs(1, generator=g)
            draws.append(torch.randn(count, 1, *self.shape, generator=g))
        return list(torch.cat(draws, dim=1).to(device)) if draws else []

    @torch.no_grad()
    def sample_seeds(self, seeds, classes=None, device=None, batch: int = 256, cond=None,
                     steps: int | None = None) -> torch.Tensor:
        """One sample per seed (see ``inputs_for_seeds``), generated in batches; ``cond``: one condition per seed
        (e.g. encoded prompts) in place of the seeds' labels; ``steps``: other than the generator's K."""
        seeds, steps = list(seeds), steps or self.steps
        z, labels = self.inputs_for_seeds(seeds, classes, device)
        labels = labels if cond is None else cond
        fresh = steps > 1 and self.renoise == "fresh"
        noise = self.fresh_noise_for_seeds(seeds, steps - 1, device) if fresh else None
        return torch.cat([self(z[i:i + batch], part(labels, slice(i, i + batch)), steps,
                               noise=None if noise is None else [n[i:i + batch] for n in noise])
                          for i in range(0, len(z), batch)])


def export_generator(generator: OneStepGenerator, spec: dict, out_dir: str | Path, extra: dict | None = None,
                     components: dict | None = None) -> Path:
    """Write ``generator.safetensors`` (weights, config and a checksum of the weights in its metadata) and
    ``generator.json`` (the same config), each beside its final name and flushed to disk before it is renamed;
    for a diffusers teacher also the diffusers pipeline folder (``unet/``, ``scheduler/``, ``model_index.json``)
    with a model card (``README.md``), and a latent teacher's frozen ``components`` (VAE, text encoder,
    tokenizer: ``Teacher.components()``)."""
    out_dir = Path(out_dir)
    config = {"format": "sid-generator/1", "denoiser": spec, "shape": list(generator.shape),
              "sigma_init": generator.sigma_init, "steps": generator.steps, "renoise": generator.renoise,
              "label_dim": generator.label_dim, **(extra or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in generator.denoiser.state_dict().items()}
    tmp_weights, tmp_config = out_dir / (WEIGHTS + ".tmp"), out_dir / (CONFIG + ".tmp")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(state, tmp_weights, metadata={"sid_config": json.dumps(config),
                                                "sid_tensors_sha256": tensors_checksum(state)})
        tmp_config.write_text(json.dumps(config, indent=2))
        for path in (tmp_weights, tmp_config):
            fsync(path)
        tmp_weights.replace(out_dir / WEIGHTS)
        tmp_config.replace(out_dir / CONFIG)
        export_native(generator.denoiser, spec, generator.sigma_init, out_dir, config, components)
        fsync(out_dir)
    except (OSError, SafetensorError) as e:  # a full disk: the export already there stays
        tmp_weights.unlink(missing_ok=True)
        tmp_config.unlink(missing_ok=True)
        raise SidError(f"could not export the generator to {out_dir} ({write_error(e)}); free space and resume") \
            from None
    return out_dir


def note_measured(folder, nimg: int, measured: dict) -> None:
    """Add what was measured at image ``nimg`` to what the export in ``folder`` says of itself in its family's own
    form (its model card), where the export is of that image count (its weights and config stay as written)."""
    try:
        config = json.loads((Path(folder) / CONFIG).read_text())
    except (OSError, ValueError):
        return
    if config.get("nimg") == nimg:
        note_native(folder, {**config, **measured})


def check_repo_id(repo_id: str) -> None:
    """A Hugging Face Hub repository id (``name`` or ``owner/name``), or one line saying what one looks like."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise SidError(f"--push-to-hub {repo_id!r} is not a Hub repository id: give owner/name (letters, digits, "
                       "'-', '_', '.')") from None


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None,
                trust_code: bool = False) -> str:
    """Upload an exported generator folder (sid's files, its diffusers form and model card) to a Hugging Face Hub
    model repository, made if it does not exist; returns the repository's URL. Needs the network and a login.
    ``trust_code``: as in ``load_generator``, which checks the export first (a pickle or factory teacher's)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    check_repo_id(repo_id)
    load_generator(folder, trust_code=trust_code)            # only a readable export goes out
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message=f"sid export of {folder.resolve().parent.name}")
    except (OSError, ValueError, HfHubHTTPError) as e:        # offline, no login, no permission
        raise SidError(f"could not push {folder} to the Hub as {repo_id} ({described(e)}); the export stays where it "
                       "is: check the network and `huggingface-cli login`, then push it again") from None
    return str(url)


def load_generator(path: str | Path, device=None, trust_code: bool = False) -> OneStepGenerator:
    """An exported generator from its folder, its ``.safetensors`` file (the config travels in the metadata), the
    run folder that exported it, or its diffusers form alone (``model_index.json``, ``unet/``, ``scheduler/``).

    ``trust_code``: a generator distilled from a ``teacher.kind=python`` teacher names the Python function that
    builds its architecture; it loads only when trusted, since loading runs that function.
    """
    path = Path(path)
    weights = path / WEIGHTS if path.is_dir() else path
    if path.is_dir() and not weights.is_file() and (path / "generator" / WEIGHTS).is_file():
        weights = path / "generator" / WEIGHTS                               # a run folder: its export
    native = load_native(path) if path.is_dir() and not weights.is_file() else None    # its family's form alone
    if native is not None:
        return OneStepGenerator(*native).to(device).eval().requires_grad_(False)
    if not weights.is_file():
        raise SidError(f"no exported generator at {path}: expected a run folder, a folder with {WEIGHTS} (or "
                       "a diffusers-form export), or the file itself")
    try:
        with safe_open(str(weights), "pt") as f:
            metadata = f.metadata() or {}
        config = check_config(json.loads(metadata["sid_config"]))
        state = load_file(weights)
        if "sid_tensors_sha256" in metadata and tensors_checksum(state) != metadata["sid_tensors_sha256"]:
            raise ValueError("its weights do not match their checksum: the file was changed or damaged")
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError, ValueError, TypeError) as e:
        reason = f"{type(e).__name__}: no sid_config in its metadata" if isinstance(e, KeyError) else described(e)
        raise SidError(f"{weights} is not a readable exported generator ({reason}); "
                       "export it again") from None
    check_size(config["denoiser"], state, weights)
    denoiser = denoiser_from_spec(config["denoiser"], trust_code)            # a function or pickle: if trusted
    check_shape(config, weights)
    generator = OneStepGenerator(denoiser, config["shape"], config["sigma_init"], config.get("steps", 1),
                                 config.get("renoise", "fresh"))
    try:
        generator.denoiser.load_state_dict(state)
    except RuntimeError as e:
        raise SidError(f"the weights in {weights} do not fit the architecture its config names "
                       f"({first_line(e)}); export it again") from None
    return generator.to(device).eval().requires_grad_(False)


def check_config(config) -> dict:
    """An export's config as a generator needs it: a spec, a shape of positive sizes, a positive σ_init."""
    if not isinstance(config, dict) or not isinstance(config.get("denoiser"), dict):
        raise ValueError("its config names no denoiser")
    shape, sigma_init = config.get("shape"), config.get("sigma_init")
    if (not isinstance(shape, list) or not shape
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 < s <= 2**20 for s in shape)):
        raise ValueError(f"shape={shape!r} is not a sample shape")
    if not isinstance(sigma_init, (int, float)) or isinstance(sigma_init, bool) or not 0 < sigma_init <= math.inf:
        raise ValueError(f"sigma_init={sigma_init!r} is not a noise level")
    steps = config.get("steps", 1)
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps={steps!r} is not a step count in [1, {MAX_STEPS}]")
    if config.get("renoise", "fresh") not in RENOISE:
        raise ValueError(f"renoise={config.get('renoise')!r} is not one of {RENOISE}")
    return config


def check_shape(config: dict, weights: Path) -> None:
    """The sample shape an export records is one its network takes: each size its spec fixes (``spec_shape`` of
    the teacher kind; None where any size does) is the recorded one."""
    taken = ability(spec_kind(config["denoiser"]), "spec_shape")(config["denoiser"])
    shape = config["shape"]
    if taken is not None and (len(taken) != len(shape) or any(t not in (None, s) for t, s in zip(taken, shape))):
        fixed = "×".join("any" if t is None else str(t) for t in taken)
        raise SidError(f"{weights}: its config records samples of shape {'×'.join(map(str, shape))}, its network "
                       f"takes {fixed}; export it again")


def check_size(spec: dict, state: dict, weights: Path) -> None:
    """Before anything is allocated: the architecture a spec describes (built on the meta device, where it costs
    nothing) holds as many values as the weights file does; a file cannot ask for a network larger than itself."""
    try:
        values = backbone_values(spec)
    except SidError:
        raise
    except Exception as e:                                             # a spec diffusers or the MLP cannot build
        raise SidError(f"{weights}: its config names an architecture that cannot be built ({described(e)}); "
                       "export it again") from None
    if values is None:                                                 # sizes come from a trusted pickle or function
        return
    held = sum(t.numel() for k, t in state.items() if k.startswith("net."))   # the backbone's (the rule's aside)
    if values != held:
        raise SidError(f"{weights}: its config names a network of {values:,} values, its weights hold {held:,}; "
                       "export it again")


def num_params(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())
