"""The one-step generator G_θ(z, labels) = D_θ(σ_init z; σ_init, labels) (SiD, Zhou et al. 2024: σ_init = 2.5), and its
export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sid.errors import SidError

WEIGHTS, CONFIG = "generator.safetensors", "generator.json"


class OneStepGenerator(nn.Module):
    """Owns σ_init, the sample shape and the label convention: callers pass only z (and one-hot labels)."""

    def __init__(self, denoiser: nn.Module, shape, sigma_init: float = 2.5):
        super().__init__()
        self.denoiser, self.shape, self.sigma_init = denoiser, tuple(shape), float(sigma_init)

    @property
    def label_dim(self) -> int:
        return self.denoiser.label_dim

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = torch.full((z.shape[0],), self.sigma_init, device=z.device)
        return self.denoiser(self.sigma_init * z, sigma, labels)

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

    @torch.no_grad()
    def sample_seeds(self, seeds, classes=None, device=None, batch: int = 256) -> torch.Tensor:
        """One sample per seed (see ``inputs_for_seeds``), generated in batches."""
        z, labels = self.inputs_for_seeds(list(seeds), classes, device)
        chunks = []
        for i in range(0, len(z), batch):
            chunks.append(self(z[i:i + batch], None if labels is None else labels[i:i + batch]))
        return torch.cat(chunks)


def export_generator(generator: OneStepGenerator, spec: dict, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write ``generator.safetensors`` (weights, config in its metadata) and ``generator.json`` (the same config)."""
    out_dir = Path(out_dir)
    config = {"format": "sid-generator/1", "denoiser": spec, "shape": list(generator.shape),
              "sigma_init": generator.sigma_init, "label_dim": generator.label_dim, **(extra or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in generator.denoiser.state_dict().items()}
    tmp_weights, tmp_config = out_dir / (WEIGHTS + ".tmp"), out_dir / (CONFIG + ".tmp")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(state, tmp_weights, metadata={"sid_config": json.dumps(config)})
        tmp_config.write_text(json.dumps(config, indent=2))
        tmp_weights.replace(out_dir / WEIGHTS)
        tmp_config.replace(out_dir / CONFIG)
    except OSError as e:                    # a full disk: the export already there stays
        tmp_weights.unlink(missing_ok=True)
        tmp_config.unlink(missing_ok=True)
        raise SidError(f"could not export the generator to {out_dir} ({e.strerror or e}); free space and resume") \
            from None
    return out_dir


def load_generator(path: str | Path, device=None, trust_code: bool = False) -> OneStepGenerator:
    """An exported generator from its folder, its ``.safetensors`` file (the config travels in the metadata), or
    the run folder that exported it.

    ``trust_code``: a generator distilled from a ``teacher.kind=python`` teacher names the Python function that
    builds its architecture; it loads only when trusted, since loading runs that function.
    """
    from sid.teachers import denoiser_from_spec

    path = Path(path)
    weights = path / WEIGHTS if path.is_dir() else path
    if path.is_dir() and not weights.is_file() and (path / "generator" / WEIGHTS).is_file():
        weights = path / "generator" / WEIGHTS                               # a run folder: its export
    if not weights.is_file():
        raise SidError(f"no exported generator at {path}: expected a run folder, a folder with {WEIGHTS}, "
                       "or the file itself")
    try:
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            config = json.loads((f.metadata() or {})["sid_config"])
        state = load_file(weights)
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as e:
        raise SidError(f"{weights} is not a readable exported generator ({type(e).__name__}); export it again") \
            from None
    generator = OneStepGenerator(denoiser_from_spec(config["denoiser"], trust_code), config["shape"],
                                 config["sigma_init"])
    try:
        generator.denoiser.load_state_dict(state)
    except RuntimeError as e:
        raise SidError(f"the weights in {weights} do not fit the architecture its config names "
                       f"({str(e).splitlines()[0][:160]}); export it again") from None
    return generator.to(device).eval().requires_grad_(False)


def num_params(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())
