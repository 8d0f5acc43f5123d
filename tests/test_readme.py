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
