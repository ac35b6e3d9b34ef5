"""Run a notebook's code cells in this test process, the way ``papermill --cwd notebooks/`` runs them in a kernel.

For the fixture notebook tests: every notebook also runs through papermill in the session's smoke DAG
(conftest ``smoke_dag``), so these tests need not pay a kernel start and the notebook stack's imports each.
The notebook is read and its parameters injected by papermill's own code (``load_notebook_node``,
:func:`papermill.parameterize.parameterize_notebook`:
the ``injected-parameters`` cell after the ``parameters`` cell, ``# Parameters`` first, which
:func:`cxrlib.interactive.in_papermill` reads from the shell's ``In`` history as in a kernel); each code
cell then runs in one IPython shell with a fresh namespace. A failing cell raises, naming the cell and its
source. What a notebook changes in this process (cwd, sys.path, environment, torch threads and deterministic flags,
warning filters, random states, matplotlib's backend, rcParams and figures, cxrlib's interactive output
folders) is restored afterwards."""

from __future__ import annotations

import contextlib
import copy
import os
import random
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import nbformat

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


class CellError(AssertionError):
    """A notebook cell raised: the cell's index and source, then the error."""


@contextlib.contextmanager
def _restored_process_state(env: Mapping[str, str | None]) -> Iterator[None]:
    import matplotlib
    import numpy as np
    import torch

    from cxrlib import paths

    cwd, environ, sys_path = os.getcwd(), dict(os.environ), list(sys.path)
    threads, interop = torch.get_num_threads(), torch.get_num_interop_threads()
    det, det_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    backend, rc = matplotlib.get_backend(), copy.deepcopy(dict(matplotlib.rcParams))
    interactive = dict(paths._INTERACTIVE)
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        with warnings.catch_warnings():
            yield
    finally:
        import matplotlib.pyplot as plt

        plt.close("all")
        if matplotlib.get_backend() != backend:
            plt.switch_backend(backend)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            matplotlib.rcParams.update(rc)
        paths._INTERACTIVE.clear()
        paths._INTERACTIVE.update(interactive)
        os.chdir(cwd)
        sys.path[:] = sys_path
        os.environ.clear()
        os.environ.update(environ)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if torch.get_num_interop_threads() != interop:  # pragma: no cover - settable once per process only
            warnings.warn("a notebook changed torch's inter-op threads", stacklevel=2)
        torch.use_deterministic_algorithms(det, warn_only=det_warn)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])


def _shell():
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    if not InteractiveShell.initialized():
        cfg = Config()
        cfg.HistoryManager.hist_file = ":memory:"  # nothing written under ~/.ipython
        cfg.InteractiveShell.colors = "NoColor"
        InteractiveShell.instance(config=cfg)
    return InteractiveShell.instance()


def _outputs(captured) -> list[dict[str, Any]]:
    out = []
    if captured.stdout:
        out.append(nbformat.v4.new_output("stream", name="stdout", text=captured.stdout))
    if captured.stderr:
        out.append(nbformat.v4.new_output("stream", name="stderr", text=captured.stderr))
    for rich in captured.outputs:
        out.append(nbformat.v4.new_output("display_data", data=dict(rich.data), metadata=dict(rich.metadata)))
    return out


def run_notebook(name: str, parameters: Mapping[str, Any], out: Path | None = None,
                 env: Mapping[str, str | None] | None = None) -> nbformat.NotebookNode:
    """Execute ``notebooks/<name>`` with papermill's injected ``parameters`` in this process (cwd notebooks/),
    ``env`` set for the run (``None``: unset); the executed notebook (its cells' stream and display outputs),
    also written to ``out``."""
    from IPython.utils.capture import capture_output
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    nb = parameterize_notebook(load_notebook_node(str(NOTEBOOKS / name)), dict(parameters))
    shell = _shell()
    with _restored_process_state(env or {}):
        os.chdir(NOTEBOOKS)
        shell.reset(new_session=True)
        try:
            for i, cell in enumerate(nb.cells):
                if cell.cell_type != "code":
                    continue
                with capture_output() as captured:
                    result = shell.run_cell(cell.source, store_history=True)
                cell.outputs = _outputs(captured)
                error = result.error_before_exec or result.error_in_exec
                if error is not None:
                    raise CellError(f"{name} cell {i} raised {type(error).__name__}: {error}\n--- cell source ---\n"
                                    f"{cell.source}\n--- cell output ---\n{captured.stdout[-3000:]}"
                                    f"{captured.stderr[-3000:]}") from error
        finally:
            shell.reset(new_session=True)
    if out is not None:
        nbformat.write(nb, out)
    return nb
