"""The example notebooks run top to bottom, headless, without clicks, in the venv's python3 kernel.

jupyter_client starts the `python3` kernel with this interpreter (it swaps a bare
`python` in the kernelspec for `sys.executable`, and falls back to ipykernel's own spec
when none is installed), so no kernelspec setup is needed.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # the notebooks, end to end

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


def run(name: str) -> str:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(c.get("outputs", []) == [] and c.get("execution_count") is None
               for c in nb.cells if c.cell_type == "code"), f"{name}: strip outputs before committing"
    NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_quickstart_trains_at_the_suggested_batch_size():
    text = run("quickstart.ipynb")
    assert "Keep batch size 32" in text or "Train with batch size" in text  # the advice's headline
    assert "epoch 0: batch size" in text and "validation accuracy" in text
    acc = float(text.rsplit("validation accuracy", 1)[1].split()[0])
    assert acc > 0.8


def test_fastai_tabular_runs():
    text = run("fastai_tabular.ipynb")
    # the notebook ends with an answer: a changed batch size and the speedup it predicts on this machine
    bs = int(text.split("train batch size:", 1)[1].split()[0])
    assert bs != 32 and "Train with batch size" in text and "× faster on this machine" in text
    assert "optimizer steps for a plan of 892 at batch size 32" in text  # the adaptive fit's record, at its end
