"""JupyterLab in a real browser (Debian's chromium through Playwright), on a temporary copy of the repository.

After the session's smoke DAG (conftest ``smoke_dag``, one `make smoke`) is copied into the copy's default output
folders (mtimes kept; `make -n` must then run nothing there), notebook 02 and the explorer (07) are opened with only `profile` edited in
their parameters cell, run through the UI (Run All), checked (no cell errored, a figure / the explorer's
result tables rendered), screenshotted and saved. Then: `git status` is clean, `make -n` would run nothing,
and every file make wrote is byte-identical (the interactive runs wrote under results/smoke/interactive/).

Runs where /usr/bin/chromium and the `playwright` package exist (`.ci/run` installs both); never
`playwright install`.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
pytestmark = [pytest.mark.slow, pytest.mark.browser,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium)")]
TOKEN = "cxr-browser-test"


def _copy_repo(dst: Path) -> None:
    """The working tree's tracked and untracked-but-not-ignored files (what a user has), with mtimes."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    (dst / ".venv").symlink_to(REPO / ".venv")


def _hashes(root: Path, folders: list[str]) -> dict[str, str]:
    out = {}
    for folder in folders:
        for p in sorted((root / folder).rglob("*")):
            if p.is_file() and "interactive" not in p.relative_to(root).parts:
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, smoke_dag):
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (the browser comes from Debian)")
    tmp = tmp_path_factory.mktemp("lab")
    repo = tmp / "repo"
    _copy_repo(repo)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CXR_", "JUPYTER", "MAKE", "MFLAGS"))}
    env.update(PYTHONPATH=str(repo), HF_HUB_OFFLINE="1", JUPYTER_CONFIG_DIR=str(tmp / "jcfg"),
               CXR_PROFILE="smoke",  # the explorer takes its profile from here; 02's is typed into its cell
               JUPYTER_RUNTIME_DIR=str(tmp / "jrt"), IPYTHONDIR=str(tmp / "ipy"), CUDA_VISIBLE_DEVICES="")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.org"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "copy"]):
        subprocess.run(git + cmd, cwd=repo, check=True, env=env)
    py = str(REPO / ".venv" / "bin" / "python")
    subprocess.run([py, "-m", "cxrlib.nbclean", "install-git"], cwd=repo, check=True, env=env)
    subprocess.run([py, "-m", "cxrlib.nbclean", "install-jupyter", "--config-dir", str(tmp / "jcfg")], cwd=repo,
                   check=True, env=env, capture_output=True)
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True,
                          env=env).stdout == ""
    for folder in ("data", "build", "results", "figures"):  # what `make smoke` wrote, as if it ran in the copy
        shutil.copytree(smoke_dag[0] / folder, repo / folder, symlinks=True, dirs_exist_ok=True)
    dry = subprocess.run(["make", "--no-print-directory", "-n", "dag", "PROFILE=smoke"], cwd=repo, env=env,
                         capture_output=True, text=True)
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    assert not re.findall(r">> smoke: ([^\"\n]+)", dry.stdout), f"the copied smoke DAG is stale:\n{dry.stdout[-2000:]}"
    port = _free_port()
    server = subprocess.Popen([py, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
                               f"--IdentityProvider.token={TOKEN}", "--LabApp.expose_app_in_browser=True",
                               "--allow-root", "--ServerApp.open_browser=False",
                               f"--ServerApp.root_dir={repo}", "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
                              cwd=repo, env=env, stdout=open(tmp / "lab.log", "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while True:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=2)
            break
        except OSError:
            if time.monotonic() - t0 > 120 or server.poll() is not None:
                server.kill()
                raise AssertionError("JupyterLab did not start:\n" + (tmp / "lab.log").read_text()[-3000:]) from None
            time.sleep(0.5)
    before = _hashes(repo, ["results", "figures", "build", "data/processed", "data/embeddings", "data/models"])
    try:
        yield {"repo": repo, "base": base, "env": env, "tmp": tmp, "before": before}
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


STATE_JS = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const cells = w.content.widgets.filter(c => c.model.type === 'code');
  const errors = [], stderr = [];
  for (const c of cells) for (const o of c.model.outputs.toJSON()) {
    if (o.output_type === 'error') errors.push(o.ename + ': ' + o.evalue);
    if (o.output_type === 'stream' && o.name === 'stderr') stderr.push(String(o.text).slice(0, 300));
  }
  const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
  const text = cells.map(c => c.model.outputs.toJSON().map(o => String(o.text || '')).join('')).join('');
  const node = w.node;
  return {counts: cells.map(c => c.model.executionCount), errors, stderr, text,
          images: node.querySelectorAll('.jp-OutputArea-output img').length,
          tables: node.querySelectorAll('table.cxr-results').length,
          thumbs: node.querySelectorAll('table.cxr-results img').length,
          status: kernel ? kernel.status : 'none', first: cells[0].model.sharedModel.getSource().split('\\n')[0]};
}"""


def _open(page, base: str, path: str) -> None:
    page.goto(f"{base}/lab/tree/{path}?reset&token={TOKEN}")  # reset: no tabs restored from an earlier session
    page.wait_for_function("""() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
        return w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel
               && w.sessionContext.session.kernel.status === 'idle' && w.content.widgets.length > 0; }""",
                           timeout=120_000)


def _set_profile(page, profile: str) -> None:
    """Type the first line of the parameters cell in its editor, as a user would."""
    widget = page.evaluate("() => window.jupyterapp.shell.currentWidget.id")
    editor = page.locator(f"[id='{widget}'] .jp-CodeCell .cm-content").first
    editor.click()
    page.keyboard.press("Control+Home")
    page.keyboard.press("Shift+End")
    page.keyboard.type(f'profile = "{profile}')
    if page.evaluate(STATE_JS)["first"] == f'profile = "{profile}':  # the editor did not close the quote itself
        page.keyboard.type('"')
    page.keyboard.press("Escape")
    first = page.evaluate(STATE_JS)["first"]
    assert first == f'profile = "{profile}"', f"the parameters cell's first line reads {first!r}"


def _run_all(page, timeout_s: float = 420) -> dict:
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    t0 = time.monotonic()
    while True:
        state = page.evaluate(STATE_JS)
        if state["errors"] or (state["status"] == "idle" and all(c is not None for c in state["counts"])):
            return state
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"Run All did not finish in {timeout_s} s: {state}")
        time.sleep(1.0)


def _save(page) -> None:
    page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
    page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.context.model.dirty", timeout=30_000)


def test_notebooks_run_in_jupyterlab_and_leave_no_trace(lab):
    from playwright.sync_api import sync_playwright

    repo, shots = lab["repo"], lab["tmp"] / "screenshots"
    shots.mkdir()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            # 02: `profile = "smoke"` typed into its parameters cell, Run All; the edit is undone before saving
            _open(page, lab["base"], "notebooks/02_train.ipynb")
            committed = page.evaluate(STATE_JS)["first"]
            _set_profile(page, "smoke")
            state = _run_all(page)
            page.evaluate("() => { const imgs = window.jupyterapp.shell.currentWidget.node"
                          ".querySelectorAll('.jp-OutputArea-output img'); if (imgs.length) imgs[0].scrollIntoView(); }")
            page.screenshot(path=str(shots / "02_train.png"), full_page=True)
            assert not state["errors"], state["errors"]
            assert not [s for s in state["stderr"] if "Traceback" in s or "Warning" in s], state["stderr"]
            assert state["images"] >= 1, "no figure rendered"
            assert "interactive run" in state["text"], "the run did not say it is interactive"
            _set_profile(page, re.match(r'profile = "(.*)"', committed).group(1))
            _save(page)
            # the explorer, opened and run as it is (its profile from CXR_PROFILE): two models' result tables
            _open(page, lab["base"], "notebooks/07_explore.ipynb")
            state = _run_all(page)
            assert not state["errors"], state["errors"]
            page.wait_for_function("() => window.jupyterapp.shell.currentWidget.node"
                                   ".querySelectorAll('table.cxr-results').length >= 2", timeout=60_000)
            page.evaluate("() => document.querySelector(\"[id='\" + window.jupyterapp.shell.currentWidget.id + "
                          "\"'] table.cxr-results\").scrollIntoView()")
            page.screenshot(path=str(shots / "07_explore.png"), full_page=True)
            state = page.evaluate(STATE_JS)
            assert state["tables"] == 2, f"{state['tables']} result tables (one per model expected)"
            assert state["thumbs"] >= 2, "no thumbnails"
            _save(page)
        finally:
            browser.close()
    assert (shots / "02_train.png").stat().st_size > 10_000 and (shots / "07_explore.png").stat().st_size > 10_000
    env = lab["env"]
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, env=env)
    assert status.stdout == "", f"the saved notebooks changed git status:\n{status.stdout}"
    dry = subprocess.run(["make", "--no-print-directory", "-n", "dag", "PROFILE=smoke"], cwd=repo, env=env,
                         capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert not re.findall(r">> smoke: ([^\"\n]+)", dry.stdout), f"make would rerun:\n{dry.stdout[-2000:]}"
    after = _hashes(repo, ["results", "figures", "build", "data/processed", "data/embeddings", "data/models"])
    assert after == lab["before"], "make's outputs changed: " + str(
        sorted(k for k in set(after) | set(lab["before"]) if after.get(k) != lab["before"].get(k))[:10])
    interactive = list((repo / "results" / "smoke" / "interactive").rglob("projector.pt"))
    assert interactive, "the interactive 02 run wrote no projector under results/smoke/interactive/"
    print(f"screenshots: {shots}", file=sys.stderr)
