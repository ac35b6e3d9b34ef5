"""Progress you can see while ``make`` runs the notebooks, and a one-screen summary at the end.

``python -m cxrlib.progress run --node NAME -- <papermill arguments>`` runs papermill with the
``cxr-progress`` engine: papermill's own nbclient engine plus a reporter that shows the node, the
code cell running (``cell 4/12``) and the newest progress bar inside it (the ``tqdm.auto`` bars of
epochs, batches and images: Jupyter widgets in a kernel, whose widget messages the engine reads, or
text bars on the kernel's stdout under make, ``CXR_PLAIN_PROGRESS=1``), and the node's wall time when it ends. On a terminal one status line is rewritten in
place; in a log (not a TTY), and whenever make runs several nodes at once (``make -j2``, the default
``JOBS=2``: :func:`parallel_make`), a node-prefixed line is written at most every ``--interval`` seconds,
so a long node writes a few dozen lines, not thousands, and two nodes never overwrite each other's line.
papermill's own chatter (input/output notebook, working directory, kernel name) is logged below
``--log-level WARNING`` and the kernel talks over private IPC sockets, not TCP (so ipykernel has no
unencrypted-TCP warning to print, and two kernels started at once cannot pick the same port);
warnings and errors still show.

``python -m cxrlib.progress summary --log build/<p>/timings.jsonl --since <ISO time> --results R
--figures F`` prints the nodes this make run executed with their times, and where the outputs are.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

ENGINE = "cxr-progress"
PROGRESS_MODELS = ("FloatProgressModel", "IntProgressModel")
#: papermill's log level under make: its INFO lines (notebook paths, working directory, kernel) are per-node noise
PAPERMILL_LOG_LEVEL = "WARNING"
#: a Unix socket path must fit ``sun_path`` (108 bytes on Linux); a longer temp folder keeps TCP
_IPC_PATH_MAX = 100


def parallel_make(environ: dict[str, str] | None = None) -> bool:
    """True when the make that started us runs several jobs at once (``-jN`` with N > 1, ``-j``, a jobserver).

    make passes its flags to every recipe in ``MAKEFLAGS`` (``" -j2 --jobserver-auth=3,4 -- VAR=value"``;
    the words after ``--`` are command-line variables, not flags)."""
    flags = (os.environ if environ is None else environ).get("MAKEFLAGS", "").split()
    for word in flags[:flags.index("--")] if "--" in flags else flags:
        if word.startswith(("--jobserver-auth", "--jobserver-fds")):
            return True
        jobs = re.fullmatch(r"-j(\d*)", word)
        if jobs:
            return not jobs.group(1) or int(jobs.group(1)) > 1
    return False


def _fmt_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{int(s // 60)} min {s % 60:02.0f} s"


class NodeReporter:
    """Status of one node: which code cell runs, the newest bar, the wall time; throttled output.

    ``tty`` (default: the stream is a terminal and make runs one job at a time, :func:`parallel_make`)
    rewrites one status line in place; otherwise node-prefixed lines, at most one per ``interval``. On a
    terminal those lines first clear the current line (another job's ``\\r`` progress bar)."""

    def __init__(self, node: str, n_cells: int, stream: TextIO | None = None, interval: float = 15.0,
                 clock: Callable[[], float] = time.monotonic, tty: bool | None = None):
        self.node, self.n_cells, self.interval, self.clock = node, n_cells, interval, clock
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty()
        self.tty = (self.terminal and not parallel_make()) if tty is None else tty
        self.start = clock()
        self.cell = 0
        self.bar = ""
        self._last_print = -float("inf")
        self._last_text = ""
        self.lines = 0

    def status(self) -> str:
        text = f"   [{self.node}] cell {self.cell}/{self.n_cells} · {_fmt_seconds(self.clock() - self.start)}"
        return text + (f" · {self.bar}" if self.bar else "")

    def _emit(self, force: bool = False) -> None:
        now = self.clock()
        text = self.status()
        if self.tty:
            if force or now - self._last_print >= 0.25:
                self.stream.write("\r\033[K" + text[:200])
                self.stream.flush()
                self._last_print = now
            return
        if force or (now - self._last_print >= self.interval and text != self._last_text):
            self.stream.write(("\r\033[K" if self.terminal else "") + text + "\n")
            self.stream.flush()
            self._last_print, self._last_text = now, text
            self.lines += 1

    def cell_started(self, number: int) -> None:
        self.cell, self.bar = number, ""
        self._emit()

    def bar_updated(self, text: str) -> None:
        self.bar = text
        self._emit()

    def finished(self, ok: bool = True) -> None:
        end = f"{'done' if ok else 'FAILED'} in {_fmt_seconds(self.clock() - self.start)} ({self.n_cells} code cells)"
        self.stream.write(("\r\033[K" if self.tty or self.terminal else "") + f"<< {self.node} {end}\n")
        self.stream.flush()


class WidgetBars:
    """Reads tqdm's notebook bars (HBox[HTML description, progress, HTML counts]) from widget messages."""

    def __init__(self):
        self.state: dict[str, dict[str, Any]] = {}
        self.parent: dict[str, str] = {}

    def update(self, comm_id: str, state: dict[str, Any]) -> str | None:
        """Merge one message's state; return the bar's text when a tqdm bar changed, else None."""
        merged = self.state.setdefault(comm_id, {})
        merged.update(state)
        children = [c.removeprefix("IPY_MODEL_") for c in merged.get("children", []) if isinstance(c, str)]
        if merged.get("_model_name") == "HBoxModel" and len(children) == 3:
            for child in children:
                self.parent[child] = comm_id
        box = self.parent.get(comm_id)
        if box is None or "value" not in state:
            return None
        left, bar, right = (c.removeprefix("IPY_MODEL_") for c in self.state[box]["children"])
        if self.state.get(bar, {}).get("_model_name") not in PROGRESS_MODELS:
            return None
        desc = html.unescape(str(self.state.get(left, {}).get("value", ""))).strip()
        counts = html.unescape(str(self.state.get(right, {}).get("value", ""))).strip()
        text = " ".join(f"{desc} {counts}".replace("\u2007", " ").split())  # tqdm pads with figure spaces
        return text or None


_TQDM_FRAME = re.compile(r"\d+(?:/\d+)?(?:it)? \[\d")  # "12/50 [00:10<..." or "12it [00:10, ..."


def tqdm_text_frame(text: str) -> str | None:
    """The newest tqdm frame in a stream chunk (text bars redraw with ``\\r``), its bar glyphs dropped."""
    for frame in reversed(re.split(r"[\r\n]", text)):
        if _TQDM_FRAME.search(frame):
            return " ".join(re.sub(r"\|[^|]*\|", " ", frame).replace("\u2007", " ").split())
    return None


def _client_class():
    from papermill.clientwrap import PapermillNotebookClient

    class ProgressClient(PapermillNotebookClient):
        """papermill's client, reporting cells and widget bars to a NodeReporter."""

        reporter: NodeReporter | None = None

        def __init__(self, nb_man, **kw):
            super().__init__(nb_man, **kw)
            self._bars = WidgetBars()
            code = [i for i, c in enumerate(self.nb.cells) if c.cell_type == "code"]
            self._number = {idx: n + 1 for n, idx in enumerate(code)}
            self.reporter = NodeReporter(_NODE["name"], len(code), interval=_NODE["interval"])
            self.on_cell_start = self._on_cell_start
            self.ipc_dir: Path | None = None

        def create_kernel_manager(self):
            """The kernel over IPC sockets in a folder of this run's own (absolute: the kernel runs in --cwd)."""
            km = super().create_kernel_manager()
            if os.name == "posix" and len(tempfile.gettempdir()) + 30 < _IPC_PATH_MAX:
                self.ipc_dir = Path(tempfile.mkdtemp(prefix="cxr-kernel-"))
                km.transport, km.ip = "ipc", str(self.ipc_dir / "kernel")
            return km

        def _on_cell_start(self, cell, cell_index):
            if cell_index in self._number:
                self.reporter.cell_started(self._number[cell_index])

        def process_message(self, msg, cell, cell_index):
            out = super().process_message(msg, cell, cell_index)
            if msg.get("msg_type") == "stream":  # text progress bars (tqdm.std in the kernel)
                text = tqdm_text_frame(str(msg.get("content", {}).get("text", "")))
                if text:
                    self.reporter.bar_updated(text)
            return out

        def handle_comm_msg(self, outs, msg, cell_index):
            super().handle_comm_msg(outs, msg, cell_index)
            data = msg.get("content", {}).get("data", {})
            if isinstance(data.get("state"), dict):
                text = self._bars.update(msg["content"]["comm_id"], data["state"])
                if text:
                    self.reporter.bar_updated(text)

    return ProgressClient


_NODE: dict[str, Any] = {"name": "notebook", "interval": 15.0}


def _engine_class():
    from papermill.engines import NBClientEngine
    from papermill.utils import merge_kwargs, remove_args

    class ProgressEngine(NBClientEngine):
        """NBClientEngine with :class:`NodeReporter` output (registered as ``cxr-progress``)."""

        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, log_output=False, stdout_file=None,
                                     stderr_file=None, start_timeout=60, execution_timeout=None, **kwargs):
            kwargs = remove_args(["input_path"], **kwargs)
            safe_kwargs = remove_args(["timeout", "startup_timeout"], **kwargs)
            final = merge_kwargs(safe_kwargs, timeout=execution_timeout or kwargs.get("timeout"),
                                 startup_timeout=start_timeout, kernel_name=kernel_name, log_output=log_output,
                                 stdout_file=stdout_file, stderr_file=stderr_file)
            client = _client_class()(nb_man, **final)
            ok = False
            try:
                nb = client.execute()
                ok = not any(getattr(c.metadata, "papermill", {}).get("exception") for c in nb.cells)
                return nb
            finally:
                client.reporter.finished(ok)
                if client.ipc_dir is not None:
                    shutil.rmtree(client.ipc_dir, ignore_errors=True)

    return ProgressEngine


