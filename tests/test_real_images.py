"""Real images for SiDA (sid/real_images.py): sources and their labels, fitting to the teacher's size, the shuffled
stream and its position, and bad data as one line."""

import gzip
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sid.errors import SidError
from sid.real_images import RealImages, fit, open_image_set


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def rgb(seed, h=8, w=8):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_labels_come_from_sub_folders_dataset_json_npz_and_fashion_mnist(tmp_path, monkeypatch):
    for name, cls in (("cat/a.png", 0), ("cat/b.png", 0), ("dog/c.png", 1)):
        save(tmp_path / "sub" / name, rgb(cls))
    images = open_image_set(str(tmp_path / "sub"))
    assert images.size == 3 and images.labels.tolist() == [0, 0, 1]

    for i in range(3):
        save(tmp_path / "edm" / "00000" / f"img{i:08d}.png", rgb(i))
    listed = {"labels": [[f"00000/img{i:08d}.png", 7 - i] for i in range(3)]}
    (tmp_path / "edm" / "dataset.json").write_text(json.dumps(listed))
    assert open_image_set(str(tmp_path / "edm")).labels.tolist() == [7, 6, 5]

    np.savez(tmp_path / "a.npz", images=np.stack([rgb(i) for i in range(4)]), labels=np.array([3, 1, 0, 2]))
    npz = open_image_set(str(tmp_path / "a.npz"))
    assert npz.labels.tolist() == [3, 1, 0, 2] and np.array_equal(npz.read(1), rgb(1))

    def idx(path, array, magic):
        with gzip.open(path, "wb") as f:
            f.write(magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
                    + array.astype(np.uint8).tobytes())

    idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((5, 28, 28)), 0x0803)
    idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(5), 0x0801)
    monkeypatch.setenv("SID_FASHION_MNIST", str(tmp_path))
    fashion = open_image_set("fashion-mnist:test")
    assert fashion.labels.tolist() == [0, 1, 2, 3, 4] and fashion.read(0).shape == (32, 32, 1)


def test_images_are_fitted_to_the_teachers_size_and_channels():
    """Already the right size: untouched. Otherwise the centre cropped to the aspect ratio and resized; grey and
    RGB converted as the teacher's channels ask."""
    image = rgb(0, 8, 8)
    assert torch.equal(fit(image, (3, 8, 8)), torch.from_numpy(image).permute(2, 0, 1))
    wide = np.zeros((8, 16, 3), np.uint8)
    wide[:, 4:12] = 255                                   # the centre 8x8 is white, the sides black
    assert torch.equal(fit(wide, (3, 8, 8)), torch.full((3, 8, 8), 255, dtype=torch.uint8))
    assert fit(Image.fromarray(rgb(1, 12, 12)), (1, 6, 6)).shape == (1, 6, 6)
    grey = fit(np.full((4, 4, 1), 9, np.uint8), (3, 4, 4))
    assert grey.shape == (3, 4, 4) and grey.eq(9).all()


def test_the_stream_draws_each_image_once_a_pass_shards_over_processes_and_resumes(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.stack([np.full((4, 4, 1), i, np.uint8) for i in range(6)]),
             labels=np.arange(6) % 3)
    images = open_image_set(str(tmp_path / "a.npz"))

    def drawn(stream, n):
        x, labels = stream.draw(n)
        return ((x[:, 0, 0, 0] + 1) * 127.5).round().long().tolist(), labels

    whole = RealImages(images, (1, 4, 4), label_dim=3, seed=1)
    first, labels = drawn(whole, 6)
    assert sorted(first) == list(range(6)) and labels.argmax(1).tolist() == [i % 3 for i in first]
    second, _ = drawn(whole, 6)
    assert sorted(second) == list(range(6)) and second != first
    ranks = [RealImages(images, (1, 4, 4), seed=1, rank=r, world=2) for r in range(2)]
    assert drawn(ranks[0], 3)[0] + drawn(ranks[1], 3)[0] == first
    resumed = RealImages(images, (1, 4, 4), seed=1)
    resumed.load_state_dict(ranks[0].state_dict())
    assert drawn(resumed, 6)[0] == second


