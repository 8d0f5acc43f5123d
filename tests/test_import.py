"""`import gns_widget` costs torch alone, and fastai users still get `learn.bs_find()` in either import order.

Each check runs in a fresh interpreter: this test process has long imported everything.
"""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# what a training script that wants only the estimator or bs_find must not pay for
HEAVY = ["fastai", "fastcore", "ipywidgets", "bqplot", "IPython", "matplotlib", "scipy", "sklearn"]


def run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def loaded_after(statement: str) -> set[str]:
    names = ["torch", "pandas", *HEAVY]
    out = run(f"import sys\n{statement}\nprint(' '.join(m for m in {names!r} if m in sys.modules))")
    return set(out.split())


def test_import_costs_torch_alone():
    loaded = loaded_after("import gns_widget")
    assert "torch" in loaded
    assert not loaded & {*HEAVY, "pandas"}


def test_bs_find_and_the_estimator_load_no_fastai_and_no_widget():
    loaded = loaded_after("from gns_widget import bs_find, NoiseScaleEstimator, apply_batch_size, GNSResult, "
                          "AutoStop, BatchAdvice, max_batch_size, PerExampleNorms, DDPNoiseScale, FinderBusyError")
    assert not loaded & set(HEAVY)


@pytest.mark.slow
def test_top_level_names_resolve():
    out = run("""
        import gns_widget
        missing = [n for n in gns_widget.__all__ if n not in dir(gns_widget)]
        assert not missing, missing
        for name in gns_widget.__all__:
            assert getattr(gns_widget, name).__name__ == name, name
        from gns_widget import engine, datasets  # submodules still import through the lazy face
        try:
            gns_widget.no_such_name
        except AttributeError as e:
            print("AttributeError", e)
        """)
    assert "AttributeError" in out and "no_such_name" in out


LEARNER = """
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    torch.manual_seed(0)
    x = torch.randn(256, 8); y = (x[:, 0] > 0).long()
    dls = DataLoaders.from_dsets(TensorDataset(x, y), TensorDataset(x, y), bs=16, device="cpu")
    learn = Learner(dls, nn.Sequential(nn.Linear(8, 2)), loss_func=nn.CrossEntropyLoss())
    res = learn.bs_find(lr=0.1, num_it=40, n_batch=4, show_plot=False)
    print(len(res.history), res.batch_size)
    print(type(learn.bs_find_widget).__name__, learn.bs_find.__module__)
"""


@pytest.mark.slow
@pytest.mark.parametrize("order", ["fastai first", "gns_widget first"])
def test_learner_bs_find_in_either_import_order(order):
    imports = ["from fastai.tabular.all import *", "import gns_widget"]
    if order == "gns_widget first":
        imports.reverse()
    out = run("\n".join(imports) + textwrap.dedent(LEARNER)).split("\n")
    assert out[0] == "10 16"
    assert out[1] == "method gns_widget.learner"


@pytest.mark.slow
def test_learner_bs_find_widget_is_the_panels():
    out = run("""
        import gns_widget
        from fastai.basics import Learner, DataLoaders
        import torch
        from torch import nn
        from torch.utils.data import TensorDataset
        x = torch.randn(64, 8); y = (x[:, 0] > 0).long()
        dls = DataLoaders.from_dsets(TensorDataset(x, y), TensorDataset(x, y), bs=16, device="cpu")
        learn = Learner(dls, nn.Sequential(nn.Linear(8, 2)), loss_func=nn.CrossEntropyLoss())
        w = learn.bs_find_widget(lr=0.0, num_it=40, n_batch=4)
        print(type(w).__name__, Learner.bs_find_widget.__module__)
        """)
    assert out.split() == ["GNSWidget", "gns_widget.widget.fastai"]
