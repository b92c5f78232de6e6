"""Real images, for the members of the family that read them (SiDA's adversarial term); every other run is
data-free and never opens one.

``open_image_set`` reads a source lazily (one image at a time), with class labels where the source has them;
``RealImages`` is its shuffled stream, resized and cropped to the teacher's image size, whose position is training
state (a resumed run continues where it stopped, on any number of processes), as the prompts' is.

Sources (``data.source``):

* ``fashion-mnist[:train|:test]``: Debian's idx files, padded to 32x32, with their ten labels;
* an ``.npz``: uint8 images under ``images`` (NHWC or NCHW) and, optionally, integer ``labels``;
* a folder of PNG/JPEG images: labels from EDM's ``dataset.json`` (``{"labels": [[file, class], ...]}``) where it
  has one, else from sub-folders (each sub-folder, in sorted order, one class), else none;
* WebDataset shards, ``.tar`` (a file or a glob such as ``images-*.tar``): each sample's image member, labelled
  where every sample has a ``.cls`` member.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sid.checkpoint import read_cache, write_cache
from sid.data import FASHION_FILES, FASHION_MNIST_DIR, IMAGE_SUFFIXES, Shuffled, fashion_mnist
from sid.errors import SidError, described

FASHION_LABELS = {"train": "train-labels-idx1-ubyte.gz", "test": "t10k-labels-idx1-ubyte.gz"}


@dataclass
class ImageSet:
    """``size`` images read by index: ``read(i)`` is a uint8 array [H, W, C] or a PIL image, ``labels`` their
    classes (or None), ``name(i)`` what an error line calls the i-th."""

    size: int
    read: Callable[[int], object]
    labels: torch.Tensor | None
    name: Callable[[int], str]
    source: str


def read_idx_labels(path: Path) -> np.ndarray:
    """An MNIST-format idx1 label file (optionally gzipped) -> uint8 [N]."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    if int.from_bytes(data[:4], "big") != 0x0801:
        raise SidError(f"{path} is not an idx1 label file")
    return np.frombuffer(data, dtype=np.uint8, offset=8)


def open_image_set(source: str) -> ImageSet:
    """The image set named by ``data.source``; one error line for a missing, empty or unreadable one."""
    if source.startswith("fashion-mnist"):
        split = source.partition(":")[2] or "train"
        images = fashion_mnist(split)                              # [N, 1, 32, 32], checks the split and the files
        root = Path(os.environ.get("SID_FASHION_MNIST", FASHION_MNIST_DIR))
        path = root / FASHION_LABELS[split]
        labels = torch.from_numpy(read_idx_labels(path).astype(np.int64)) if path.is_file() else None
        if labels is not None and len(labels) != len(images):
            raise SidError(f"{path} holds {len(labels)} labels for {len(images)} images in {FASHION_FILES[split]}")
        return ImageSet(len(images), lambda i: images[i].permute(1, 2, 0).numpy(), labels,
                        lambda i: f"{source} #{i}", source)
    if source.endswith(".tar"):
        shards = [Path(p) for p in sorted(glob.glob(source))] if any(c in source for c in "*?[") else [Path(source)]
        if not shards or not shards[0].is_file():
            raise SidError(f"data.source={source!r}: no tar shards there")
        return shard_set(shards)
    path = Path(source)
    if not path.exists():
        raise SidError(f"data.source={source!r} not found: give fashion-mnist[:train|:test], an .npz of uint8 images "
                       "or a folder of images")
    if path.suffix == ".npz":
        return npz_set(path)
    if path.is_dir():
        return folder_set(path)
    raise SidError(f"data.source={source!r} is neither an .npz nor a folder of images")