def test_bad_data_is_one_line_or_skipped_and_counted(tmp_path, capsys):
    save(tmp_path / "f" / "a.png", rgb(0))
    (tmp_path / "f" / "b.png").write_bytes(b"not a png")
    images = open_image_set(str(tmp_path / "f"))
    with pytest.raises(SidError, match=r"cannot read the real image .*b.png .*data.skip_bad=true"):
        RealImages(images, (3, 8, 8), seed=0).draw(2)
    lenient = RealImages(images, (3, 8, 8), seed=0, skip_bad=True)
    x, _ = lenient.draw(2)
    assert x.shape == (2, 3, 8, 8) and lenient.skipped == 1
    assert "skipped the unreadable image" in capsys.readouterr().err

    (tmp_path / "empty").mkdir()
    save(tmp_path / "mixed" / "a.png", rgb(0))
    save(tmp_path / "mixed" / "cls" / "b.png", rgb(1))
    np.savez(tmp_path / "labels.npz", images=np.zeros((2, 4, 4, 1), np.uint8), labels=np.array([0, 5]))
    for source, message in ((tmp_path / "missing", "not found"), (tmp_path / "empty", "holds no images"),
                            (tmp_path / "mixed", "mixes images in sub-folders")):
        with pytest.raises(SidError, match=message):
            open_image_set(str(source))
    with pytest.raises(SidError, match=r"has label 5, outside the teacher's classes 0..2"):
        RealImages(open_image_set(str(tmp_path / "labels.npz")), (1, 4, 4), label_dim=3)
    with pytest.raises(SidError, match="has no class labels and the teacher is class-conditional"):
        RealImages(open_image_set(str(tmp_path / "f")), (3, 8, 8), label_dim=10)


def test_a_latent_teacher_reads_real_images_as_its_pipeline_encodes_them():
    """ImageCodec.encode: the mean of the VAE's posterior, (z − shift) · scaling, as the pipelines scale latents
    (decode undoes the scaling); the image size is the latent size times the VAE's factor."""
    from diffusers import AutoencoderKL

    from sid.teachers.diffusers.codecs import ImageCodec

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        scaling_factor=0.5, shift_factor=0.25)
    codec = ImageCodec(vae)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    expected = (vae.encode(images).latent_dist.mean - 0.25) * 0.5
    assert torch.equal(codec.encode(images), expected.detach())
    assert codec.encode(images).shape == (2, 4, 8, 8) and codec.decode(codec.encode(images)).shape == images.shape


def test_webdataset_shards_of_images_and_their_labels(tmp_path):
    """Tar shards (a glob): each sample's image member in the shards' order, labelled by its .cls members."""
    import tarfile

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    for s in range(2):
        with tarfile.open(tmp_path / f"images-{s:03d}.tar", "w") as tar:
            for i in range(2):
                png = io.BytesIO()
                Image.fromarray(np.full((8, 8, 3), 10 * (2 * s + i), np.uint8)).save(png, format="PNG")
                add(tar, f"{s}{i:05d}.png", png.getvalue())
                add(tar, f"{s}{i:05d}.cls", str(2 * s + i).encode())
    images = open_image_set(str(tmp_path / "images-*.tar"))
    assert images.size == 4 and images.labels.tolist() == [0, 1, 2, 3]
    stream = RealImages(images, (3, 8, 8), label_dim=4, seed=0)
    x, labels = stream.draw(4)
    assert torch.equal(((x[:, 0, 0, 0] + 1) * 127.5).round() / 10, labels.argmax(1).float())


def test_a_latent_cache_is_made_once_read_after_and_refused_for_another_vae(tmp_path):
    """data.cache: every image encoded once (the stream then draws the cached latents, equal to encoding on the
    fly); a cache made by another VAE is one line."""
    from diffusers import AutoencoderKL

    from sid.teachers.diffusers.codecs import ImageCodec

    def codec(seed):
        torch.manual_seed(seed)
        return ImageCodec(AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                        norm_num_groups=4))

    np.savez(tmp_path / "a.npz", images=np.stack([rgb(i, 16, 16) for i in range(5)]))
    images, vae = open_image_set(str(tmp_path / "a.npz")), codec(0)
    fly = RealImages(images, (3, 16, 16), seed=2, encode=vae.encode)
    cached = RealImages(images, (3, 16, 16), seed=2, encode=vae.encode)
    cached.use_cache(tmp_path / "cache.safetensors")
    torch.testing.assert_close(cached.draw(7)[0], fly.draw(7)[0], rtol=1e-5, atol=1e-6)
    again = RealImages(images, (3, 16, 16), seed=2, encode=lambda x: 1 / 0)    # read, not encoded again ...
    again.encode = vae.encode                                                    # ... except the 2 it checks
    again.use_cache(tmp_path / "cache.safetensors")
    assert torch.equal(again.cached[0], cached.cached[0])
    with pytest.raises(SidError, match="made by another encoder than this teacher's VAE"):
        RealImages(images, (3, 16, 16), encode=codec(1).encode).use_cache(tmp_path / "cache.safetensors")
