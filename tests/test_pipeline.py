"""End to end: the whole DAG on the smoke profile through make + papermill, then staleness.

The session's one run of `make smoke` (conftest ``smoke_dag``) in a temporary CXR_WORKDIR; the tests
assert on the files each node wrote (notebooks 00 and 02 here too, instead of a papermill run each),
on make's progress output and summary, and that changing one loss weight marks only the dependent
nodes stale.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, run_make

pytestmark = pytest.mark.slow


def _make(args: list[str], workdir: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run_make(args, workdir, check)


@pytest.fixture(scope="module")
def smoke_run(smoke_dag):
    return smoke_dag


def test_smoke_dag_writes_every_output(smoke_run):
    work, _ = smoke_run
    res, fig, build = work / "results" / "smoke", work / "figures" / "smoke", work / "build" / "smoke"
    for nb in ("00_adapt_backbone", "01_data_prep", "02_train", "03_retrieval_eval", "04_embedding_viz",
               "05_loss_ablation"):
        assert (build / f"{nb}.ipynb").is_file(), f"{nb} did not run"
        assert not (build / f"{nb}.run.ipynb").exists()
    assert (work / "data" / "processed" / "synthetic.parquet").is_file()
    table = pd.read_csv(res / "retrieval.csv")
    assert {"model", "direction", "metric", "k", "value", "ci_low", "ci_high", "n"} <= set(table.columns)
    assert set(table["direction"]) == {"image_to_text", "text_to_image"}
    assert (res / "retrieval.md").is_file() and (res / "retrieval.tex").is_file()
    from cxrlib import dag

    assert (res / "models" / dag.plan("smoke", environ={}).run / "projector.pt").is_file()
    assert (res / "ablation.csv").is_file()
    manifest = json.loads((res / "run_manifest.json").read_text())
    assert manifest["profile"] == "smoke" and manifest["git"]["commit"]
    assert {"01_data_prep", "02_train"} <= set(manifest["node_seconds"])
    assert manifest["parameters"]["02_train"]["w_supcon"] >= 0
    pngs = list(fig.glob("*.png"))
    assert len(pngs) >= 6 and all(p.with_suffix(".pdf").is_file() for p in pngs)


def test_each_node_shows_the_figures_it_saved(smoke_run):
    """A node's notebook shows each saved figure as the PNG file itself (plots.show_saved), not a fresh
    rendering: every image in the executed notebooks is the bytes of one saved PNG, and each PNG is shown."""
    import base64

    work, _ = smoke_run
    saved = {p.read_bytes(): p.name for p in (work / "figures" / "smoke").glob("*.png")}
    shown = []
    for nb_path in sorted((work / "build" / "smoke").glob("0*.ipynb")):
        for cell in json.loads(nb_path.read_text())["cells"]:
            for out in cell.get("outputs", []):
                if "image/png" in out.get("data", {}):
                    data = base64.b64decode(out["data"]["image/png"])
                    assert data in saved, f"{nb_path.name}: a figure shown that is not a saved PNG"
                    shown.append(saved[data])
    assert sorted(shown) == sorted(saved.values())


def _would_run(work: Path, *extra: str) -> set[str]:
    out = _make(["-n", "dag", "PROFILE=smoke", *extra], work).stdout
    return set(re.findall(r'>> smoke: ([^"\n]+)', out))


def test_up_to_date_after_run(smoke_run):
    work, _ = smoke_run
    assert _would_run(work) == set()


def test_loss_weight_reruns_only_dependent_nodes(smoke_run, tmp_path):
    work = tmp_path / "work"  # make -n with other settings rewrites the params files: on a copy (mtimes kept)
    shutil.copytree(smoke_run[0], work, symlinks=True)
    ran = _would_run(work, "W_SUPCON=0.5")
    assert {"02_train", "03_retrieval_eval", "04_embedding_viz", "05_loss_ablation"} <= ran
    assert not ran & {"01_data_prep", "00_adapt_backbone"}
    assert not any(r.startswith("embed") for r in ran)


def _dry_run(tmp_path: Path, *args: str) -> tuple[list[str], str]:
    """``make -n`` in a fresh work folder: the nodes it would run, in order, and the inner make's command."""
    out = _make(["-n", *args], tmp_path).stdout
    inner = next(ln for ln in out.splitlines() if "cxrlib.lock run" in ln and " dag " in ln)
    return re.findall(r'>> smoke: ([^"\n]+)', out), inner