def npz_set(path: Path) -> ImageSet:
    try:
        with np.load(path) as f:                                    # allow_pickle=False: object arrays refused
            images = f["images"] if "images" in f else f[f.files[0]]
            labels = f["labels"] if "labels" in f else None
    except (OSError, ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile) as e:
        raise SidError(f"{path} is not an .npz of images ({described(e, 120)}); expected uint8 images "
                       "[N, H, W, C] or [N, C, H, W] under 'images' and, optionally, integer 'labels'") from None
    if images.dtype != np.uint8 or images.ndim != 4 or not len(images):
        raise SidError(f"{path}: expected uint8 images [N, H, W, C] or [N, C, H, W], got {images.dtype} "
                       f"{images.shape}")
    if images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
        images = images.transpose(0, 2, 3, 1)
    if labels is not None and (labels.shape != (len(images),) or labels.dtype.kind not in "iu"):
        raise SidError(f"{path}: 'labels' must be one integer per image, got {labels.dtype} {labels.shape}")
    return ImageSet(len(images), lambda i: images[i], None if labels is None else torch.from_numpy(labels.astype(
        np.int64)), lambda i: f"{path} #{i}", str(path))


def folder_set(root: Path) -> ImageSet:
    """A folder's images (recursively, sorted by path), labelled by ``dataset.json`` or by sub-folder."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise SidError(f"data.source folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    names = [p.relative_to(root).as_posix() for p in files]
    labels = None
    if (root / "dataset.json").is_file():
        try:
            listed = dict(json.loads((root / "dataset.json").read_text())["labels"])
            labels = torch.tensor([int(listed[name]) for name in names])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SidError(f"{root / 'dataset.json'} does not label every image ({described(e, 80)}); expected "
                           '{"labels": [["relative/path.png", class], ...]} for each image') from None
    elif any("/" in name for name in names):
        if not all("/" in name for name in names):
            raise SidError(f"data.source folder {root} mixes images in sub-folders (classes) with images beside "
                           "them (no class): put each image in its class's sub-folder, or none in sub-folders")
        classes = sorted({name.split("/")[0] for name in names})
        labels = torch.tensor([classes.index(name.split("/")[0]) for name in names])
    return ImageSet(len(files), lambda i: Image.open(files[i]), labels, lambda i: str(files[i]), str(root))


def shard_set(shards: list[Path]) -> ImageSet:
    """WebDataset shards' images (members named <key>.png/.jpg/...; one image per sample key, in the shards'
    order), labelled where every sample has a ``.cls`` member (an integer), read by (shard, offset, size)."""
    where, labels = [], []
    for s, shard in enumerate(shards):
        classes = {}
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    key, _, extension = member.name.rpartition(".")
                    if not member.isfile():
                        continue
                    if "." + extension.lower() in IMAGE_SUFFIXES:
                        where.append((s, member.offset_data, member.size, key))
                    elif extension == "cls":
                        classes[key] = int(tar.extractfile(member).read().decode().strip())
        except (OSError, tarfile.TarError, ValueError) as e:
            raise SidError(f"{shard} is not a readable tar shard of images ({described(e, 80)})") from None
        labels += [classes.get(key) for (shard_index, _, _, key) in where if shard_index == s]
    if not where:
        raise SidError(f"the shards {shards[0]}... hold no images ({', '.join(IMAGE_SUFFIXES)})")

    def read(i: int):
        s, offset, size, _ = where[i]
        with open(shards[s], "rb") as f:
            f.seek(offset)
            return Image.open(io.BytesIO(f.read(size)))

    known = None if any(label is None for label in labels) else torch.tensor(labels)
    return ImageSet(len(where), read, known, lambda i: f"{shards[where[i][0]]}:{where[i][3]}", str(shards[0]))


def fit(image, shape: tuple[int, int, int]) -> torch.Tensor:
    """An image as uint8 [C, H, W] of ``shape``: grey or RGB as C asks, the centre cropped to the aspect ratio of
    (H, W) and resized with a Lanczos filter (EDM's dataset tool), untouched where it already fits."""
    channels, height, width = shape
    array = np.asarray(image) if not isinstance(image, Image.Image) else None
    if array is not None and array.shape == (height, width, channels):
        return torch.from_numpy(np.array(array)).permute(2, 0, 1)
    if array is not None:
        image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    crop_w, crop_h = min(w, round(h * width / height)), min(h, round(w * height / width))
    left, top = (w - crop_w) // 2, (h - crop_h) // 2
    image = image.crop((left, top, left + crop_w, top + crop_h))
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    array = np.asarray(image)
    return torch.from_numpy(np.array(array).reshape(height, width, channels)).permute(2, 0, 1)


class RealImages:
    """A shuffled stream of real images at the teacher's image ``shape``, in [-1, 1], with one-hot labels for a
    class-conditional teacher (``label_dim``). ``skip_bad``: an unreadable image is skipped (the next one in the set
    is read, so the stream stays a function of its position) with a warning, counted in ``skipped``; otherwise it
    is one error line. ``xflip``: each image flipped horizontally with probability ½, from the global generator
    (the trainer reseeds it every step)."""

    def __init__(self, images: ImageSet, shape, label_dim: int = 0, seed: int = 0, rank: int = 0, world: int = 1,
                 xflip: bool = False, skip_bad: bool = False, encode=None):
        self.images, self.shape, self.label_dim = images, tuple(shape), label_dim
        self.xflip, self.skip_bad, self.skipped = xflip, skip_bad, 0
        self.encode = encode or (lambda x: x)        # images -> the teacher's samples (a latent teacher's VAE)
        self.cached = None                           # data.cache: (every image's sample, the index it was read at)
        self.stream = Shuffled(images.size, seed, rank, world, salt="images")
        if label_dim:
            if images.labels is None:
                raise SidError(f"data.source={images.source} has no class labels and the teacher is "
                               f"class-conditional ({label_dim} classes): give labelled images (sub-folders, "
                               "dataset.json, or 'labels' in the .npz)")
            low, high = int(images.labels.min()), int(images.labels.max())
            if low < 0 or high >= label_dim:
                bad = int(torch.nonzero((images.labels < 0) | (images.labels >= label_dim))[0])
                raise SidError(f"data.source: {images.name(bad)} has label {int(images.labels[bad])}, outside the "
                               f"teacher's classes 0..{label_dim - 1}")

    def image(self, index: int) -> tuple[torch.Tensor, int]:
        """The image at ``index`` fitted to the shape, and its own index (the next readable one with skip_bad)."""
        for tries in range(self.images.size):
            i = (index + tries) % self.images.size
            try:
                return fit(self.images.read(i), self.shape), i
            except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
                if not self.skip_bad:
                    raise SidError(f"cannot read the real image {self.images.name(i)} ({described(e, 80)}); remove "
                                   "or replace it, or set data.skip_bad=true to skip unreadable images") from None
                self.skipped += 1
                print(f"warning: skipped the unreadable image {self.images.name(i)} ({type(e).__name__}); "
                      f"{self.skipped} skipped so far", file=sys.stderr, flush=True)
        raise SidError(f"no image of data.source={self.images.source} could be read")

    def draw(self, n: int, device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This process's next ``n`` real samples in the teacher's space (images in [-1, 1], or a latent teacher's
        latents of them) on ``device``, and their one-hot labels (None for an unconditional teacher)."""
        drawn = self.stream.indices(n)
        if self.cached is not None:
            samples, read = self.cached[0][drawn].to(device), self.cached[1][drawn].tolist()
        else:
            images, read = self.read(drawn, device)
            if self.xflip:
                flip = torch.randint(2, (n,), device=device).bool().view(-1, 1, 1, 1)
                images = torch.where(flip, images.flip(3), images)
            with torch.no_grad():
                samples = self.encode(images)
        if not self.label_dim:
            return samples, None
        return samples, torch.nn.functional.one_hot(self.images.labels[read], self.label_dim).float().to(device)

    def use_cache(self, path: Path, device=None, batch: int = 64) -> None:
        """``data.cache``: every image's sample (a latent teacher's latents), encoded once into ``path``
        (safetensors, written atomically) and read from it after; a cache of other images, or made by another VAE
        (its first samples, encoded again, differ), is one line."""
        made_for = {"source": self.images.source, "count": str(self.images.size), "shape": str(list(self.shape))}
        if path.is_file():
            cached, metadata = read_cache(path, "data.cache", "latent cache")
            if {k: metadata.get(k) for k in made_for} != made_for or not {"samples", "index"} <= cached.keys():
                raise SidError(f"data.cache={path} was made for other images than data.source={self.images.source} "
                               "at this size; delete it (it is made again) or name another file")
            self.cached = (cached["samples"], cached["index"])
            first = self.encoded(range(min(2, self.images.size)), device)[0]
            if not torch.allclose(first, self.cached[0][:len(first)], rtol=1e-4, atol=1e-5):
                raise SidError(f"data.cache={path} was made by another encoder than this teacher's VAE; delete it "
                               "(it is made again) or name another file")
            return
        parts = [self.encoded(range(i, min(i + batch, self.images.size)), device)
                 for i in range(0, self.images.size, batch)]
        self.cached = (torch.cat([s for s, _ in parts]), torch.tensor([i for _, read in parts for i in read]))
        write_cache(path, {"samples": self.cached[0], "index": self.cached[1]}, made_for, "data.cache",
                    "latent cache", "to encode the images as they are drawn")

    def read(self, indices, device=None) -> tuple[torch.Tensor, list[int]]:
        """The images at ``indices`` as float32 in [-1, 1] on ``device``, and the index each was read at."""
        pairs = [self.image(i) for i in indices]
        images = torch.stack([image for image, _ in pairs]).to(device, torch.float32) / 127.5 - 1
        return images, [i for _, i in pairs]

    def encoded(self, indices, device=None) -> tuple[torch.Tensor, list[int]]:
        """The teacher's samples of the images at ``indices`` (on the CPU), and the index each was read at."""
        images, read = self.read(indices, device)
        with torch.no_grad():
            return self.encode(images).cpu(), read

    def describe(self) -> str:
        return f", real images from {self.images.source} ({self.images.size:,})"

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        self.stream.load_state_dict(state)


class TeacherSamples:
    """``data.source=teacher``: the exact samples of a teacher that has them (analytic mixtures) stand for real
    images, drawn from the global generator (reseeded every step), so a toy run needs no data files."""

    def __init__(self, teacher):
        self.teacher = teacher

    def draw(self, n: int, device=None) -> tuple[torch.Tensor, None]:
        return self.teacher.sample(n).to(device), None

    def describe(self) -> str:
        return ", real samples: the teacher's exact ones"

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict | None) -> None:
        pass


