"""Geometric augmentation of the fake-score step, as the official SiD CIFAR-10 run uses it.

The official run trains the fake score on augmented generator samples (``--augment 0.12``): EDM's augmentation
pipeline (Karras et al. 2022, Appendix F.2, after Karras et al. 2020's ADA) with x-flip, y-flip, isotropic
scaling, rotation, anisotropic scaling and translation, and the network conditioned on the 9 numbers that
describe the draw, so that it learns the augmented distribution as a separate condition and is asked for the
plain one (labels all zero) everywhere else. This is an implementation of that geometric subset with the same
distributions and label layout:

| labels | transform | drawn as |
|---|---|---|
| 0 | x-flip | a fair coin, whenever p > 0 (the run's x-flip multiplier of 1e8 saturates its probability) |
| 1 | y-flip | a fair coin, with probability p |
| 2 | isotropic scaling by 2^(0.2 w) | w ~ N(0, 1), with probability p |
| 3, 4 | rotation by θ: cos θ − 1, sin θ | θ ~ U(−π, π), with probability p |
| 5, 6 | anisotropic scaling 2^(±0.2 w) along an axis at φ: w cos φ, w sin φ | w ~ N(0, 1), probability p; |
|      |                                                                      | φ ~ U(−π, π) with prob. ½, else 0 |
| 7, 8 | translation by (0.125 W w_x, 0.125 H w_y) | w ~ N(0, 1)², with probability p |

Resampling, as EDM's: reflect-pad the image by what the transformed corners reach, upsample 2x with the
symlet-6 low-pass filter, sample bilinearly on the transformed grid, filter and downsample 2x, crop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The symlet-6 decomposition low-pass filter (Daubechies 1992; PyWavelets' Wavelet("sym6").dec_lo); sums to √2.
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)
LABEL_DIM = 9


def _matrices(n: int, device, a=1.0, b=0.0, c=0.0, d=1.0, tx=0.0, ty=0.0) -> torch.Tensor:
    """Batched 2-D affine maps [[a, b, tx], [c, d, ty], [0, 0, 1]] as [n, 3, 3]; each entry a number or [n]."""
    one, zero = torch.ones(n, device=device), torch.zeros(n, device=device)
    rows = [[a, b, tx], [c, d, ty], [0.0, 0.0, 1.0]]
    entries = [torch.as_tensor(v, device=device, dtype=torch.float32) * one for row in rows for v in row]
    return torch.stack(entries, dim=1).view(n, 3, 3) + zero.view(n, 1, 1)


def _rotation(theta: torch.Tensor) -> torch.Tensor:
    return _matrices(len(theta), theta.device, theta.cos(), -theta.sin(), theta.sin(), theta.cos())


class GeometricAugment:
    """``augment(images) -> (augmented images, labels [N, 9])`` for images [N, C, H, W] in any range.

    ``p`` is the probability multiplier of every transform but the x-flip (SiD's CIFAR-10 run: 0.12).
    Uses the global random generator, so the trainer's per-step seeding makes it reproducible.
    """

    label_dim = LABEL_DIM

    def __init__(self, p: float, scale_std: float = 0.2, rotate_max: float = 1.0, aniso_std: float = 0.2,
                 aniso_rotate_prob: float = 0.5, translate_std: float = 0.125):
        self.p, self.scale_std, self.rotate_max = p, scale_std, rotate_max
        self.aniso_std, self.aniso_rotate_prob, self.translate_std = aniso_std, aniso_rotate_prob, translate_std

    def gate(self, values: torch.Tensor, probability: float) -> torch.Tensor:
        """``values`` where a uniform draw falls below ``probability``, else 0 (no transform)."""
        keep = torch.rand(values.shape[-1], device=values.device) < probability
        return torch.where(keep, values, torch.zeros_like(values))

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = images.shape
        device = images.device
        # Pixel flips.
        xflip = self.gate(torch.randint(2, (n,), device=device).float(), 1.0 if self.p > 0 else 0.0)
        yflip = self.gate(torch.randint(2, (n,), device=device).float(), self.p)
        images = torch.where(xflip.view(-1, 1, 1, 1) > 0, images.flip(3), images)
        images = torch.where(yflip.view(-1, 1, 1, 1) > 0, images.flip(2), images)
        # Geometric transforms, composed as one map from output to input pixel coordinates (centred).
        scale = self.gate(torch.randn(n, device=device), self.p)
        rotate = self.gate((torch.rand(n, device=device) * 2 - 1) * (math.pi * self.rotate_max), self.p)
        aniso = torch.randn(n, device=device)
        axis = (torch.rand(n, device=device) * 2 - 1) * math.pi
        aniso = self.gate(aniso, self.p)
        axis = self.gate(axis, self.aniso_rotate_prob)
        translate = self.gate(torch.randn(2, n, device=device), self.p)           # one draw gates both
        s, a = (scale * self.scale_std).exp2(), (aniso * self.aniso_std).exp2()
        to_input = (_matrices(n, device, 1 / s, 0.0, 0.0, 1 / s)                          # scaling by s
                    @ _rotation(rotate)                                                    # rotation by θ
                    @ _rotation(-axis) @ _matrices(n, device, 1 / a, 0.0, 0.0, a) @ _rotation(axis)
                    @ _matrices(n, device, tx=-translate[0] * w * self.translate_std,
                                ty=-translate[1] * h * self.translate_std))
        if self.p > 0:                                   # every image goes through the resampling, as in EDM
            images = resample(images, to_input)
        labels = torch.stack([xflip, yflip, scale, rotate.cos() - 1, rotate.sin(), aniso * axis.cos(),
                              aniso * axis.sin(), translate[0], translate[1]], dim=1)
        return images, labels


def resample(images: torch.Tensor, to_input: torch.Tensor) -> torch.Tensor:
    """Images under the affine maps ``to_input`` [N, 3, 3] (output pixel -> input pixel, origin at the image
    centre): reflect-padded, 2x oversampled with the symlet-6 filter, sampled bilinearly, filtered back down."""
    n, c, h, w = images.shape
    device, taps = images.device, len(SYM6)
    support = taps // 4                                                          # filter reach, in pixels
    cx, cy = (w - 1) / 2, (h - 1) / 2
    corners = torch.tensor([[-cx, cx, cx, -cx], [-cy, -cy, cy, cy], [1.0, 1, 1, 1]], device=device)
    reach = (to_input @ corners)[:, :2].permute(1, 0, 2).flatten(1)              # [xy, N * 4]
    left, top = (-reach).max(dim=1).values - torch.tensor([cx, cy], device=device) + 2 * support
    right, bottom = reach.max(dim=1).values - torch.tensor([cx, cy], device=device) + 2 * support
    pads = [int(math.ceil(min(max(float(v), 0.0), limit))) for v, limit in
            ((left, w - 1), (right, w - 1), (top, h - 1), (bottom, h - 1))]
    images = F.pad(images, pads, mode="reflect")
    # The padded image's centre is off the original's by half the pad difference.
    to_input = _matrices(n, device, tx=(pads[0] - pads[1]) / 2, ty=(pads[2] - pads[3]) / 2) @ to_input
    images = _upsample2(images)
    # Pixel coordinates at twice the resolution (pixel centres at half-integers shift by half a pixel).
    half = _matrices(n, device, tx=-0.5, ty=-0.5)
    twice, half_size = _matrices(n, device, 2.0, 0.0, 0.0, 2.0), _matrices(n, device, 0.5, 0.0, 0.0, 0.5)
    to_input = half @ twice @ to_input @ half_size @ torch.linalg.inv(half)
    out_h, out_w = (h + 2 * support) * 2, (w + 2 * support) * 2
    in_h, in_w = images.shape[2:]
    # affine_grid's normalised coordinates: [-1, 1] across each image.
    normalise_in = _matrices(n, device, 2 / in_w, 0.0, 0.0, 2 / in_h)
    unnormalise_out = _matrices(n, device, out_w / 2, 0.0, 0.0, out_h / 2)
    theta = (normalise_in @ to_input @ unnormalise_out)[:, :2]
    grid = F.affine_grid(theta, [n, c, out_h, out_w], align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    images = _downsample2(images)
    return images[:, :, support:-support, support:-support]


def _filter(c: int, device, dtype, reverse: bool) -> torch.Tensor:
    taps = torch.tensor(SYM6[::-1] if reverse else SYM6, device=device, dtype=dtype)
    return taps.view(1, 1, -1).repeat(c, 1, 1)


def _upsample2(images: torch.Tensor) -> torch.Tensor:
    """Zeros between the samples along each axis, then the low-pass filter: [N, C, H, W] -> [N, C, 2H, 2W]."""
    n, c, h, w = images.shape
    kernel = _filter(c, images.device, images.dtype, reverse=True)
    pad = (len(SYM6) + 1) // 2
    images = torch.stack([images, torch.zeros_like(images)], dim=4).reshape(n, c, h, 2 * w)[..., :-1]
    images = F.conv2d(images, kernel.unsqueeze(2), groups=c, padding=(0, pad))
    images = torch.stack([images, torch.zeros_like(images)], dim=3).reshape(n, c, 2 * h, -1)[:, :, :-1]
    return F.conv2d(images, kernel.unsqueeze(3), groups=c, padding=(pad, 0))


def _downsample2(images: torch.Tensor) -> torch.Tensor:
    """The low-pass filter, then every other sample along each axis: [N, C, 2H, 2W] -> [N, C, H, W]."""
    c = images.shape[1]
    kernel = _filter(c, images.device, images.dtype, reverse=False)
    pad = (len(SYM6) - 1) // 2
    images = F.conv2d(images, kernel.unsqueeze(2), groups=c, stride=(1, 2), padding=(0, pad))
    return F.conv2d(images, kernel.unsqueeze(3), groups=c, stride=(2, 1), padding=(pad, 0))
