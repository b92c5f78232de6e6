"""Image sources (sid/data.py): Fashion-MNIST from Debian's idx files, .npz arrays, folders of images."""

import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from sid.data import fashion_mnist, load_images
from sid.errors import SidError


def write_idx(path, array):
    header = (0x0803).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_pads_to_32(tmp_path, monkeypatch):
    raw = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", raw)
    monkeypatch.setenv("SID_FASHION_MNIST", str(tmp_path))
    x = load_images("fashion-mnist:test")
    assert x.shape == (5, 1, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x[:, 0, 2:30, 2:30], torch.from_numpy(raw.astype(np.uint8)))
    assert x[:, :, :2].sum() == 0
    with pytest.raises(SidError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("train")


def test_npz_arrays_and_image_folders_load_as_uint8_nchw(tmp_path):
    nhwc = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3)).astype(np.uint8)
    np.savez(tmp_path / "a.npz", images=nhwc)
    x = load_images(str(tmp_path / "a.npz"))
    assert x.shape == (3, 3, 8, 8) and torch.equal(x.permute(0, 2, 3, 1), torch.from_numpy(nhwc))
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, image in enumerate(nhwc):
        Image.fromarray(image).save(folder / f"{i}.png")
    assert torch.equal(load_images(str(folder)), x)
    np.savez(tmp_path / "f.npz", images=nhwc.astype(np.float32))
    with pytest.raises(SidError, match="expected uint8 images"):
        load_images(str(tmp_path / "f.npz"))
    with pytest.raises(SidError, match="not found"):
        load_images(str(tmp_path / "none"))