def test_jobs_run_the_same_nodes(tmp_path):
    """JOBS=2 (the default) runs nodes side by side: the inner make gets -j2, JOBS=1 gets -j1, a -jN of the
    user's own is left to make's jobserver; each lists the same nodes in the same order, and the settings
    validator takes JOBS (it is no setting)."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    nodes, inner = _dry_run(tmp_path / "a", "smoke")
    serial, inner1 = _dry_run(tmp_path / "b", "smoke", "JOBS=1")
    own, inner3 = _dry_run(tmp_path / "c", "-j3", "smoke", "JOBS=4")
    assert nodes == serial == own and {"01_data_prep", "02_train", "05_loss_ablation"} <= set(nodes)
    assert " -j2 dag " in inner and " -j1 dag " in inner1 and " -j" not in inner3


@pytest.mark.parametrize("jobs", ["0", "two", ""])
def test_bad_jobs_stops_make_with_one_line(tmp_path, jobs):
    out = _make(["-n", "smoke", f"JOBS={jobs}"], tmp_path, check=False)
    assert out.returncode != 0 and f"JOBS={jobs}: " in out.stderr and "whole number >= 1" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "build").exists()


def test_bad_weight_stops_make_with_one_line(tmp_path):
    out = _make(["dag", "PROFILE=smoke", "W_CLIP=-1"], tmp_path, check=False)
    assert out.returncode != 0
    assert "w_clip must be a number >= 0" in out.stderr
    assert not (tmp_path / "data" / "processed").exists()


def test_unknown_profile_stops_make(tmp_path):
    out = _make(["dag", "PROFILE=nope"], tmp_path, check=False)
    assert out.returncode != 0 and "unknown profile" in out.stderr


def test_paper_offline_preflight_names_make_demo(tmp_path):
    env_py = sys.executable
    out = subprocess.run([env_py, "-m", "cxrlib.preflight", "--profile", "paper"], cwd=REPO,
                         env={**os.environ, "CXR_WORKDIR": str(tmp_path), "HF_HUB_OFFLINE": "1",
                              "HF_HOME": str(tmp_path / "hf")}, capture_output=True, text=True)
    if out.returncode == 0:
        pytest.skip("this machine reaches NLM and the hub, so the offline stop cannot be shown here")
    assert "make demo" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_make_shows_progress_and_a_summary(smoke_run):
    _, out = smoke_run
    text = out.stdout + out.stderr
    for node in ("01_data_prep", "00_adapt_backbone", "02_train", "03_retrieval_eval"):
        assert re.search(rf"<< {node} done in \d+", text), f"no end line for {node}"
        assert f"   [{node}] cell " in text
    # the summary is the end of stdout (node progress goes to stderr, so it is not part of the screen)
    summary = out.stdout[out.stdout.index("== make smoke:"):]
    assert re.search(r"== make smoke: \d+ node\(s\) ran", summary) and "02_train" in summary
    assert "results: " in summary and "figures: " in summary
    assert len(summary.splitlines()) <= 30  # one screen


def test_smoke_runs_nodes_side_by_side_with_readable_output(smoke_run):
    """make smoke runs JOBS=2 nodes at once: after 02_train two of 03/04/05 run before either ends (a node's
    status lines start before another's end line); papermill's per-node chatter is gone from make's output."""
    _, out = smoke_run
    text = out.stdout + out.stderr
    # node progress is on stderr, in order: a node is running from its first status line to its end line
    running, overlapped, order = set(), False, []
    for line in out.stderr.splitlines():
        if (m := re.match(r"   \[(\d\d_\w+)\] cell ", line)) and m.group(1) not in running:
            overlapped |= bool(running)
            running.add(m.group(1))
            order.append(line)
        elif m := re.match(r"<< (\d\d_\w+) (done|FAILED)", line):
            running.discard(m.group(1))
            order.append(line)
    assert {f"<< {n} done" for n in ("03_retrieval_eval", "04_embedding_viz", "05_loss_ablation")} \
        <= {" ".join(ln.split()[:3]) for ln in order}
    assert overlapped, order
    for noise in ("Input Notebook:", "Output Notebook:", "Working directory:", "Executing notebook with kernel",
                  "without encryption"):
        assert noise not in text, noise


def test_notebook_00_outputs(smoke_run):
    """Notebook 00 as the smoke DAG ran it (was a papermill run of its own in test_adapt.py)."""
    from cxrlib import adapt as A
    from cxrlib import config
    from cxrlib.backbones import load_backbone

    work, _ = smoke_run
    params = config.resolve_params("smoke", "00_adapt_backbone", {"dataset": "synthetic", "backbone": "tiny"})
    assert params["adapt_epochs"] >= 1 and "w_supcon" not in params  # projector weights never reach node 00
    ckpt = work / "data" / "models" / "synthetic" / "tiny-adapted.pt"
    run = A.read_run(ckpt)
    hist = pd.read_csv(work / "results" / "smoke" / "adapt_history.csv")
    assert len(hist) == len(run.history) == params["adapt_epochs"] + 1
    assert run.config["adapt"]["lr"] == params["adapt_lr"] and run.config["adapt"]["batch_size"] == 16
    assert (work / "figures" / "smoke" / "adapt_curves.png").is_file()
    assert (work / "figures" / "smoke" / "adapt_curves.pdf").is_file()
    load_backbone("tiny", checkpoint=ckpt)


def test_notebook_02_outputs(smoke_run):
    """Notebook 02 as the smoke DAG ran it: the run folder named by cxrlib.dag, its recipe, the curves."""
    import nbformat

    from cxrlib import dag

    work, _ = smoke_run
    plan = dag.plan("smoke", environ={})
    run_dir = work / "results" / "smoke" / "models" / plan.run
    assert {p.name for p in run_dir.iterdir()} >= {"projector.pt", "history.csv", "config.json", "metrics.json"}
    cfg = json.loads((run_dir / "config.json").read_text())
    want = plan.params["02_train"]
    assert cfg["run"] == plan.run and all(cfg[k] == want[k] for k in ("epochs", "width", "batch_size"))
    assert plan.run.startswith(f"bce{cfg['w_bce']:g}-supcon{cfg['w_supcon']:g}-clip{cfg['w_clip']:g}-")
    assert cfg["dataset"] == "synthetic" and cfg["backbone"] == "tiny-adapted"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"frozen_val_p5", "best_metric", "best_epoch"} <= set(metrics)
    assert list((work / "figures" / "smoke").glob("loss_curves_*.png"))
    executed = nbformat.read(work / "build" / "smoke" / "02_train.ipynb", as_version=4)
    assert any("SMOKE TEST" in "".join(o.get("text", "")) for c in executed.cells for o in c.get("outputs", []))
