"""Model families users train, through every method: exact against every per-example gradient, or refused clearly,
and the user's state back exactly after the run."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gns_widget import bs_find

METHODS = ["fixed", "sequential", "per_example"]
N = 16


class _Bag(nn.Module):
    "Token ids → EmbeddingBag → Linear: bag-of-words text classification."

    def __init__(self, **bag):
        super().__init__()
        self.bag, self.fc = nn.EmbeddingBag(20, 8, **bag), nn.Linear(8, 3)

    def forward(self, idx):
        return self.fc(self.bag(idx))


class _FunctionalSparse(nn.Module):
    def __init__(self):
        super().__init__()
        self.table, self.fc = nn.Parameter(torch.randn(20, 8)), nn.Linear(8, 3)

    def forward(self, idx):
        return self.fc(F.embedding(idx, self.table, sparse=True).mean(1))


def _tokens(n: int = N) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randint(0, 20, (n, 6), generator=g), torch.randint(0, 3, (n,), generator=g))
    return DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("make, name", [
    (lambda: _Bag(sparse=True), "'bag.weight'"),
    (lambda: nn.Sequential(nn.Embedding(20, 8, sparse=True), nn.Flatten(), nn.Linear(48, 3)), ""),
    (_FunctionalSparse, "'table'"),
], ids=["embedding-bag", "embedding", "functional"])
def test_sparse_gradients_are_refused_clearly(make, name, method):
    "Every method refuses a sparse gradient with a ValueError saying sparse=False (per_example crashed inside vmap)."
    torch.manual_seed(0)
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"{name if method == 'per_example' else ''}.*sparse.*sparse=False"):
        bs_find(model, _tokens(), nn.CrossEntropyLoss(), lr=0.1, num_it=4, n_batch=2, method=method, device="cpu")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