def register() -> None:
    """Make ``--engine cxr-progress`` known to papermill in this process."""
    from papermill.engines import papermill_engines

    papermill_engines.register(ENGINE, _engine_class())


def run(node: str, papermill_args: list[str], interval: float = 15.0) -> int:
    """papermill's command line with the progress engine (and its log at :data:`PAPERMILL_LOG_LEVEL` unless
    ``papermill_args`` give ``--log-level``); returns its exit code."""
    from papermill.cli import papermill as cli

    _NODE.update(name=node, interval=interval)
    register()
    try:
        cli.main(args=["--log-level", PAPERMILL_LOG_LEVEL, *papermill_args, "--engine", ENGINE], standalone_mode=False)
    except SystemExit as exc:  # click exits on usage errors
        return int(exc.code or 0)
    except Exception as exc:  # noqa: BLE001 - papermill's PapermillExecutionError and friends
        print(f"error in {node}: {type(exc).__name__}: {str(exc)[-2000:]}", file=sys.stderr)
        return 1
    return 0


def nodes_since(log: Path, since: str) -> list[dict[str, Any]]:
    """Records of ``timings.jsonl`` that finished at or after ``since`` (ISO time, UTC)."""
    if not log.is_file():
        return []
    start = datetime.fromisoformat(since)
    out = []
    for line in log.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if datetime.fromisoformat(rec["finished"]) >= start:
                out.append(rec)
    return out


