"""The panel in a real frontend: JupyterLab in headless Chromium, as a user drives it.

These are the only tests that see what the user sees: widget messages sent from the worker
thread must reach the browser and render; a re-run cell, a kernel interrupt, Apply, an 800 px
window and the dark theme must leave a usable panel and an untouched model. One JupyterLab
server and one browser serve every test (a few seconds each to start). Skipped without
Chromium or playwright, except in CI where they must run.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).parent.parent
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
# an SVG path with at least 5 points (bqplot draws one segment per estimate) and no NaN coordinate
MANY_POINTS = re.compile(r"^M[^N]*(?:L[^N]*){4,}$")
SEGMENT = re.compile(r"^M[^NL]*L[^NL]*$")  # the suggested batch size: one horizontal segment
MANY_STEPS = re.compile(r"^M[^N]*(?:[LHV][^N]*){4,}$")  # the same, drawn in steps too (the batch size's line)
DIAMOND = ".object_grp .dot"  # a bqplot Scatter's point: a decision's marker (a one-point line's dot is not one)

pytestmark = pytest.mark.browser


def _require_browser():
    "Skip (fail in CI) when the browser stack is not installed; never download one."
    missing = [] if CHROMIUM.exists() else [f"{CHROMIUM} (apt-get install -y chromium)"]
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright Python package")
    if missing:
        msg = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# the scenario notebooks: setup, then the panel cell, then checks the tests run one by one
SETUP = """import threading
import torch
from torch import nn
from gns_widget import GNSWidget
from gns_widget.datasets import digits_loaders

torch.manual_seed(0)
train_dl, valid_dl = digits_loaders(bs=32)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
before = {k: v.clone() for k, v in model.state_dict().items()}"""
PANEL = "w = GNSWidget(model, train_dl, nn.CrossEntropyLoss(), lr=0.1, num_it=10**6, n_batch=10)\nw"
CHECK = ("print('same weights:', all(torch.equal(v, before[k]) for k, v in model.state_dict().items()),\n"
         "      '| runs alive:', sum(t.name.startswith('GNSWidget run') for t in threading.enumerate()))")
STAND_IN_DEVICE = ("\nfrom tests.devices import fake_timing\n"
                   "_device = fake_timing()  # held: the patch lasts while it lives\n_device.__enter__()")
# a tiny fastai Learner on the digits at batch size 16, and a stand-in timing whose step costs the same at every
# size (a GPU far from saturation), so that the batch grows at the first decision whatever this CPU's timing says
ADAPTIVE_SETUP = """from fastai.basics import Learner, set_seed
from fastai.data.core import DataLoaders
from fastai.optimizer import Adam
from torch import nn
from torch.utils.data import TensorDataset
from gns_widget import AdaptiveBatchSize, AdaptiveView
from gns_widget.datasets import digits
from gns_widget.throughput import Throughput

set_seed(0)
xt, yt, xv, yv = digits()
dls = DataLoaders.from_dsets(TensorDataset(xt[:640], yt[:640]), TensorDataset(xv[:128], yv[:128]), bs=16,
                             device="cpu")
learn = Learner(dls, nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
                loss_func=nn.CrossEntropyLoss(), opt_func=Adam)


