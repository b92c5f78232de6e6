"""Pictures of samples: PNG grids for images, scatter plots for 2-D toy data."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [N, C, H, W] -> uint8 [N, H, W, C]."""
    x = (x.float().clamp(-1, 1) + 1) * 127.5
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(x: torch.Tensor, cols: int | None = None) -> np.ndarray:
    """Tile [N, C, H, W] images in [-1, 1] into one uint8 array [H', W'] (C = 1) or [H', W', 3]."""
    images = to_uint8(x)
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, k = divmod(i, cols)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = image
    return grid.squeeze(-1) if c == 1 else grid


def save_image_grid(x: torch.Tensor, path: str | Path, cols: int | None = None) -> None:
    """Tile [N, C, H, W] images in [-1, 1] into one PNG (C = 1 or 3)."""
    Image.fromarray(image_grid(x, cols)).save(path)


def save_scatter(points: torch.Tensor, reference: torch.Tensor | None, path: str | Path, title: str = "") -> None:
    """2-D generator samples over reference (teacher) samples."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, nothing to close

    fig = Figure(figsize=(4, 4), dpi=100)
    ax = fig.subplots()
    if reference is not None:
        ax.scatter(*reference.cpu().T, s=2, alpha=0.3, label="teacher", color="tab:gray")
    ax.scatter(*points.float().cpu().T, s=2, alpha=0.6, label="generator", color="tab:red")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def save_panels(panels: list[tuple[np.ndarray, str]], path: str | Path) -> None:
    """Image grids (uint8 arrays from ``image_grid``) side by side, each under its title."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(panels), 4.4), dpi=100)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (grid, title) in zip(axes[0], panels):
        ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)


def save_samples(x: torch.Tensor, path: str | Path, reference: torch.Tensor | None = None, title: str = "") -> bool:
    """A grid for image-shaped samples, a scatter plot for 2-D points; False for other shapes."""
    if x.ndim == 4 and x.shape[1] in (1, 3):
        save_image_grid(x, path)
        return True
    if x.ndim == 2 and x.shape[1] == 2:
        save_scatter(x, reference, path, title)
        return True
    return False