def summary(log: Path, since: str, results: Path, figures: Path, title: str = "make") -> str:
    """The nodes run since ``since`` (in the order they finished), each one's time, and the wall time since
    ``since``: with nodes run at once (``JOBS``) their sum exceeds the wall time, and the sum line says so."""
    recs = nodes_since(log, since)
    elapsed = (datetime.now(datetime.fromisoformat(since).tzinfo) - datetime.fromisoformat(since)).total_seconds()
    lines = [f"== {title}: {len(recs)} node(s) ran, {_fmt_seconds(elapsed)} wall in all =="]
    if recs:
        width = max(len(r["node"]) for r in recs)
        lines += [f"  {r['node']:<{width}}  {_fmt_seconds(r['seconds']):>12}" for r in recs]
        total = sum(r["seconds"] for r in recs)
        overlap = "  (nodes ran in parallel: more than the wall time)" if total > elapsed + 1 else ""
        lines.append(f"  {'sum':<{width}}  {_fmt_seconds(total):>12}{overlap}")
    else:
        lines.append("  every node was up to date: nothing ran")
    n_res = len(list(results.glob("*"))) if results.is_dir() else 0
    n_fig = len(list(figures.glob("*.png"))) if figures.is_dir() else 0
    lines += [f"results: {results} ({n_res} files: retrieval.csv, tables *.md / *.tex, run_manifest.json)",
              f"figures: {figures} ({n_fig} PNG, each with a PDF)",
              f"executed notebooks and timings: {log.parent}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxrlib.progress")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="papermill with progress output")
    r.add_argument("--node", required=True)
    r.add_argument("--interval", type=float, default=15.0, help="seconds between status lines in a log")
    r.add_argument("papermill", nargs=argparse.REMAINDER)
    s = sub.add_parser("summary", help="nodes run since a time, their wall times, where outputs are")
    s.add_argument("--log", type=Path, required=True)
    s.add_argument("--since", required=True)
    s.add_argument("--results", type=Path, required=True)
    s.add_argument("--figures", type=Path, required=True)
    s.add_argument("--title", default="make")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        pm = args.papermill[1:] if args.papermill[:1] == ["--"] else args.papermill
        return run(args.node, pm, args.interval)
    print(summary(args.log, args.since, args.results, args.figures, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
