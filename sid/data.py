"""Image sources as uint8 tensors [N, C, H, W]: Fashion-MNIST (Debian's idx files), an .npz, or a folder."""

from __future__ import annotations

import gzip
import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sid.errors import SidError, described

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"   # apt-get install dataset-fashion-mnist
FASHION_FILES = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def read_idx_images(path: Path) -> np.ndarray:
    """An MNIST-format idx3 file (optionally gzipped) -> uint8 [N, H, W]."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if int.from_bytes(data[:4], "big") != 0x0803:
        raise SidError(f"{path} is not an idx3 image file")
    n, h, w = (int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(3))
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, h, w)


def fashion_mnist(split: str = "train", root: str | None = None) -> torch.Tensor:
    """Fashion-MNIST padded from 28x28 to 32x32 (zeros, the background), 1 channel: uint8 [N, 1, 32, 32]."""
    root = Path(root or os.environ.get("SID_FASHION_MNIST", FASHION_MNIST_DIR))
    if split not in FASHION_FILES:
        raise SidError(f"Fashion-MNIST split {split!r} is unknown; choose train or test")
    path = root / FASHION_FILES[split]
    if not path.is_file():
        raise SidError(f"{path} not found: install it with `apt-get install dataset-fashion-mnist`, "
                       "or point SID_FASHION_MNIST at a folder holding the idx .gz files")
    images = torch.from_numpy(read_idx_images(path).copy())
    return torch.nn.functional.pad(images, (2, 2, 2, 2))[:, None]


def load_images(source: str) -> torch.Tensor:
    """``fashion-mnist[:train|:test]``, an ``.npz`` (key ``images`` or the first array, NHWC or NCHW uint8), or a
    folder of images (sorted by name, all of one size)."""
    if source.startswith("fashion-mnist"):
        return fashion_mnist(source.partition(":")[2] or "train")
    path = Path(source)
    if not path.exists():
        raise SidError(f"image source {source!r} not found: give fashion-mnist[:train|:test], an .npz or a folder")
    if path.suffix == ".npz":
        try:
            with np.load(path) as f:                            # allow_pickle=False: object arrays refused
                array = f["images"] if "images" in f else f[f.files[0]]
        except (OSError, ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile) as e:
            raise SidError(f"{path} is not an .npz of images ({described(e, 120)}); "
                           "expected uint8 images [N, H, W, C] or [N, C, H, W] under 'images'") from None
        if array.dtype != np.uint8 or array.ndim != 4:
            raise SidError(f"{path}: expected uint8 images [N, H, W, C] or [N, C, H, W], got {array.dtype} "
                           f"{array.shape}")
        images = torch.from_numpy(array)
        return images if images.shape[1] in (1, 3) else images.permute(0, 3, 1, 2).contiguous()
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SidError(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    arrays = [np.asarray(Image.open(p)) for p in files]
    arrays = [a[..., None] if a.ndim == 2 else a[..., :3] for a in arrays]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# Shuffled streams: the prompts' and the real images' order --------------------------------------------------------

def hash_seed(*parts: int, salt: str = "prompts") -> int:
    """A 63-bit seed from integers: an independent stream for each pass of a shuffled list (``salt`` names it)."""
    digest = hashlib.sha256((salt + ":" + ",".join(str(int(p)) for p in parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class Shuffled:
    """Positions in a list of ``size`` items, in an order that is new every pass and a function of (seed, pass)
    alone. ``drawn``, the number of items drawn by all processes together, is the whole state: process ``rank`` of
    ``world`` takes the ``rank``-th slice of each global draw, so a run resumes where it stopped on any number of
    processes."""

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world: int = 1, salt: str = "prompts"):
        self.size, self.seed, self.rank, self.world, self.salt = size, seed, rank, world, salt
        self.drawn = 0
        self._order = (-1, None)                                     # (pass, its permutation)

    def order(self, epoch: int) -> torch.Tensor:
        if self._order[0] != epoch:
            generator = torch.Generator().manual_seed(hash_seed(self.seed, epoch, salt=self.salt))
            self._order = (epoch, torch.randperm(self.size, generator=generator))
        return self._order[1]

    def indices(self, n: int) -> list[int]:
        """The item indices of this process's next ``n`` draws (and the position moved past all processes')."""
        start = self.drawn + self.rank * n
        self.drawn += n * self.world
        return [int(self.order(i // self.size)[i % self.size]) for i in range(start, start + n)]

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict | None) -> None:
        self.drawn = int((state or {}).get("drawn", 0))
