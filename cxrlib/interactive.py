"""Notebooks opened by hand resolve their parameters exactly as ``make`` would, and never touch make's outputs.

Each notebook's second cell calls :func:`setup` with its node name. Under ``make`` (or any papermill run)
it changes nothing: the parameters are the ones papermill injected. Opened in JupyterLab:

* ``profile`` comes from the cell when it differs from the committed default, else from the environment
  variable ``CXR_PROFILE``, else the committed default (``paper``);
* every other parameter resolves through :func:`make_params`, i.e. the same
  :func:`cxrlib.config.resolve_params` with the dataset and backbone ``cxrlib.dag`` gives make; a value
  the user edited in the cell (one that differs from the committed notebook's default) overrides it,
  for that run only;
* the resolved values and where each came from are printed;
* a profile with ``deterministic: true`` (the offline demo) gets deterministic torch algorithms and its
  thread count (:func:`cxrlib.determinism.enable_for_profile`), under make and by hand alike;
* outputs go under ``results/<profile>/interactive/<run>/`` and ``figures/<profile>/interactive/<run>/``
  (through :func:`cxrlib.paths.set_interactive`), unless ``publish = True`` is set in the cell or
  ``CXR_PUBLISH=1`` in the environment. ``<run>`` is the projector run the parameters describe
  (``main`` for equal loss weights), or the node's name for nodes that train none.

Executed notebooks read well: make's papermill call sets ``CXR_PLAIN_PROGRESS=1``, and
:func:`select_progress` (run on ``import cxrlib``) then makes ``tqdm.auto`` a text bar on stdout, whose
last frame (100%) is what the saved notebook shows; known harmless warnings are silenced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrlib import config, determinism, paths

#: set by make's papermill call: the notebook runs as a DAG node, never interactively
MAKE_ENV = "CXR_MAKE_NODE"
PROFILE_ENV = "CXR_PROFILE"
PUBLISH_ENV = "CXR_PUBLISH"
PLAIN_PROGRESS_ENV = "CXR_PLAIN_PROGRESS"
#: nodes that write data products (study table, adapted backbone): interactive runs keep those apart too
DATA_NODES = {"01_data_prep": "processed", "00_adapt_backbone": "models"}
#: warnings with a known harmless cause, hidden in notebooks (regex on the message)
HARMLESS_WARNINGS = (
    r"The given NumPy array is not writable",  # torch.as_tensor on a read-only cache array, never written
)
PAPERMILL_MARK = "# Parameters"  # the first line of the cell papermill injects


def select_progress() -> None:
    """With ``CXR_PLAIN_PROGRESS=1`` (make's papermill runs), ``tqdm.auto`` is a plain text bar on stdout that
    redraws rarely, so an executed notebook keeps a few frames ending at 100%; transient bars (``leave=False``)
    leave nothing. Known harmless warnings are silenced too."""
    if os.environ.get(PLAIN_PROGRESS_ENV, "") in ("", "0"):
        return
    import tqdm.auto
    import tqdm.std

    class TextTqdm(tqdm.std.tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("file", sys.stdout)
            kwargs.setdefault("mininterval", 15.0)
            kwargs.setdefault("ncols", 100)
            if kwargs.get("leave") is False:
                kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    tqdm.auto.tqdm = TextTqdm
    tqdm.auto.trange = lambda *a, **k: TextTqdm(range(*a), **k)
    quiet_known_warnings()


def quiet_known_warnings() -> None:
    for message in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def make_params(profile: str, node: str) -> dict[str, Any]:
    """The parameters a make run of ``node`` under ``profile`` sees, without make variables: the notebook's
    defaults overlaid with what :func:`cxrlib.dag.plan` resolves for it (the one resolver make uses to write
    ``build/<profile>/params/<node>.yaml``). A notebook that is not a DAG node (the explorer) gets its
    defaults with ``profile`` and the profile's ``common`` keys it declares."""
    from cxrlib import dag

    declared = config.declared_parameters(node)
    p = dag.plan(profile)
    if node in p.params:
        return {**declared, **p.params[node]}
    common = config.load_profile(profile)["common"]
    return {**declared, **{k: v for k, v in common.items() if k in declared}, "profile": profile}


def in_papermill(namespace: dict[str, Any] | None = None) -> bool:
    """True under make (``CXR_MAKE_NODE``) or when papermill injected a parameters cell into this kernel."""
    if os.environ.get(MAKE_ENV):
        return True
    history = (namespace or {}).get("In") or []
    return any(isinstance(src, str) and src.lstrip().startswith(PAPERMILL_MARK) for src in history)


def committed_defaults(node: str) -> dict[str, Any]:
    """The parameter defaults of ``notebooks/<node>.ipynb`` as committed (git HEAD), else as on disk."""
    nb = paths.repo_root() / "notebooks" / f"{node}.ipynb"
    try:
        text = subprocess.run(["git", "show", f"HEAD:notebooks/{node}.ipynb"], cwd=paths.repo_root(),
                              capture_output=True, text=True, check=True, timeout=20).stdout
        tmp = json.loads(text)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError):
        return config.notebook_parameters(nb)
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".ipynb", delete=False) as fh:
        json.dump(tmp, fh)
    try:
        return config.notebook_parameters(fh.name)
    finally:
        os.unlink(fh.name)