def step_bound():
    tp = Throughput({b: 0.01 for b in (16, 32, 64, 128, 256)}, device="step-bound")
    return AdaptiveBatchSize(throughput=tp, max_overhead=1)"""
FINISHED = "w = GNSWidget(model, train_dl, nn.CrossEntropyLoss(), lr=0.0, num_it=300, n_batch=10)\nw"
SCENARIOS = {
    "rerun.ipynb": [SETUP, PANEL, CHECK],
    "interrupt.ipynb": [SETUP, PANEL, "w.start()\nres = w.wait()", CHECK],
    # a finished run (lr 0: quick) on a stand-in device whose step costs the same at every size, so the advice
    # grows (the longest headline, an Apply to make) whatever this CPU's timing says; then Apply from code
    "layout.ipynb": [SETUP + STAND_IN_DEVICE, FINISHED, "w.start()\nres = w.wait()",
                     "train_dl = w.apply()\nprint('batch size after apply:', len(next(iter(train_dl))[0]))"],
    "apply_first.ipynb": [SETUP, PANEL, "train_dl = w.apply()\nprint('loader kept:', len(next(iter(train_dl))[0]))"],
    # the adaptive batch size live during a fastai fit: a long fit the test stops, a cell run while it trains, a
    # 6-epoch fit to its end, and the Learner's own batch size after
    "adaptive.ipynb": [ADAPTIVE_SETUP, "view = AdaptiveView()\nview",
                       "view.fit(learn, 200, 3e-3, cb=step_bound())  # long: the test stops it",
                       "print('usable while training:', view.running)",
                       "view.fit(learn, 6, 3e-3, cb=step_bound())",
                       "print('learn.dls.train.bs:', learn.dls.train.bs, '| stopped:', view.stopped)"],
}


def _notebook(cells: list) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    "A JupyterLab server on a free port, rooted in a temp dir with the quickstart (up to Apply) and the scenarios."
    _require_browser()
    tmp_path = tmp_path_factory.mktemp("lab")
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    first_apply = next(i for i, c in enumerate(nb.cells) if "apply" in c.metadata.get("tags", []))
    # the test clicks Apply itself, then runs what the panel tells the user to run, then checks the batches
    nb.cells = nb.cells[:first_apply] + [nbformat.v4.new_code_cell(c) for c in (
        "train_dl = w.train_dl", "print('batch size my code gets:', len(next(iter(train_dl))[0]))")]
    # a stand-in device whose step costs the same at every size, so that the advice grows and there is something
    # to Apply whatever this CPU's timing says (tests/devices.py; the kernel imports the checkout under test)
    nb.cells.insert(1, nbformat.v4.new_code_cell(STAND_IN_DEVICE.strip()))
    root = tmp_path / "root"
    root.mkdir()
    nbformat.write(nb, root / "quickstart.ipynb")
    for name, cells in SCENARIOS.items():
        nbformat.write(_notebook(cells), root / name)
    port = _free_port()
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTERLAB_WORKSPACES_DIR":
           str(tmp_path / "workspaces"), "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
           "--IdentityProvider.token=", "--ServerApp.password=", f"--ServerApp.root_dir={root}",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers often run as root
        cmd.append("--allow-root")
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "jupyter.log", "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        yield from _serve(server, url, tmp_path / "jupyter.log")


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _open(browser, lab: str, name: str, width: int = 1600, height: int = 1400):
    "A fresh page with notebook `name` open and its kernel idle."
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(f"{lab}/lab/tree/{name}?reset")
    expect(page.locator("#jp-main-statusbar")).to_contain_text("Idle", timeout=60_000)
    return page


def _dismiss_news(page) -> None:
    "Close JupyterLab's 'Jupyter news?' toast, which appears a few seconds in and covers screenshots."
    from playwright.sync_api import expect

    news = page.get_by_role("button", name="No", exact=True)
    if news.count():
        news.first.click()
        expect(news).to_have_count(0)


def _menu(page, menu: str, *items: str) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text=menu).first.click()
    for item in items:
        page.locator(".lm-Menu-itemLabel", has_text=item).first.click()


def _cell(page, i: int):
    return page.locator(".jp-Notebook .jp-Cell").nth(i)


def _run_cell(page, i: int) -> None:
    """Select cell `i` and run it (Shift+Enter), as a user re-running a cell does.

    Two things can make the press run nothing, both seen in CI after a kernel interrupt:
    - the notebook's own notification takes the click;
    - the cell is still queued ([*]) from a Run All whose abort has not reached the page yet: the abort then turns
      the prompt back to [ ], which must not be read as the kernel taking the press.
    So a queued prompt is waited out first, only [*] or a new count counts as taken, and the press is repeated."""
    from playwright.sync_api import expect

    prompt = _cell(page, i).locator(".jp-InputPrompt").first
    expect(prompt).not_to_contain_text("*", timeout=30_000)
    before = prompt.text_content()
    for _ in range(3):
        prompt.click()
        page.keyboard.press("Shift+Enter")
        for _ in range(50):  # up to 5 s for the kernel to take it
            now = prompt.text_content()
            if now != before and now.replace(" ", "") != "[]:":
                return
            page.wait_for_timeout(100)
    raise AssertionError(f"cell {i} did not run: its prompt stayed {before!r}")


def _shutdown(page) -> None:
    "Close the page and shut its kernel down, so the next test starts with the machine quiet."
    _menu(page, "Kernel", "Shut Down Kernel")
    page.close()


def _serve(server: subprocess.Popen, url: str, log: Path):
    "Wait for the server to answer, hand out its URL, and always shut it down."
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status", timeout=2)
                break
            except OSError:
                assert server.poll() is None, log.read_text()
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not start in 60 s:\n" + log.read_text())
        yield url
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_quickstart_panel_apply_and_the_batch_size_the_code_gets(lab, browser):
    "Run All, check the live charts and result, click Apply, run the line the panel shows, count a batch."
    from playwright.sync_api import expect

    page = _open(browser, lab, "quickstart.ipynb")
    n_cells = page.locator(".jp-Notebook .jp-Cell").count()
    # run everything above the two check cells
    _cell(page, n_cells - 3).locator(".jp-InputPrompt").first.click()
    _menu(page, "Run", "Run All Above Selected Cell")
    panel = page.locator(".gns-widget")
    expect(panel.locator(".gns-status")).to_contain_text("finished", timeout=120_000)
    panel.scroll_into_view_if_needed()
    paths = {name: _line_paths(panel.locator(f".gns-chart-{name}")) for name in ("noise", "scale", "noise-scale")}
    assert all(any(MANY_POINTS.match(d) for d in ds) for ds in paths.values()), paths
    assert any(SEGMENT.match(d) for d in paths["noise-scale"]), "no suggested-bs line"
    bar = panel.locator(".gns-progress .progress-bar")
    assert bar.evaluate("e => e.style.width") == "100%"
    expect(panel.locator(".gns-progress-label")).to_contain_text("finished at iteration 1000/1000")
    expect(panel.locator(".gns-result")).to_contain_text("suggested batch size")
    expect(panel.locator(".gns-headline")).to_contain_text("Train with batch size")
    expect(panel.locator(".gns-headline")).to_be_visible()
    expect(panel.locator(".gns-result")).not_to_be_visible()  # the details are collapsed under the headline
    # no bqplot toolbar over the title, and no "null" tooltips
    assert panel.locator(".bqplot .toolbar, .jupyter-widget.bqplot-toolbar").count() == 0
    nulls = panel.locator("[title='null']").evaluate_all(  # hidden labels of widgets without a description
        "es => es.filter(e => e.offsetParent !== null).map(e => e.className + ' < ' + e.parentElement.className)")
    assert not nulls, nulls
    for control in ("n-batch", "beta", "num-it", "lr", "epochs"):  # a tooltip on the name, a line under the input
        assert len(panel.locator(f".gns-{control} label").get_attribute("title")) > 30, control
        below = panel.locator(f".gns-{control} + .gns-help, .gns-{control} + .gns-num-it-help").inner_text()
        assert len(below) > 30, control

    panel.locator("button.gns-apply").click()
    expect(panel.locator(".gns-status")).to_contain_text("train batch size 32 →", timeout=30_000)
    expect(panel.locator("button.gns-apply")).to_be_disabled()
    new_bs = int(re.search(r"32 → (\d+)", panel.locator(".gns-status").inner_text()).group(1))
    line = panel.locator(".gns-note code.gns-copy").inner_text()
    copied = _cell(page, n_cells - 2).locator(".jp-InputArea-editor").inner_text().strip()
    assert line == "train_dl = w.train_dl" == copied
    expect(panel.locator(".gns-bs")).to_contain_text("loaders made before Apply still give 32")
    _dismiss_news(page)
    panel.screenshot(path=str(ARTIFACTS / "panel.png"))
    _run_cell(page, n_cells - 2)
    _run_cell(page, n_cells - 1)
    expect(_cell(page, n_cells - 1).locator(".jp-OutputArea")).to_contain_text(
        f"batch size my code gets: {new_bs}", timeout=30_000)
    _shutdown(page)
    # the README's screenshot is refreshed on request only, so a test run leaves the tree clean
    readme_copy = ROOT / "docs" / "panel.png" if os.environ.get("GNS_UPDATE_SCREENSHOT") else None
    _small_copy(ARTIFACTS / "panel.png", readme_copy or ARTIFACTS / "panel_small.png")


def _stop_and_check_restored(page, panel, check_cell: int, out) -> None:
    "Stop the run, run the cell that prints whether the weights are the original ones and no run is alive, close."
    from playwright.sync_api import expect

    panel.locator("button.gns-stop").click()
    expect(panel.locator(".gns-status")).to_contain_text("model restored", timeout=30_000)
    _run_cell(page, check_cell)
    expect(out).to_contain_text("same weights: True | runs alive: 0", timeout=30_000)
    _shutdown(page)


def test_rerunning_the_panel_cell_during_a_run(lab, browser):
    "The old run stops and restores the model; the new panel runs; at most one run is ever alive."
    from playwright.sync_api import expect

    page = _open(browser, lab, "rerun.ipynb")
    _menu(page, "Run", "Run All Cells")
    panel = page.locator(".gns-widget")
    expect(panel.locator("button.gns-start")).to_be_enabled(timeout=60_000)
    panel.locator("button.gns-start").click()
    expect(panel.locator(".gns-progress-label")).to_contain_text("left", timeout=30_000)
    _run_cell(page, 1)  # the panel cell again, while its run goes on
    panel = page.locator(".gns-widget")
    expect(panel.locator(".gns-status")).to_contain_text("idle", timeout=30_000)
    assert panel.count() == 1
    _run_cell(page, 2)
    out = _cell(page, 2).locator(".jp-OutputArea")
    expect(out).to_contain_text("same weights: True | runs alive: 0", timeout=30_000)
    panel.locator("button.gns-start").click()
    expect(panel.locator(".gns-progress-label")).to_contain_text("left", timeout=30_000)
    _run_cell(page, 2)
    expect(out).to_contain_text("runs alive: 1", timeout=30_000)
    _stop_and_check_restored(page, panel, 2, out)


def test_kernel_interrupt_during_a_run(lab, browser):
    "■ while a cell waits for the run: the run stops, the model is restored and the panel starts again."
    from playwright.sync_api import expect

    page = _open(browser, lab, "interrupt.ipynb")
    _menu(page, "Run", "Run All Cells")
    panel = page.locator(".gns-widget")
    expect(panel.locator(".gns-progress-label")).to_contain_text("left", timeout=60_000)
    _menu(page, "Kernel", "Interrupt Kernel")
    expect(panel.locator(".gns-status")).to_contain_text("interrupted (kernel interrupt) after", timeout=30_000)
    expect(panel.locator(".gns-status")).to_contain_text("model restored")
    expect(panel.locator("button.gns-start")).to_be_enabled()
    expect(panel.locator("button.gns-stop")).to_be_disabled()
    expect(panel.locator(".gns-progress-label")).to_contain_text("stopped at iteration")
    expect(_cell(page, 2).locator(".jp-OutputArea")).to_contain_text("KeyboardInterrupt")
    _run_cell(page, 3)
    out = _cell(page, 3).locator(".jp-OutputArea")
    expect(out).to_contain_text("same weights: True | runs alive: 0", timeout=30_000)
    stopped_at = panel.locator(".gns-progress-label").inner_text()
    panel.locator("button.gns-start").click()  # usable: a new run starts and reports
    expect(panel.locator(".gns-progress-label")).not_to_have_text(stopped_at, timeout=30_000)
    expect(panel.locator(".gns-progress-label")).to_contain_text("left", timeout=30_000)
    _stop_and_check_restored(page, panel, 3, out)


def _run_started_with_the_start_button(browser, lab):
    "The rerun scenario's panel, its run started with the Start button (no cell running) and reporting: page, panel."
    from playwright.sync_api import expect

    page = _open(browser, lab, "rerun.ipynb")
    _run_cell(page, 0)
    _run_cell(page, 1)
    panel = page.locator(".gns-widget")
    expect(panel.locator("button.gns-start")).to_be_enabled(timeout=60_000)
    panel.locator("button.gns-start").click()
    expect(panel.locator(".gns-progress-label")).to_contain_text("left", timeout=30_000)
    return page, panel


def test_kernel_interrupt_stops_a_run_started_with_the_start_button(lab, browser):
    "Issue 19 item 6: ■ with no cell running (a run started from Start) went on from iteration 2,840 to 6,890."
    from playwright.sync_api import expect

    page, panel = _run_started_with_the_start_button(browser, lab)
    _menu(page, "Kernel", "Interrupt Kernel")
    expect(panel.locator(".gns-status")).to_contain_text("interrupted (kernel interrupt) after", timeout=30_000)
    expect(panel.locator("button.gns-start")).to_be_enabled()
    _run_cell(page, 2)
    out = _cell(page, 2).locator(".jp-OutputArea")
    expect(out).to_contain_text("same weights: True | runs alive: 0", timeout=30_000)
    _shutdown(page)


def test_kernel_restart_during_a_run_says_the_panel_is_disconnected(lab, browser):
    "Issue 19 item 7: after a kernel restart mid-run the panel froze on 'running · about 28 s left', Stop enabled."
    from playwright.sync_api import expect

    page, panel = _run_started_with_the_start_button(browser, lab)
    _menu(page, "Kernel", "Restart Kernel…")
    page.locator(".jp-Dialog .jp-mod-accept").click()
    expect(panel).to_have_class(re.compile("jupyter-widgets-disconnected"), timeout=30_000)
    status = panel.locator(".gns-status .widget-html-content")
    shown = status.evaluate("e => getComputedStyle(e, '::after').content")
    assert "the kernel restarted, so this panel is disconnected" in shown, shown
    assert not panel.locator(".gns-status span").is_visible()  # the stale "running" is hidden
    assert not panel.locator(".gns-progress-label").is_visible()
    assert panel.locator("button.gns-stop").evaluate("e => getComputedStyle(e).pointerEvents") == "none"
    _shutdown(page)


def test_apply_before_any_run_keeps_the_loader(lab, browser):
    "Issue 19 item 1: `train_dl = w.apply()` with nothing to apply gave None and the next cell an AttributeError."
    from playwright.sync_api import expect

    page = _open(browser, lab, "apply_first.ipynb")
    _menu(page, "Run", "Run All Cells")
    expect(_cell(page, 2).locator(".jp-OutputArea")).to_contain_text("loader kept: 32", timeout=60_000)
    panel = page.locator(".gns-widget")
    expect(panel.locator(".gns-status")).to_contain_text("no finished run yet")
    assert "gns-c-idle" in panel.locator(".gns-status span").get_attribute("class")  # neutral, not red
    _shutdown(page)


def test_adaptive_view_live_during_a_fit_stop_and_finish(lab, browser):
    """Issue 21: `AdaptiveView.fit` trains in the background while its three charts, headline and progress follow it
    live and another cell runs; Stop ends it early; a second fit runs to its end; the Learner keeps batch size 16."""
    from playwright.sync_api import expect

    page = _open(browser, lab, "adaptive.ipynb")
    for i in range(3):
        _run_cell(page, i)
    view = page.locator(".gns-adaptive")
    status, headline, label = (view.locator(f".gns-{c}") for c in ("status", "headline", "progress-label"))
    expect(status).to_contain_text("training (fit one cycle, 200 planned epochs)", timeout=60_000)
    # the first decision (end of the first epoch) grows the batch: a diamond on each chart, while the fit goes on
    for name in ("noise-scale", "bs", "lr"):
        expect(view.locator(f".gns-chart-adaptive-{name} {DIAMOND}").first).to_be_attached(timeout=30_000)
    expect(headline).to_contain_text(re.compile(r"Batch size \d+ now \(started at 16\) · \d+% of the planned run"))
    for name in ("noise-scale", "bs", "lr"):
        paths = _line_paths(view.locator(f".gns-chart-adaptive-{name}"), pattern=MANY_STEPS)
        assert any(MANY_STEPS.match(d) for d in paths), (name, paths)
    shown = label.inner_text()
    assert re.fullmatch(r"\d+% of the planned run · step [\d,]+", shown), shown
    expect(label).not_to_have_text(shown, timeout=30_000)  # the progress moves on
    _run_cell(page, 3)  # the notebook is usable while it trains
    expect(_cell(page, 3).locator(".jp-OutputArea")).to_contain_text("usable while training: True", timeout=30_000)
    expect(status).to_contain_text("training")

    view.locator("button.gns-stop").click()
    expect(status).to_contain_text(re.compile(r"stopped at \d+% of the planned run, after [\d,]+ steps"),
                                   timeout=30_000)
    expect(headline).to_contain_text("Stopped at")
    expect(view.locator("button.gns-stop")).to_be_disabled()

    _run_cell(page, 4)  # 6 epochs planned at 16: they end in fewer, bigger steps
    expect(status).to_contain_text("finished: ", timeout=60_000)
    expect(status).to_contain_text("instead of the planned 240 at batch size 16")
    expect(headline).to_contain_text(re.compile(r"Finished at 100% of the planned run · batch size \d+ \(started at "
                                                r"16\)"))
    expect(label).to_contain_text("100% of the planned run")
    assert view.locator(".gns-progress .progress-bar").evaluate("e => e.style.width") == "100%"
    expect(view.locator(f".gns-chart-adaptive-bs {DIAMOND}").first).to_be_attached()
    _run_cell(page, 5)
    expect(_cell(page, 5).locator(".jp-OutputArea")).to_contain_text("learn.dls.train.bs: 16 | stopped: False",
                                                                     timeout=30_000)
    _dismiss_news(page)
    view.scroll_into_view_if_needed()
    view.screenshot(path=str(ARTIFACTS / "adaptive_view.png"))
    _shutdown(page)


def _open_file_browser(page) -> None:
    "The left sidebar's file browser, open (the layout in which the result box overflowed at 800 px)."
    from playwright.sync_api import expect

    if not page.locator("#filebrowser").is_visible():
        page.locator(".jp-SideBar.jp-mod-left [data-id='filebrowser']").click()
    expect(page.locator("#filebrowser")).to_be_visible()


# every element of the result area and the charts: [class, right edge beyond the panel, scrollWidth > clientWidth]
OVERFLOW_JS = """panel => { const r = panel.getBoundingClientRect();
  return [...panel.querySelectorAll('.gns-headline, .gns-result, .gns-result *, .gns-details, .gns-chart-box')]
    .filter(e => e.getBoundingClientRect().width > 0)
    .filter(e => e.getBoundingClientRect().right > r.right + 1 || e.scrollWidth > e.clientWidth + 1)
    .map(e => (e.getAttribute('class') || e.tagName) + ' ' + e.scrollWidth + '>' + e.clientWidth) }"""
# each chart's title against its figure: [title, title's left, right, figure's left, right]
TITLES_JS = """panel => [...panel.querySelectorAll('.gns-chart')].map(f => {
  const t = f.querySelector('.mainheading'); const a = t.getBoundingClientRect(), b = f.getBoundingClientRect();
  return [t.textContent, a.left, a.right, b.left, b.right] })"""


@pytest.mark.parametrize("theme, width", [("light", 800), ("dark", 800), ("light", 1280)])
def test_layout_and_contrast_with_the_file_browser_open(lab, browser, theme, width):
    """800 and 1280 px with the file browser open, light and dark: the charts wrap, no chart title is clipped,
    the result area (headline, details open, trade-off table) never scrolls sideways, and every text and every
    status colour has WCAG AA contrast against what is behind it."""
    from playwright.sync_api import expect

    page = _open(browser, lab, "layout.ipynb", width=width, height=1000)
    # the theme is a user setting that outlives the page: set it both ways
    _menu(page, "Settings", "Theme", "JupyterLab Dark" if theme == "dark" else "JupyterLab Light")
    expect(page.locator("body")).to_have_attribute("data-jp-theme-light", str(theme == "light").lower(),
                                                   timeout=30_000)
    _open_file_browser(page)
    for i in range(3):
        _run_cell(page, i)
    panel = page.locator(".gns-widget")
    expect(panel.locator(".gns-status")).to_contain_text("finished", timeout=120_000)
    expect(panel.locator(".gns-headline")).to_contain_text("Train with batch size")
    # read now, while the panel is in view: JupyterLab may stop rendering it once later cells scroll it away
    advised = re.search(r"Train with batch size (\d+)", panel.locator(".gns-headline").text_content()).group(1)
    panel.locator(".gns-details .jupyter-widget-Collapse-header, .gns-details .lm-TabBar-tab, "
                  ".gns-details .p-Collapse-header").first.click()  # open the details
    expect(panel.locator(".gns-result table.gns-tradeoff")).to_be_visible()
    panel.scroll_into_view_if_needed()
    area = panel.evaluate("e => { const r = e.getBoundingClientRect(); return [e.scrollWidth, e.clientWidth, "
                          "[...e.querySelectorAll('*')].filter(c => c.getBoundingClientRect().right > r.right - 6)"
                          ".map(c => c.tagName + '.' + c.getAttribute('class') + ' ' + c.getBoundingClientRect().right"
                          " + '>' + r.right).slice(0, 6)] }")
    assert area[0] <= area[1] + 1, f"the panel scrolls sideways: {area}"
    assert panel.evaluate(OVERFLOW_JS) == []
    box = panel.bounding_box()
    for name in ("noise", "scale", "noise-scale"):
        chart = panel.locator(f".gns-chart-{name}")
        b = chart.bounding_box()
        assert b["width"] >= 200 and box["x"] - 1 <= b["x"] and b["x"] + b["width"] <= box["x"] + box["width"] + 1
        chart.scroll_into_view_if_needed()
        expect(chart).to_be_in_viewport()
    for title, left, right, fig_left, fig_right in panel.evaluate(TITLES_JS):
        assert fig_left - 1 <= left and right <= fig_right + 1, f"title {title!r} clipped: {left, right} in " \
                                                                f"{fig_left, fig_right}"
    _dismiss_news(page)
    panel.screenshot(path=str(ARTIFACTS / f"layout_{theme}_{width}.png"))
    # every status colour, whichever the run ended with: one span of each kind in the status line
    panel.locator(".gns-status span").evaluate(
        "e => { for (const k of ['idle', 'running', 'finished', 'warn', 'error']) { const s = "
        "document.createElement('span'); s.className = 'gns-c-' + k + ' gns-probe'; s.textContent = ' ' + k; "
        "e.parentElement.appendChild(s) } }")
    panel.locator(".gns-num-it input").fill("3")
    panel.locator(".gns-num-it input").press("Enter")
    expect(panel.locator(".gns-error")).to_contain_text("num_it must be")
    for selector in (".gns-status span", ".gns-answer", ".gns-help span", ".gns-error span", ".gns-bs",
                     ".gns-progress-label",
                     ".gns-result td", ".gns-chart .axis text", ".gns-chart .mainheading"):
        found = page.evaluate(CONTRAST_JS, f".gns-widget {selector}")
        assert found, selector
        for ratio, text in found:
            assert ratio >= 4.5, f"{theme} {selector} {text!r}: contrast {ratio:.2f}"
    assert len(page.evaluate(CONTRAST_JS, ".gns-widget .gns-probe")) == 5
    panel.locator(".gns-num-it input").fill("300")
    panel.locator(".gns-num-it input").press("Enter")
    _run_cell(page, 3)  # Apply from code: the loader comes back with the new batch size
    expect(_cell(page, 3).locator(".jp-OutputArea")).to_contain_text(f"batch size after apply: {advised}",
                                                                      timeout=30_000)
    _shutdown(page)


# WCAG contrast of each matched element's text colour (fill for SVG) against its first opaque ancestor background
CONTRAST_JS = """sel => {
  const rgb = s => (s.match(/[\\d.]+/g) || []).map(Number);
  const f = c => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4 };
  const lum = ([r, g, b]) => 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  const bg = e => { for (; e; e = e.parentElement) { const c = rgb(getComputedStyle(e).backgroundColor);
                      if (c.length === 3 || c[3] > 0.5) return c.slice(0, 3) } return [255, 255, 255] };
  return [...document.querySelectorAll(sel)].filter(e => e.textContent.trim()).map(e => {
    const s = getComputedStyle(e); const fg = rgb(e instanceof SVGElement ? s.fill : s.color).slice(0, 3);
    const [a, b] = [lum(fg), lum(bg(e))].sort((x, y) => y - x);
    return [(a + 0.05) / (b + 0.05), e.textContent.trim().slice(0, 40)] })
}"""


def _line_paths(figure, timeout: float = 10.0, pattern: re.Pattern = MANY_POINTS) -> list[str]:
    "The `d` of every bqplot line in `figure`, once one matches `pattern` (SVG updates lag the widget state a little)."
    deadline = time.monotonic() + timeout
    while True:
        ds = figure.locator("path.line").evaluate_all("ps => ps.map(p => p.getAttribute('d') || '')")
        if any(pattern.match(d) for d in ds) or time.monotonic() > deadline:
            return ds
        time.sleep(0.2)


def _small_copy(src: Path, dst: Path, width: int = 900) -> None:
    "A palette PNG at most `width` wide for the README (well under 200 KB)."
    from PIL import Image

    img = Image.open(src).convert("RGB")
    if img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    dst.parent.mkdir(exist_ok=True)
    img.quantize(colors=128).save(dst, optimize=True)
    assert dst.stat().st_size < 200_000
