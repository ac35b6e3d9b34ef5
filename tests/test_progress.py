"""Progress output of make's notebook nodes: throttled status lines, tqdm widget bars, the summary."""

from __future__ import annotations

import io
import json
import re
from datetime import datetime, timedelta, timezone

import pytest

from cxrlib import progress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_log_output_is_throttled():
    out, clock = io.StringIO(), Clock()
    rep = progress.NodeReporter("02_train", 10, stream=out, interval=15, clock=clock, tty=False)
    rep.cell_started(1)
    for i in range(1000):  # 1000 bar updates over 100 s
        clock.t = i * 0.1
        rep.bar_updated(f"epochs {i}/1000")
    rep.finished(True)
    lines = out.getvalue().splitlines()
    assert 6 <= len(lines) <= 9  # one every 15 s, plus the end line
    assert lines[0].startswith("   [02_train] cell 1/10")
    assert lines[-1] == "<< 02_train done in 1 min 40 s (10 code cells)"


def test_failed_node_says_so():
    out = io.StringIO()
    rep = progress.NodeReporter("03_eval", 3, stream=out, clock=Clock(), tty=False)
    rep.finished(False)
    assert "<< 03_eval FAILED" in out.getvalue()


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("flags, parallel", [
    ("", False), (" -j1 --no-print-directory", False), ("n --no-print-directory", False),
    (" -j2 --jobserver-auth=3,4 --no-print-directory", True), (" -j --no-print-directory", True),
    (" --jobserver-auth=fifo:/tmp/x", True), (" -j1 -- JOBS=2 NOTE=-j4", False)])
def test_parallel_make_reads_makeflags(flags, parallel):
    assert progress.parallel_make({"MAKEFLAGS": flags}) is parallel


def test_terminal_keeps_one_line_under_a_serial_make(monkeypatch):
    monkeypatch.setenv("MAKEFLAGS", " -j1")
    out, clock = _Terminal(), Clock()
    rep = progress.NodeReporter("02_train", 4, stream=out, clock=clock)
    rep.cell_started(1)
    clock.t = 1
    rep.cell_started(2)
    rep.finished(True)
    assert rep.tty and out.getvalue().count("\n") == 1 and out.getvalue().count("\r") == 3


def test_terminal_gets_node_lines_under_a_parallel_make(monkeypatch):
    """Two nodes at once (make -j2) must not rewrite one shared status line: throttled lines, each whole."""
    monkeypatch.setenv("MAKEFLAGS", " -j2 --jobserver-auth=3,4")
    out, clock = _Terminal(), Clock()
    rep = progress.NodeReporter("03_retrieval_eval", 4, stream=out, interval=15, clock=clock)
    for t in range(40):
        clock.t = t
        rep.bar_updated(f"bootstrap {t}/40")
    rep.finished(True)
    assert not rep.tty
    lines = out.getvalue().split("\n")
    assert lines[-1] == "" and 3 <= len(lines) - 1 <= 5  # one line per 15 s, plus the end line
    # each line clears what another job's \r bar left on the terminal, then is one whole line
    assert all(ln.startswith("\r\033[K") and ln.count("\r") == 1 for ln in lines[:-1])
    assert lines[0].startswith("\r\033[K   [03_retrieval_eval] cell 0/4")
    assert lines[-2] == "\r\033[K<< 03_retrieval_eval done in 39 s (4 code cells)"


def _tqdm_messages(box="b", left="l", bar="p", right="r"):
    """The widget states tqdm.notebook sends: three children opened, then the HBox, then updates."""
    return [(left, {"_model_name": "HTMLModel", "value": ""}),
            (bar, {"_model_name": "FloatProgressModel", "value": 0, "max": 50}),
            (right, {"_model_name": "HTMLModel", "value": ""}),
            (box, {"_model_name": "HBoxModel", "children": [f"IPY_MODEL_{left}", f"IPY_MODEL_{bar}",
                                                            f"IPY_MODEL_{right}"]}),
            (left, {"value": "adapt offline:  24%"}),
            (bar, {"value": 12}),
            (right, {"value": "12/50\u2007[00:10&lt;00:31,  1.20it/s, loss=3.2]"})]


def test_widget_bars_read_tqdm_messages():
    bars = progress.WidgetBars()
    texts = [bars.update(cid, state) for cid, state in _tqdm_messages()]
    assert texts[:4] == [None, None, None, None]
    assert texts[-1] == "adapt offline: 24% 12/50 [00:10<00:31, 1.20it/s, loss=3.2]"


def test_text_bar_frames():
    chunk = "\rtrain:  10%|\u2588         | 5/50 [00:01<00:09,  4.9it/s]\rtrain:  20%|\u2588\u2588        | 10/50 [00:02<00:08,  4.9it/s]"
    assert progress.tqdm_text_frame(chunk) == "train: 20% 10/50 [00:02<00:08, 4.9it/s]"
    assert progress.tqdm_text_frame("encode: 300it [00:03, 99.1it/s]\n") == "encode: 300it [00:03, 99.1it/s]"
    assert progress.tqdm_text_frame("kept epoch 8 of 10\n") is None