@dataclass
class Resolved:
    """What :func:`setup` decided: the values, where each came from, the run and the output folders."""

    node: str
    mode: str  # "papermill" | "interactive" | "publish"
    params: dict[str, Any]
    sources: dict[str, str]
    run: str
    results_dir: Path
    figures_dir: Path

    @property
    def label(self) -> str:
        """The subtitle of every figure and table: the profile's label, then which run made them
        (dataset, backbone, projector run), and ``interactive run`` when make's outputs are not the target."""
        p = self.params
        made = ", ".join(f"{k} {p[k]}" for k in ("dataset", "backbone") if p.get(k))
        run = p.get("run") or (self.run if self.run != self.node else None)
        made += f", run {run}" if run else ""
        where = {"interactive": "INTERACTIVE run, not make's outputs",
                 "publish": "run by hand, published"}.get(self.mode, "")
        profile_label = config.load_profile(p["profile"])["label"] if p.get("profile") else ""
        return " · ".join(x for x in (profile_label, made, where) if x)

    def table(self):
        import pandas as pd

        return pd.DataFrame({"value": {k: repr(v) for k, v in self.params.items()},
                             "from": self.sources}).rename_axis("parameter")


def _sources(profile: str, node: str, declared: list[str], resolved: dict[str, Any]) -> dict[str, str]:
    cfg = config.load_profile(profile)
    section = cfg["nodes"].get(node) or {}
    out = {}
    for k in declared:
        if k == "profile":
            out[k] = "profile"
        elif k in ("dataset", "backbone"):
            out[k] = "cxrlib.dag (as make passes it)"
        elif k in section:
            out[k] = f"configs/{profile}.yaml nodes.{node}"
        elif k in cfg["common"]:
            out[k] = f"configs/{profile}.yaml common"
        else:
            out[k] = "notebook default"
        if k not in resolved:
            out[k] = "notebook default"
    return out


def run_name(params: dict[str, Any], node: str) -> str:
    """The projector run the parameters describe (``cxrlib.dag.run_id`` of 02's recipe, the ``run`` a later
    node evaluates), or the node's name for a node that has none."""
    from cxrlib import dag

    if node == dag.TRAIN_NODE:
        return dag.run_id(params)
    return str(params.get("run") or node)


def setup(node: str, namespace: dict[str, Any]) -> Resolved:
    """Resolve ``node``'s parameters into ``namespace`` (the notebook's ``globals()``) and choose its outputs."""
    quiet_known_warnings()
    defaults = committed_defaults(node)
    declared = list(defaults)
    current = {k: namespace.get(k, v) for k, v in defaults.items()}
    if in_papermill(namespace):
        paths.set_interactive(None)
        profile = current.get("profile", "paper")
        determinism.enable_for_profile(profile)
        res = Resolved(node, "papermill", current, dict.fromkeys(current, "papermill"), run_name(current, node),
                       paths.results_dir(profile), paths.figures_dir(profile))
        return res
    edited = {k for k in declared if current[k] != defaults[k]}
    env_profile = os.environ.get(PROFILE_ENV, "").strip()
    if "profile" in edited:
        profile, profile_from = current["profile"], "cell"
    elif env_profile:
        profile, profile_from = env_profile, f"{PROFILE_ENV} environment variable"
    else:
        profile, profile_from = defaults.get("profile", "paper"), "notebook default"
    resolved = make_params(profile, node)
    params = {k: resolved.get(k, defaults[k]) for k in declared}
    sources = _sources(profile, node, declared, resolved)
    for k in edited - {"profile"}:
        params[k], sources[k] = current[k], "cell (this run only)"
    params["profile"], sources["profile"] = profile, profile_from
    config.validate_params(params)
    determinism.enable_for_profile(profile)
    namespace.update(params)
    run = run_name(params, node)
    publish = bool(namespace.get("publish")) or os.environ.get(PUBLISH_ENV, "") not in ("", "0")
    paths.set_interactive(None if publish else run, data=DATA_NODES.get(node))
    res = Resolved(node, "publish" if publish else "interactive", params, sources, run,
                   paths.results_dir(profile), paths.figures_dir(profile))
    _show(res)
    return res


def _show(res: Resolved) -> None:
    where = ("PUBLISHING into make's outputs (publish = True)" if res.mode == "publish" else
             f"interactive run {res.run!r}: make's outputs are not touched")
    print(f"{res.node} · profile {res.params.get('profile')!r} · {where}")
    print(f"  results -> {res.results_dir}\n  figures -> {res.figures_dir}")
    try:
        from IPython.display import display

        display(res.table())
    except ImportError:  # pragma: no cover - IPython is always there in a notebook
        print(res.table().to_string())
