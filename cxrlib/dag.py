"""The make DAG, computed in Python: its nodes, their prerequisites, the run names, the output folders.

``python -m cxrlib.dag makevars --locked --profile P [VAR=VALUE ...]`` (the Makefile's one call at parse
time, under the profile's build lock: :func:`cxrlib.lock.make_include`)

1. validates every make variable with :mod:`cxrlib.settings` (one line naming the variable; nothing runs),
2. resolves and writes each node's parameters (``build/<out>/params/<node>.yaml``, rewritten only when
   they change, so make reruns exactly the nodes whose parameters changed),
3. prints make text: paths (through :mod:`cxrlib.paths`, so ``CXR_WORKDIR`` redirects them), the embedding
   sets and their extractor arguments, and one prerequisite line per node: its notebook's (or module's)
   transitive ``cxrlib`` import closure, found with :mod:`ast`, plus its upstream stamps; for a profile with
   ``deterministic: true`` also the ``export`` lines of the pins every node runs under
   (:func:`cxrlib.determinism.profile_env`).

Nodes are registered once in :data:`NODES` (:func:`register`); a new notebook node is one entry here and
its notebook. The run a projector node trains and the runs later nodes evaluate are named once, by
:func:`run_id`, from the full resolved recipe of node ``02_train``; make passes that name to every node
that declares a ``run`` parameter.

Output folders: results, figures and build stamps of a profile on its own dataset go to
``results/<profile>/``, ``figures/<profile>/``, ``build/<profile>/``; with another ``DATASET`` to
``results/<profile>-<dataset>/`` etc. (:func:`out_key`), so the datasets' results sit side by side.
Embedding keys: each backbone of the profile's ``backbones`` list is embedded frozen under its own name;
when the profile adapts (``adapt: true``) the training backbone is adapted in notebook 00 (after its frozen
set, whose report features it reads: ``embed:base``) and embedded again under ``<backbone>-adapted``, the set
the projector trains on.
With ``EVAL_SET`` (notebook 03's ``eval_set``, a peer's evaluation set) node ``evalset`` builds that set's
study table and embeds it with every key before notebook 03; what each is built from is written to
``build/evalsets/<set>/`` (:meth:`Plan.eval_set_params`), shared like the set's table and embeddings.
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrlib import backbones, config, determinism, lock, nbclean, paths, settings
from cxrlib.backbones import ADAPTED_SUFFIX
from cxrlib.io import write_text_if_changed

#: the node whose resolved recipe names the projector run
TRAIN_NODE = "02_train"
#: command-line make variables that are not settings (make's own and the environment's)
NON_SETTING_VARS = frozenset({"PROFILE", "CXR_WORKDIR", "PYTHON_BOOT", "TORCH_SPEC", "PYTEST_ARGS", "TEST_WORKERS",
                              "KERNEL", "JOBS",
                              "MAKEFLAGS", "MFLAGS", "SHELL", "PY", "V"})
#: settings make variables also read from the environment (paths users export once)
ENV_MAKE_VARS = ("OPENI_ROOT", "MIMIC_ROOT")
#: non-Python files a module reads, prerequisites of every node whose closure holds the module
DATA_DEPS = {"cxrlib/backbones.py": "configs/models"}


@dataclass(frozen=True)
class Node:
    """One DAG node. ``needs``: upstream node names or embedding sets (:data:`EMBED_NEEDS`: ``embed:train``
    the set the projector trains on, ``embed:base`` the base backbone's frozen set when the profile embeds
    it, ``embed:all`` every set, ``embed:evalset`` the evaluation set's); ``backbone``: ``train`` (the set the
    projector trains on) or ``base`` (the profile's backbone before adaptation); ``only_if_adapt``: the node
    exists only when the profile adapts; ``module``: a script node run as ``python -m <module>`` (no
    notebook); ``switch``: a boolean setting
    (a profile's top-level key, or its make variable) without which the node is off; ``only_if_eval_set``:
    the node exists only when notebook 03 evaluates on a peer's evaluation set (``eval_set``, ``EVAL_SET``);
    ``after``: nodes it waits for when they run in the same make (make's order-only prerequisites: they do
    not make it rerun), so that a node off the paper's path leaves the job slots to the paper's nodes."""

    name: str
    needs: tuple[str, ...] = ()
    backbone: str = "train"
    only_if_adapt: bool = False
    module: str | None = None
    switch: str | None = None
    only_if_eval_set: bool = False
    after: tuple[str, ...] = ()

    @property
    def notebook(self) -> Path | None:
        return None if self.module else paths.repo_root() / "notebooks" / f"{self.name}.ipynb"


NODES: dict[str, Node] = {}

#: ``Node.needs`` naming embedding sets -> their ``done.json`` stamps, from the plan and the stamps by set
#: (``{"dataset": {key: stamp}, "evalset": {key: stamp}}``); an absent set is no prerequisite
EMBED_NEEDS = {
    "embed:train": lambda p, sets: [sets["dataset"][p.train_key]],
    "embed:base": lambda p, sets: [sets["dataset"][p.backbone]] if p.backbone in sets["dataset"] else [],
    "embed:all": lambda p, sets: list(sets["dataset"].values()),
    "embed:evalset": lambda p, sets: list(sets["evalset"].values()),
}


def register(node: Node) -> Node:
    if node.name in NODES:
        raise ValueError(f"node {node.name!r} registered twice")
    unknown = [n for n in node.needs if n not in NODES and n not in EMBED_NEEDS]
    if unknown:
        raise ValueError(f"node {node.name!r} needs {unknown}: neither registered nodes nor {sorted(EMBED_NEEDS)}")
    unknown = [n for n in node.after if n not in NODES]
    if unknown:
        raise ValueError(f"node {node.name!r} runs after {unknown}: not registered nodes")
    NODES[node.name] = node
    return node


register(Node("01_data_prep"))
# node 00 reads the base backbone's frozen report features (its locked text tower's) instead of encoding them
register(Node("00_adapt_backbone", needs=("01_data_prep", "embed:base"), backbone="base", only_if_adapt=True))
register(Node("embed", needs=("01_data_prep",), module="cxrlib.embed"))
register(Node("02_train", needs=("embed:train",)))
# a peer's evaluation set (EVAL_SET, cxrlib.evalsets): its study table, then its embedding set per backbone key
register(Node("evalset", needs=("01_data_prep",), module="cxrlib.evalsets", only_if_eval_set=True))
register(Node("03_retrieval_eval", needs=("02_train", "embed:all", "embed:evalset")))
register(Node("04_embedding_viz", needs=("02_train", "embed:train")))
register(Node("05_loss_ablation", needs=("02_train", "embed:train")))
# text towers (Ko et al.): on in the offline demo (`text_encoders: true`), off in the paper's main path;
# `make paper TEXT_ENCODERS=true` adds it to the paper's comparison. It starts once 03-05 are done: beside
# them it held one of the two job slots of a 2-core machine and they ran one after another behind it
register(Node("06_text_encoder", needs=("embed:train",), switch="text_encoders",
              after=("03_retrieval_eval", "04_embedding_viz", "05_loss_ablation")))
#: the last step (not a node with parameters): results/<out>/run_manifest.json
MANIFEST_MODULE = "cxrlib.manifest"


# ---- names ---------------------------------------------------------------------------------------

def train_key(backbone: str, adapt: bool) -> str:
    return f"{backbone}{ADAPTED_SUFFIX}" if adapt else backbone


def adapted_checkpoint(dataset: str, backbone: str) -> Path:
    return backbones.adapted_checkpoint(dataset, backbone)


def embedding_key(key: str) -> str:
    """The embedding folder name of a backbone key (file-system safe)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


def embedding_dir(dataset: str, key: str) -> Path:
    """An embedding set's folder, ``embeddings_dir()/<dataset>/<backbone key>/`` (``{image,text}.npz``, ``done.json``)."""
    return paths.embeddings_dir() / dataset / embedding_key(key)


def out_key(profile: str, dataset: str | None = None) -> str:
    """``<profile>`` for the profile's own dataset, else ``<profile>-<dataset>``: the results/figures/build folder."""
    default = config.load_profile(profile)["common"].get("dataset", settings.lookup("01_data_prep", "dataset").default)
    return profile if dataset in (None, "", default) else f"{profile}-{dataset}"


def results_dir(profile: str, dataset: str | None = None) -> Path:
    return paths.results_dir(out_key(profile, dataset))


def figures_dir(profile: str, dataset: str | None = None) -> Path:
    return paths.figures_dir(out_key(profile, dataset))


def recipe_identity(params: dict[str, Any]) -> dict[str, Any]:
    """The full resolved recipe of a projector run: every recipe setting (defaults filled in, checked and
    coerced), the seed, the dataset and the embedding set it trains on. Device and paths are not part of it."""
    rec = {**settings.defaults("recipe"), **{k: v for k, v in params.items() if k in settings.group("recipe")}}
    rec = settings.validate_recipe(rec)
    seed = settings.lookup(TRAIN_NODE, "seed").validate(params.get("seed", settings.lookup(TRAIN_NODE, "seed").default))
    return {**rec, "seed": seed, **{k: str(params.get(k, settings.lookup(TRAIN_NODE, k).default))
                                    for k in ("dataset", "backbone")}}


def run_id(params: dict[str, Any]) -> str:
    """``bce1-supcon0.5-clip1-<hash>``: the loss weights for people, a hash of :func:`recipe_identity` for make."""
    rec = recipe_identity(params)
    weights = "-".join(f"{t}{rec[f'w_{t}']:g}" for t in settings.loss_terms())
    digest = hashlib.sha1(json.dumps(rec, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{weights}-{digest}"


def run_dir(profile: str, dataset: str | None, run: str) -> Path:
    """``results/<out>/models/<run>/`` (projector.pt, config.json, history.csv, metrics.json)."""
    return results_dir(profile, dataset) / "models" / run


def main_run(profile: str, dataset: str | None = None, backbone: str | None = None,
             seed: int | None = None) -> str:
    """The run notebook 02 trains under ``profile`` (for a notebook opened without make)."""
    given = {k: v for k, v in (("dataset", dataset), ("backbone", backbone), ("seed", seed)) if v is not None}
    return run_id(config.resolve_params(profile, TRAIN_NODE, given))


def inputs_fingerprint(dataset: str, backbone: str) -> dict[str, Any]:
    """What a projector run was trained on: the study table's SHA-256 and the embedding files' cache keys."""
    table = paths.study_table_path(dataset)
    stamp = embedding_dir(dataset, backbone) / "done.json"
    if not table.is_file() or not stamp.is_file():
        raise FileNotFoundError(f"no study table {table} or embedding stamp {stamp}: build them with `make embed PROFILE=<profile>` (offline: `make demo`)")
    digest = hashlib.sha256(table.read_bytes()).hexdigest()
    mods = json.loads(stamp.read_text()).get("modalities", {})
    return {"table_sha256": digest, "embeddings": {m: e.get("key") for m, e in sorted(mods.items())}}


# ---- derived prerequisites -----------------------------------------------------------------------

def _module_file(mod: str) -> Path | None:
    root = paths.repo_root()
    base = root.joinpath(*mod.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _statements(tree: ast.AST) -> Iterator[ast.AST]:
    """Every statement in ``tree``, nested bodies included, but no expression: an import is a statement, and
    skipping the expressions visits far fewer nodes than ``ast.walk`` (``make`` runs this on every call)."""
    todo = list(getattr(tree, "body", []))
    while todo:
        node = todo.pop()
        yield node
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            todo.extend(getattr(node, field, ()))  # statements (or except / case clauses holding them)


#: an import statement that may name a ``cxrlib`` module: ``[level, module, names]``, level -1 for ``import m``
#: (``names`` empty), else ``from`` (``level`` dots) ``module import names``
ImportRecord = list


def _import_records(tree: ast.AST) -> list[ImportRecord]:
    """The import statements of a parsed file that may name a ``cxrlib`` module (relative ones included)."""
    out: list[ImportRecord] = []
    for node in _statements(tree):
        if isinstance(node, ast.Import):
            out.extend([-1, a.name, []] for a in node.names if a.name.split(".")[0] == "cxrlib")
        elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "cxrlib"):
            out.append([node.level, node.module or "", [a.name for a in node.names]])
    return out


def _resolve(records: Iterable[ImportRecord], package: str) -> set[str]:
    """``cxrlib`` modules the records import from ``package`` (absolute, relative, ``from pkg import submodule``);
    a submodule is told from a name by the files there now, so this part is never cached."""
    out: set[str] = set()
    for level, module, names in records:
        if level < 0:
            out.add(module)
            continue
        if level:
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - level + 1])
            mod = f"{base}.{module}" if module else base
        else:
            mod = module
        if mod.split(".")[0] != "cxrlib":
            continue
        out.add(mod)
        out.update(f"{mod}.{name}" for name in names if _module_file(f"{mod}.{name}"))
    # importing a.b.c runs a/__init__ and a/b/__init__ too
    return {".".join(m.split(".")[:i]) for m in out for i in range(1, len(m.split(".")) + 1)}


def _imports(tree: ast.AST, package: str) -> set[str]:
    """``cxrlib`` modules a parsed file imports (absolute, relative, and ``from pkg import submodule``)."""
    return _resolve(_import_records(tree), package)


#: the import records of each source text by its digest, kept between processes in
#: :func:`cxrlib.paths.source_cache_dir` (every ``make`` call derives the prerequisites; parsing the ~80 sources
#: was the largest part of its time); a save keeps every entry its process used, then older ones up to this many
IMPORT_CACHE_ENTRIES = 2048
IMPORT_CACHE_FILE = "dag-imports.json"
_used: dict[str, list[ImportRecord]] = {}  # looked up in this process: saved first, so they are kept longest


@functools.cache
def _import_cache() -> dict[str, list[ImportRecord]]:
    """The records on disk, read once per process ({} when absent or unreadable: the cache only saves time)."""
    try:
        cached = json.loads((paths.source_cache_dir() / IMPORT_CACHE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}


def _source_records(text: str) -> list[ImportRecord]:
    """:func:`_import_records` of a source text: from the cache by the text's digest, else parsed now."""
    key = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    records = _import_cache().get(key)
    if records is None:
        records = _import_records(ast.parse(text))
    _used[key] = records
    return records


def save_import_cache() -> None:
    """Write the records used in this process into the on-disk cache when it lacks any of them (atomically:
    concurrent ``make`` calls may race, the last one wins; a read-only checkout just keeps no cache)."""
    cache = _import_cache()
    if all(k in cache for k in _used):
        return
    merged = dict(_used)
    merged.update((k, v) for k, v in cache.items() if k not in merged and len(merged) < IMPORT_CACHE_ENTRIES)
    try:
        write_text_if_changed(paths.source_cache_dir() / IMPORT_CACHE_FILE, json.dumps(merged))
    except OSError:
        return
    cache.clear()
    cache.update(merged)


@functools.cache
def _file_imports(file: str, mtime_ns: int, size: int, package: str) -> frozenset[str]:
    """:func:`_imports` of one module file, looked up once per version (every node's closure shares most files)."""
    return frozenset(_resolve(_source_records(Path(file).read_text()), package))


def _notebook_source(nb: Path) -> str:
    """A notebook's code cells as one Python text, IPython magics left out."""
    cells = json.loads(nb.read_text())["cells"]
    src = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return "\n".join(ln for ln in src.splitlines() if not ln.lstrip().startswith(("%", "!")))


def closure(start: Iterable[str]) -> list[str]:
    """Repo-relative files of the ``cxrlib`` modules in ``start`` and everything they import, transitively."""
    seen: dict[str, Path] = {}
    todo = list(start)
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        f = _module_file(mod)
        if f is None:
            continue
        seen[mod] = f
        package = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        st = f.stat()
        todo.extend(_file_imports(str(f), st.st_mtime_ns, st.st_size, package) - set(seen))
    root = paths.repo_root()
    return sorted(str(f.relative_to(root)) for f in seen.values())


def node_sources(node: Node | str) -> list[str]:
    """The ``cxrlib`` files ``node`` runs (its notebook's or module's import closure), plus data files they read."""
    node = NODES[node] if isinstance(node, str) else node
    start = {node.module} if node.module else _resolve(_source_records(_notebook_source(node.notebook)), "")
    files = closure(start)
    root = paths.repo_root()
    for mod_file, folder in DATA_DEPS.items():
        if mod_file in files:
            files += sorted(str(p.relative_to(root)) for p in (root / folder).rglob("*") if p.is_file())
    return files


# ---- the make variables --------------------------------------------------------------------------

def parse_assignments(items: Iterable[str], environ: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """``VAR=VALUE`` make variables -> ``{setting name: {"value", "var", "settings"}}``, each validated."""
    environ = os.environ if environ is None else environ
    given: dict[str, str] = {}
    for var in ENV_MAKE_VARS:
        if environ.get(var):
            given[var] = environ[var]
    for item in items:
        var, sep, value = item.partition("=")
        if not sep:
            raise settings.SettingError(f"make variable {item!r} is not VAR=VALUE")
        if var in NON_SETTING_VARS:
            continue
        given[var] = value
    out: dict[str, dict[str, Any]] = {}
    for var, text in given.items():
        value, targets = settings.check_make_var(var, text)
        if value is not None:
            for s in targets:
                out[(s.name, s.nodes)] = {"value": value, "var": var, "setting": s}
    return out


def node_overrides(node: str, assigned: dict, declared: Iterable[str]) -> dict[str, Any]:
    """The make variables' values that ``node`` takes (a setting applies only to the nodes it lists)."""
    declared = set(declared)
    return {a["setting"].name: a["value"] for a in assigned.values()
            if a["setting"].name in declared and settings.lookup(node, a["setting"].name) is a["setting"]}


def active_nodes(cfg: dict[str, Any], picks: dict[str, Any] | None = None) -> list[Node]:
    """The nodes a profile runs: adaptation only where it adapts, a switched node only where its switch
    (make variable ``picks`` first, then the profile's key) is on."""
    picks = picks or {}
    return [n for n in NODES.values() if not (n.only_if_adapt and not cfg.get("adapt", False))
            and (n.switch is None or bool(picks.get(n.switch, cfg.get(n.switch, False))))]


@dataclass
class Plan:
    """One resolved DAG: names, paths and every node's parameters (what make and a notebook opened by hand share)."""

    profile: str
    out: str
    dataset: str
    backbone: str
    adapt: bool
    train_key: str
    embed_keys: list[str]
    run: str
    params: dict[str, dict[str, Any]]
    nodes: list[Node]
    eval_set: str | None = None

    @property
    def build(self) -> Path:
        return paths.build_dir() / self.out

    @property
    def eval_build(self) -> Path:
        """``build/evalsets/<set>/``: the evaluation set's params files, shared like its table and embeddings
        (every profile and data set reads the same ``data/processed/<set>.parquet`` and embedding folders)."""
        return paths.build_dir() / "evalsets" / str(self.eval_set)

    def extract_args(self, key: str) -> dict[str, Any]:
        """The extractor's backbone arguments for embedding set ``key`` (an adapted one: checkpoint and name)."""
        if self.adapt and key == self.train_key:
            return {"backbone": self.backbone, "checkpoint": str(adapted_checkpoint(self.dataset, self.backbone)),
                    "name": embedding_key(key)}
        return {"backbone": key}

    def eval_set_params(self) -> dict[str, dict[str, Any]]:
        """What the evaluation set is built from: ``table`` (notebook 01's resolved parameters but the data
        set's own name; ``python -m cxrlib.evalsets --params`` takes those the set's builder reads) and, per
        embedding key, the extraction settings and backbone arguments (an adapted checkpoint is the training
        data set's: another ``DATASET`` changes it). Empty without an evaluation set. (cxrlib.evalsets is not
        imported here: every node's prerequisites hold this module's import closure.)"""
        if not self.eval_set:
            return {}
        data = {**config.declared_parameters("01_data_prep"), **self.params["01_data_prep"]}
        out = {"table": {k: v for k, v in data.items() if k not in ("dataset", "profile")}}
        for k in self.embed_keys:
            out[embedding_key(k)] = {**self.params["embed"], "checkpoint": None, "name": None, **self.extract_args(k)}
        return out

    def vars(self) -> dict[str, str]:
        """The make variables (``DS``, ``BK``, ``TRAIN_KEY``, ``RUN``, ``B``, ``RESULTS`` ...)."""
        emb = paths.embeddings_dir() / self.dataset
        return {
            "OUT": self.out, "DS": self.dataset, "BK": self.backbone, "ADAPT": "1" if self.adapt else "",
            "TRAIN_KEY": self.train_key, "RUN": self.run,
            "EMBED_KEYS": " ".join(embedding_key(k) for k in self.embed_keys),
            "TABLE": str(paths.study_table_path(self.dataset)), "EMB_ROOT": str(emb),
            "ADAPTED_CKPT": str(adapted_checkpoint(self.dataset, self.backbone)),
            "RESULTS": str(paths.results_dir(self.out)), "FIGURES": str(paths.figures_dir(self.out)),
            "B": str(self.build),
        }


def plan(profile: str, assignments: Iterable[str] = (), environ: dict[str, str] | None = None) -> Plan:
    """Resolve ``profile`` with make variables ``VAR=VALUE`` (validated first; nothing is written)."""
    cfg = config.load_profile(profile)
    unknown = sorted(set(cfg["nodes"]) - set(NODES))
    if unknown:
        raise config.ConfigError(f"configs/{profile}.yaml: nodes {unknown} are not DAG nodes ({', '.join(NODES)})")
    assigned = parse_assignments(assignments, environ)
    pick = {name: a["value"] for (name, _), a in assigned.items()}
    default = settings.lookup(TRAIN_NODE, "dataset").default
    ds = pick.get("dataset") or cfg["common"].get("dataset") or default
    bk = pick.get("backbone") or cfg["common"].get("backbone") or settings.lookup(TRAIN_NODE, "backbone").default
    adapt = bool(cfg.get("adapt", False))
    key = train_key(bk, adapt)
    frozen = list(dict.fromkeys(list(cfg.get("backbones", [])) + [bk]))
    nodes = active_nodes(cfg, pick)
    params: dict[str, dict[str, Any]] = {}
    for node in nodes:
        if node.only_if_eval_set:  # its parameters: Plan.eval_set_params
            continue
        declared = config.declared_parameters(node.name)
        given = node_overrides(node.name, assigned, declared)
        given.update({k: v for k, v in (("dataset", ds), ("backbone", bk if node.backbone == "base" else key))
                      if k in declared})
        params[node.name] = config.resolve_params(profile, node.name, given)
    run = run_id(params[TRAIN_NODE])
    for name in params:
        if "run" in config.declared_parameters(name):
            params[name]["run"] = run
    check_devices(params)
    eval_set = params.get(settings.EVAL, {}).get("eval_set")
    nodes = [n for n in nodes if eval_set or not n.only_if_eval_set]
    return Plan(profile, out_key(profile, ds), ds, bk, adapt, key, frozen + ([key] if adapt else []), run,
                params, nodes, eval_set)


def check_devices(params: dict[str, dict[str, Any]]) -> None:
    """A GPU named by any node (``DEVICE=cuda``) must be usable here: one line before any node runs,
    not a traceback inside the first node that needs it. torch is imported only when a GPU is named."""
    wanted = sorted({str(p["device"]) for p in params.values() if str(p.get("device", "")).startswith("cuda")})
    if not wanted:
        return
    from cxrlib.accel import DeviceError, require_device

    for device in wanted:
        try:
            require_device(device)
        except DeviceError as exc:
            raise settings.SettingError(str(exc)) from None


def makevars(profile: str, dataset: str | None = None, backbone: str | None = None) -> dict[str, str]:
    """The make variables of ``profile`` (optionally another dataset/backbone), as a dict."""
    given = [f"DATASET={dataset}"] * bool(dataset) + [f"BACKBONE={backbone}"] * bool(backbone)
    return plan(profile, given, environ={}).vars()


def make_text(p: Plan) -> str:
    """Make assignments and one prerequisite line per node (see the module docstring)."""
    emb_done = {k: f"$(EMB_ROOT)/{embedding_key(k)}/done.json" for k in p.embed_keys}
    eval_done = {k: f"$(EVAL_EMB_ROOT)/{embedding_key(k)}/done.json" for k in p.embed_keys if p.eval_set}
    stamp = {n.name: f"$(B)/{n.name}.ipynb" for n in p.nodes if not n.module}
    lines = [f"{k} := {v}" for k, v in {**p.vars(), "STAMPS": " ".join(stamp.values()),
                                          "EMB_DONE": " ".join(emb_done.values()),
                                          "TRAIN_EMB": emb_done[p.train_key]}.items()]
    if p.eval_set:  # the evaluation set's table and embeddings (recipes in the Makefile)
        lines += [f"EVAL_DS := {p.eval_set}", f"EVAL_TABLE := {paths.study_table_path(p.eval_set)}",
                  f"EVAL_EMB_ROOT := {paths.embeddings_dir() / p.eval_set}", f"EVAL_PARAMS := {p.eval_build}",
                  f"EVAL_EMB_DONE := {' '.join(eval_done.values())}",
                  # where notebook 03 writes an evaluation set's tables and figures
                  f"EVAL_RESULTS := {paths.results_dir(f'{p.out}-{p.eval_set}')}",
                  f"EVAL_FIGURES := {paths.figures_dir(f'{p.out}-{p.eval_set}')}"]

    sets = {"dataset": emb_done, "evalset": eval_done}

    def upstream(node: Node) -> list[str]:
        deps = []
        for need in node.needs:
            if need in EMBED_NEEDS:
                deps.extend(EMBED_NEEDS[need](p, sets))
            elif need in stamp:
                deps.append(stamp[need])
        return deps

    for node in p.nodes:
        src = " ".join(node_sources(node))
        if node.only_if_eval_set:  # the table from its params; each embedding set as the data set's, from the table
            lines.append(f"$(EVAL_TABLE): $(EVAL_PARAMS)/table.yaml {' '.join(upstream(node))} {src}")
            embed_src = " ".join(node_sources(NODES["embed"]))
            for k, done in eval_done.items():
                extra = " $(B)/00_adapt_backbone.ipynb" if p.adapt and k == p.train_key else ""
                lines.append(f"{done}: $(EVAL_TABLE) $(EVAL_PARAMS)/{embedding_key(k)}.yaml{extra} {embed_src}")
        elif node.module:  # the embedding sets: one pattern rule in the Makefile, prerequisites and arguments here
            for k in p.embed_keys:
                adapted = p.adapt and k == p.train_key
                args = " ".join(f"--{a} {v}" for a, v in p.extract_args(k).items())
                lines.append(f"EMBED_ARGS_{embedding_key(k)} := {args}")
                extra = " $(B)/00_adapt_backbone.ipynb" if adapted else ""
                lines.append(f"{emb_done[k]}: $(B)/params/{node.name}.yaml {' '.join(upstream(node))}{extra} {src}")
        else:
            wait = [stamp[n] for n in node.after if n in stamp]  # order-only: waits, never reruns for them
            lines.append(f"{stamp[node.name]}: {' '.join(upstream(node))} {src}" + (f" | {' '.join(wait)}" if wait else ""))
    lines.append(f"MANIFEST_SRC := {' '.join(closure([MANIFEST_MODULE]))}")
    # threads, CPU kernels, MKL: read when torch starts, so they reach every node as environment variables
    lines += [f"export {k} := {v}" for k, v in determinism.profile_env(p.profile).items()]
    return "\n".join(lines) + "\n"


def write_make_text(profile: str, assignments: Iterable[str] = ()) -> Path:
    """What ``make`` includes: ``build/<out>/dag.mk`` (params files written first), or on a bad setting
    ``build/dag-error.mk`` holding one ``$(error ...)`` line. Returns the file's path."""
    try:
        p = plan(profile, assignments)
        config.write_params_files(p.build / "params", p.params)
        config.write_params_files(p.eval_build, p.eval_set_params())
        nbclean.write_source_keys(p.build / "src", [n.notebook for n in p.nodes if n.notebook])
        target, text = p.build / "dag.mk", make_text(p)
        save_import_cache()  # what this call parsed, for the next make call
    except (config.ConfigError, settings.SettingError) as exc:
        msg = str(exc).replace("\n", " ").replace("$", "$$")
        target, text = paths.build_dir() / "dag-error.mk", f"$(error error: {msg})\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_if_changed(target, text)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxrlib.dag")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("makevars", help="validate make variables, write params files and the DAG's make text; "
                                        "print that file's path")
    m.add_argument("--locked", action="store_true",
                   help="hold the profile's build lock while writing (never wait: while another build runs, print "
                        "a make file holding one $(error ...) instead)")
    c = sub.add_parser("check", help="validate make variables and the profile (one line on error, exit 2)")
    for q in (m, c):
        q.add_argument("--profile", required=True)
        q.add_argument("assignments", nargs="*", help="VAR=VALUE make variables")
    s = sub.add_parser("sources", help="print a node's cxrlib import closure")
    s.add_argument("node", choices=sorted(NODES))
    r = sub.add_parser("run", help="print the run name notebook 02 trains under a profile")
    r.add_argument("--profile", required=True)
    r.add_argument("assignments", nargs="*", help="VAR=VALUE make variables")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "makevars" and args.locked:
            print(lock.make_include(args.profile, lambda: write_make_text(args.profile, args.assignments)))
        elif args.cmd == "makevars":
            print(write_make_text(args.profile, args.assignments))
        elif args.cmd == "check":
            plan(args.profile, args.assignments)
        elif args.cmd == "sources":
            print("\n".join(node_sources(args.node)))
        else:
            print(plan(args.profile, args.assignments).run)
    except (config.ConfigError, settings.SettingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
