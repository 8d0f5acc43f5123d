"""Fashion-MNIST (real 28×28 images) from Debian's `dataset-fashion-mnist` package: the benchmarks' image data.

It lives with the benchmarks, not in the package: only the benchmarks and their tests use it (the package's
demos use scikit-learn's digits and ISLP's Bikeshare, see `gns_widget.datasets`).
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

__all__ = ["fashion_mnist", "FASHION_MNIST_DIR"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(train: bool = True, path: Path | str = FASHION_MNIST_DIR):
    "(x, y): images as float32 (N, 1, 28, 28) in [0, 1] and labels 0–9."
    path = Path(path)
    prefix = "train" if train else "t10k"
    images, labels = path / f"{prefix}-images-idx3-ubyte.gz", path / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists():
        raise FileNotFoundError(f"Fashion-MNIST not found in {path}: install Debian's package with "
                                "`apt-get install -y dataset-fashion-mnist`")
    x = torch.tensor(_read_idx(images), dtype=torch.float32).div_(255).unsqueeze(1)
    y = torch.tensor(_read_idx(labels), dtype=torch.long)
    return x, y