def build_real_images(cfg, teacher, rank: int = 0, world: int = 1, device=None):
    """The real images of ``cfg.data`` for this teacher (None for a data-free run); one line where they cannot
    be used."""
    source = cfg.data.source
    if not source:
        return None
    if source == "teacher":
        if not teacher.exact_samples:
            raise SidError(f"data.source=teacher needs a teacher with exact samples (analytic); this "
                           f"{teacher.spec['kind']} teacher has none: give real images")
        return TeacherSamples(teacher)
    if teacher.text_to_image:
        raise SidError("data.source: real images of a text-to-image teacher need their captions, which sid does not "
                       "read; SiDA runs on unconditional and class-conditional teachers")
    if teacher.points:
        raise SidError("data.source: this teacher's samples are 2-D points, not images; use data.source=teacher")
    real = RealImages(open_image_set(source), teacher.image_shape, teacher.label_dim, cfg.train.seed, rank, world,
                      cfg.data.xflip, cfg.data.skip_bad, encode=teacher.from_images)
    if cfg.data.cache:
        if teacher.image_shape == teacher.shape:
            raise SidError("data.cache holds a latent teacher's encoded images; this teacher works on the images "
                           "themselves: set data.cache=null")
        if cfg.data.xflip:
            raise SidError("data.cache stores each image encoded once, and a flipped image's latent is not the "
                           "flipped latent: set data.xflip=false with a cache")
        real.use_cache(Path(cfg.data.cache), device)
    return real
