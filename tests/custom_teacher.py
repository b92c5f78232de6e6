"""A user's own network, as `teacher.python.factory=tests.custom_teacher:build` names it in
tests/test_teachers_python.py: a small convolutional network made a denoiser by EDM preconditioning, its
pretrained weights read from a safetensors file."""

from safetensors.torch import load_file
from torch import nn

from sid.precond import EDMRule, Preconditioned


class ConvNet(nn.Module):
    """F(c_in x, c_noise, labels): two convolutions with the noise level (and class) added in between."""

    def __init__(self, channels: int, width: int, label_dim: int):
        super().__init__()
        self.inp, self.out = nn.Conv2d(channels, width, 3, padding=1), nn.Conv2d(width, channels, 3, padding=1)
        self.noise = nn.Linear(1, width)
        self.label = nn.Linear(label_dim, width, bias=False) if label_dim else None

    def forward(self, x_in, c_noise, labels=None):
        h = self.inp(x_in) + self.noise(c_noise[:, None])[:, :, None, None]
        if self.label is not None:
            h = h + self.label(labels)[:, :, None, None]
        return self.out(nn.functional.silu(h))


def build(channels: int = 1, width: int = 8, label_dim: int = 0, weights: str | None = None) -> nn.Module:
    denoiser = Preconditioned(ConvNet(channels, width, label_dim), EDMRule(0.5), label_dim=label_dim)
    if weights:
        denoiser.load_state_dict(load_file(weights))
    return denoiser


def not_a_network():
    return "a string"


def without_contract():
    return ConvNet(1, 8, 0)


class Flattening(nn.Module):
    """Has the contract's attributes, but returns its input flattened."""

    sigma_min, sigma_max, sigma_data, label_dim = 0.002, 80.0, 0.5, 0

    def forward(self, x, sigma, labels=None):
        return x.flatten(1)


def flattening():
    return Flattening()
