import pytest
import torch
from torch import nn

from gns_widget.datasets import digits_loaders


@pytest.fixture
def digits_dl():
    torch.manual_seed(0)
    return digits_loaders(bs=32)[0]


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.BatchNorm1d(32), nn.Linear(32, 10))
