"The README's plain PyTorch example runs as printed and ends with an answer a user can act on."
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.slow  # a real finder run and timing


def _block_after(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_plain_pytorch_example_runs_and_advises(monkeypatch):
    monkeypatch.setattr("matplotlib.pyplot.show", lambda *a, **k: None)
    scope: dict = {}
    exec(compile(_block_after("### Plain PyTorch"), "README.md", "exec"), scope)
    a = scope["a"]
    assert a.kind in ("grow", "keep", "shrink") and a.headline and a.speedup is not None
    assert scope["res"].rule == "sgd"  # the optimizer passed as opt= picked the lr rule
    assert scope["train_dl"].batch_size == a.batch_size and scope["lr"] == a.lr and scope["epochs"] == a.epochs


def test_the_adaptive_plain_pytorch_loop_runs_as_printed():
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from gns_widget.datasets import digits

    text = README.read_text()
    section = text[text.index("## Adapt during training"):]
    loop = re.findall(r"```python\n(.*?)```", section, re.S)[1]
    assert "AdaptiveLoader(" in loop
    torch.manual_seed(0)
    xt, yt, _, _ = digits()
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    scope = dict(train_ds=TensorDataset(xt[:1280], yt[:1280]), model=model, loss_func=nn.CrossEntropyLoss(),
                 opt=torch.optim.Adam(model.parameters(), lr=1e-3))
    exec(compile(loop, "README.md", "exec"), scope)
    adapt = scope["adapt"]
    assert adapt.pct == 1.0 and adapt.record.decisions and len(adapt.record.steps) <= 5 * 20
