"""The panel in a real frontend: JupyterLab in headless Chromium runs the quickstart and clicks Apply.

This is the only test that sees what the user sees: the widget messages sent from the
worker thread must reach the browser and render as charts, a full progress bar and the
suggestion. Skipped without Chromium or playwright, except in CI where it must run.
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


@pytest.fixture
def lab(tmp_path):
    "A JupyterLab server on a free port, rooted in a temp dir with the quickstart up to (not including) Apply."
    _require_browser()
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    first_apply = next(i for i, c in enumerate(nb.cells) if "apply" in c.metadata.get("tags", []))
    nb.cells = nb.cells[:first_apply]  # the test clicks Apply itself
    root = tmp_path / "root"
    root.mkdir()
    nbformat.write(nb, root / "quickstart.ipynb")
    port = _free_port()
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTERLAB_WORKSPACES_DIR":
           str(tmp_path / "workspaces"), "JUPYTER_CONFIG_DIR": str(tmp_path / "config")}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
           "--IdentityProvider.token=", "--ServerApp.password=", f"--ServerApp.root_dir={root}",
           "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers often run as root
        cmd.append("--allow-root")
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "jupyter.log", "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        yield from _serve(server, url, tmp_path / "jupyter.log")


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


def test_quickstart_panel_in_jupyterlab(lab):
    from playwright.sync_api import expect, sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1400})
            page.goto(f"{lab}/lab/tree/quickstart.ipynb?reset")
            expect(page.locator("#jp-main-statusbar")).to_contain_text("Idle", timeout=60_000)
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()

            panel = page.locator(".gns-widget")
            expect(panel.locator(".gns-status")).to_contain_text("finished", timeout=120_000)
            panel.scroll_into_view_if_needed()
            paths = {name: _line_paths(panel.locator(f".gns-chart-{name}"))
                     for name in ("noise", "scale", "noise-scale")}
            assert all(any(MANY_POINTS.match(d) for d in ds) for ds in paths.values()), paths
            assert any(SEGMENT.match(d) for d in paths["noise-scale"]), "no suggested-bs line"
            bar = panel.locator(".gns-progress .progress-bar")
            assert bar.evaluate("e => e.style.width") == "100%"
            expect(panel.locator(".gns-progress-label")).to_contain_text("iteration 1000/1000")
            expect(panel.locator(".gns-result")).to_contain_text("suggested batch size")

            panel.locator("button.gns-apply").click()
            expect(panel.locator(".gns-status")).to_contain_text("train batch size 32 →", timeout=30_000)
            expect(panel.locator("button.gns-apply")).to_be_disabled()
            shot = ARTIFACTS / "panel.png"
            panel.screenshot(path=str(shot))
        finally:
            browser.close()
    # the README's screenshot is refreshed on request only, so a test run leaves the tree clean
    readme_copy = ROOT / "docs" / "panel.png" if os.environ.get("GNS_UPDATE_SCREENSHOT") else None
    _small_copy(shot, readme_copy or ARTIFACTS / "panel_small.png")


def _line_paths(figure, timeout: float = 10.0) -> list[str]:
    "The `d` of every bqplot line in `figure`, once they are drawn (SVG updates lag the widget state a little)."
    deadline = time.monotonic() + timeout
    while True:
        ds = figure.locator("path.line").evaluate_all("ps => ps.map(p => p.getAttribute('d') || '')")
        if any(MANY_POINTS.match(d) for d in ds) or time.monotonic() > deadline:
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