def test_widgets_that_are_not_bars_are_ignored():
    bars = progress.WidgetBars()
    msgs = [("a", {"_model_name": "HTMLModel", "value": "x"}), ("b", {"_model_name": "ButtonModel"}),
            ("c", {"_model_name": "HTMLModel", "value": "y"}),
            ("h", {"_model_name": "HBoxModel", "children": ["IPY_MODEL_a", "IPY_MODEL_b", "IPY_MODEL_c"]}),
            ("c", {"value": "changed"})]
    assert all(bars.update(cid, s) is None for cid, s in msgs)


def test_summary_lists_only_nodes_of_this_run(tmp_path):
    now = datetime.now(timezone.utc)
    log = tmp_path / "timings.jsonl"
    recs = [("01_data_prep", 60.0, now - timedelta(hours=1)), ("02_train", 20.5, now), ("04_viz", 95.0, now)]
    log.write_text("".join(json.dumps({"node": n, "seconds": s, "finished": t.isoformat(timespec="seconds")}) + "\n"
                           for n, s, t in recs))
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "retrieval.csv").write_text("x")
    since = (now - timedelta(minutes=5)).isoformat(timespec="seconds")
    text = progress.summary(log, since, tmp_path / "res", tmp_path / "fig", "make demo")
    assert "2 node(s) ran" in text and "02_train" in text and "04_viz" in text and "01_data_prep" not in text
    assert "1 min 35 s" in text and "sum" in text and str(tmp_path / "res") in text
    assert "parallel" not in text  # 1 min 56 s of nodes in 5 min of wall: one after another
    later = (now + timedelta(minutes=5)).isoformat(timespec="seconds")
    assert "nothing ran" in progress.summary(log, later, tmp_path / "res", tmp_path / "fig")


def test_summary_wall_time_under_parallel_nodes(tmp_path):
    """Nodes run at once: the header gives the real wall time (since the DAG started), not the nodes' sum."""
    now = datetime.now(timezone.utc)
    log = tmp_path / "timings.jsonl"
    log.write_text("".join(json.dumps({"node": n, "seconds": 50.0, "finished": now.isoformat(timespec="seconds")})
                           + "\n" for n in ("03_retrieval_eval", "04_embedding_viz", "05_loss_ablation")))
    since = (now - timedelta(seconds=60)).isoformat(timespec="seconds")
    text = progress.summary(log, since, tmp_path / "res", tmp_path / "fig", "make demo")
    head = text.splitlines()[0]
    assert "3 node(s) ran" in head and re.search(r"(60|61) s wall", head), head
    sum_line = next(ln for ln in text.splitlines() if ln.lstrip().startswith("sum"))
    assert "2 min 30 s" in sum_line and "parallel" in sum_line


@pytest.mark.slow
def test_runner_reports_cells_and_bars(tmp_path, capfd):
    import nbformat

    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "cxr-retrieval", "language": "python",
                                                           "display_name": "cxr"}})
    first = nbformat.v4.new_code_cell("n = 3")
    first.metadata["tags"] = ["parameters"]
    nb.cells = [first, nbformat.v4.new_code_cell(
        "import time\nfrom tqdm.auto import tqdm\nfor _ in tqdm(range(n), desc='epochs'):\n    time.sleep(0.3)")]
    nbformat.write(nb, tmp_path / "in.ipynb")
    code = progress.run("t-node", ["-k", "cxr-retrieval", "--no-progress-bar", "-p", "n", "8",
                                   str(tmp_path / "in.ipynb"), str(tmp_path / "out.ipynb")], interval=0.2)
    err = capfd.readouterr().err
    assert code == 0
    assert "[t-node] cell" in err and "epochs:" in err and "/8 [" in err and "<< t-node done in" in err
    # papermill's per-node INFO lines and ipykernel's TCP warning are not make's output any more
    for noise in ("Input Notebook:", "Output Notebook:", "Working directory:", "Executing notebook with kernel",
                  "without encryption"):
        assert noise not in err, noise


@pytest.mark.slow
def test_runner_still_shows_a_failing_cell(tmp_path, capfd):
    import nbformat

    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "cxr-retrieval", "language": "python",
                                                           "display_name": "cxr"}})
    nb.cells = [nbformat.v4.new_code_cell("raise ValueError('no such split: tset')")]
    nbformat.write(nb, tmp_path / "in.ipynb")
    code = progress.run("bad-node", ["-k", "cxr-retrieval", "--no-progress-bar", str(tmp_path / "in.ipynb"),
                                     str(tmp_path / "out.ipynb")])
    err = capfd.readouterr().err
    assert code == 1 and "<< bad-node FAILED" in err
    assert "error in bad-node: PapermillExecutionError" in err and "no such split: tset" in err
