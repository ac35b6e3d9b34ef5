"""The make DAG: derived prerequisites, what a change reruns, cached stamps, the ablation's run cache."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from cxrlib import ablation, dag, paths
from cxrlib.train import TrainConfig, save_run, synthetic_splits, train_projector

REPO = paths.repo_root()


# ---- import closures ----------------------------------------------------------------------------

def test_closures_hold_the_modules_the_makefile_once_missed():
    assert "cxrlib/ablation.py" in dag.node_sources("05_loss_ablation")
    assert "cxrlib/embed.py" in dag.node_sources("00_adapt_backbone")  # adapt imports embed.trim_padding
    for node in ("02_train", "03_retrieval_eval", "04_embedding_viz", "05_loss_ablation"):
        src = dag.node_sources(node)
        assert {"cxrlib/dag.py", "cxrlib/settings.py", "cxrlib/pairs.py"} <= set(src), node
    assert "cxrlib/ablation.py" not in dag.node_sources("02_train")
    assert "cxrlib/datasets/openi.py" in dag.node_sources("01_data_prep")


def test_closure_follows_relative_and_submodule_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "cxrlib"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import f\n")
    (pkg / "sub" / "leaf.py").write_text("def f():\n    from cxrlib import lazy\n")
    (pkg / "lazy.py").write_text("import os\n")
    (pkg / "alone.py").write_text("")
    monkeypatch.setattr(paths, "repo_root", lambda: tmp_path)
    assert dag.closure(["cxrlib.sub"]) == ["cxrlib/__init__.py", "cxrlib/lazy.py", "cxrlib/sub/__init__.py",
                                           "cxrlib/sub/leaf.py"]



def test_imports_found_in_every_nested_statement_body():
    """The statement-only walk finds an import wherever Python allows one: the same set as ``ast.walk``."""
    import ast

    src = """
import cxrlib.a
def f():
    if x:
        from cxrlib import b
    else:
        import cxrlib.c
class K:
    def m(self):
        with open(p):
            for _ in y:
                import cxrlib.d
            else:
                import cxrlib.e
try:
    import cxrlib.f
except ImportError:
    import cxrlib.g
else:
    import cxrlib.h
finally:
    while z:
        import cxrlib.i
match v:
    case 1:
        import cxrlib.j
async def g():
    async with q:
        import cxrlib.k
lam = lambda: __import__("cxrlib.not_an_import_statement")
"""
    tree = ast.parse(src)
    want = {n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)}
    assert len(want) == 11 and {n for n in dag._statements(tree) if isinstance(n, ast.Import | ast.ImportFrom)} == want
    assert dag._imports(tree, "") == {"cxrlib"} | {f"cxrlib.{m}" for m in "acdefghijk"}

@pytest.fixture
def fresh_import_cache(tmp_path, monkeypatch):
    """A fake ``cxrlib`` package under ``tmp_path/repo``, the source cache in ``tmp_path/cache``, nothing cached in
    this process yet; yields a function giving the number of files parsed since the last call."""
    pkg = tmp_path / "repo" / "cxrlib"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cxrlib import b\n")
    (pkg / "b.py").write_text("x = 1\n")
    monkeypatch.setattr(paths, "repo_root", lambda: tmp_path / "repo")
    monkeypatch.setenv("CXR_SOURCE_CACHE_DIR", str(tmp_path / "cache"))
    parsed: list[str] = []
    real_parse = dag.ast.parse
    monkeypatch.setattr(dag.ast, "parse", lambda text, *a, **k: parsed.append(text) or real_parse(text, *a, **k))

    def new_process() -> None:  # what a second make call starts with
        dag._import_cache.cache_clear()
        dag._file_imports.cache_clear()
        dag._used.clear()

    new_process()

    def n_parsed() -> int:
        n = len(parsed)
        parsed.clear()
        return n

    yield pkg, new_process, n_parsed
    new_process()


def test_import_scan_is_cached_between_processes_by_source_text(fresh_import_cache, tmp_path):
    """Every make call derives the prerequisites: a second process reads the parsed imports from the source
    cache; a changed source is parsed again even where its size and mtime stay (the key is its text)."""
    pkg, new_process, n_parsed = fresh_import_cache
    want = ["cxrlib/__init__.py", "cxrlib/a.py", "cxrlib/b.py"]
    assert dag.closure(["cxrlib.a"]) == want and n_parsed() == 3
    dag.save_import_cache()
    assert len(json.loads((tmp_path / "cache" / dag.IMPORT_CACHE_FILE).read_text())) == 3
    new_process()
    assert dag.closure(["cxrlib.a"]) == want and n_parsed() == 0
    st = (pkg / "a.py").stat()
    (pkg / "a.py").write_text("from cxrlib import c\n")  # same size
    os.utime(pkg / "a.py", ns=(st.st_atime_ns, st.st_mtime_ns))
    (pkg / "c.py").write_text("y = 2\n")
    new_process()
    assert dag.closure(["cxrlib.a"]) == ["cxrlib/__init__.py", "cxrlib/a.py", "cxrlib/c.py"] and n_parsed() == 2


def test_submodules_are_told_from_names_by_the_files_there_now(fresh_import_cache):
    """The cache holds the import statements only: whether ``from cxrlib import b`` names a module is looked up
    on every call, so a module file that appears later is found though the importing file is unchanged."""
    pkg, new_process, _ = fresh_import_cache
    (pkg / "b.py").unlink()
    (pkg / "__init__.py").write_text("b = 1\n")
    assert dag.closure(["cxrlib.a"]) == ["cxrlib/__init__.py", "cxrlib/a.py"]
    dag.save_import_cache()
    (pkg / "b.py").write_text("")
    new_process()
    assert dag.closure(["cxrlib.a"]) == ["cxrlib/__init__.py", "cxrlib/a.py", "cxrlib/b.py"]


@pytest.mark.parametrize("broken", ["not json {", "[1, 2]", None])
def test_a_broken_or_unwritable_source_cache_only_costs_time(fresh_import_cache, tmp_path, monkeypatch, broken):
    """A corrupt cache file is parsed around; a cache folder that cannot be written (here: a file stands where
    it should be) leaves no cache and no error."""
    _, _, n_parsed = fresh_import_cache
    if broken is None:
        (tmp_path / "blocker").write_text("")
        monkeypatch.setenv("CXR_SOURCE_CACHE_DIR", str(tmp_path / "blocker" / "cache"))
    else:
        (tmp_path / "cache").mkdir()
        (tmp_path / "cache" / dag.IMPORT_CACHE_FILE).write_text(broken)
    assert dag.closure(["cxrlib.a"]) == ["cxrlib/__init__.py", "cxrlib/a.py", "cxrlib/b.py"] and n_parsed() == 3
    dag.save_import_cache()
    if broken is not None:
        assert len(json.loads((tmp_path / "cache" / dag.IMPORT_CACHE_FILE).read_text())) == 3


def test_the_cache_keeps_this_calls_entries_and_older_ones_up_to_its_size(fresh_import_cache, tmp_path, monkeypatch):
    pkg, new_process, _ = fresh_import_cache
    cache_file = tmp_path / "cache" / dag.IMPORT_CACHE_FILE
    dag.closure(["cxrlib.a"])
    dag.save_import_cache()
    old = set(json.loads(cache_file.read_text()))
    monkeypatch.setattr(dag, "IMPORT_CACHE_ENTRIES", 4)
    for i in range(3):  # three new versions of b.py, each from a new process
        (pkg / "b.py").write_text(f"x = {i + 2}\n")
        new_process()
        dag.closure(["cxrlib.a"])
        dag.save_import_cache()
    kept = json.loads(cache_file.read_text())
    assert len(kept) == 4 and old - set(kept)  # the oldest went
    new_process()
    dag.closure(["cxrlib.a"])
    assert set(dag._used) <= set(kept)  # the latest call's entries were kept


def test_makevars_saves_the_import_cache(workdir, monkeypatch):
    """What make includes is written with the cache saved after it; an invalid setting saves nothing."""
    calls: list[int] = []
    monkeypatch.setattr(dag, "save_import_cache", lambda: calls.append(1))
    assert dag.write_make_text("smoke").name == "dag.mk" and calls == [1]
    assert dag.write_make_text("smoke", ["W_SUPCON=-1"]).name == "dag-error.mk" and calls == [1]


def test_make_keeps_pythons_bytecode_cache_on():
    """Every Python process make starts may write bytecode (cxrlib compiled once, not in each of them)."""
    probe = 'pyc-probe: ; @echo "[$${PYTHONDONTWRITEBYTECODE-unset}]"'
    out = subprocess.run(["make", "--no-print-directory", "--eval", probe, "pyc-probe"], cwd=REPO, text=True,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True, check=True)
    assert out.stdout.strip() == "[unset]"


# ---- make -n on a touched DAG (a copy of the repository, the smoke profile) -----------------------

@pytest.fixture(scope="module")
def touched_dag(tmp_path_factory):
    """A copy of the repository whose smoke DAG is up to date (``make -t``): nothing runs, only mtimes count."""
    root = tmp_path_factory.mktemp("repo")
    for item in ("Makefile", "cxrlib", "notebooks", "configs", "pyproject.toml"):
        src = REPO / item
        (shutil.copytree(src, root / item, ignore=shutil.ignore_patterns("__pycache__"))
         if src.is_dir() else shutil.copy2(src, root / item))
    (root / ".venv").symlink_to(REPO / ".venv")
    work = root / "work"
    env = {**os.environ, "CXR_WORKDIR": str(work), "HF_HUB_OFFLINE": "1"}
    for var in ("CXR_DATA_DIR", "CXR_BUILD_DIR", "CXR_RESULTS_DIR", "CXR_FIGURES_DIR", "CXR_EMBEDDINGS_DIR",
                "OPENI_ROOT", "MIMIC_ROOT", "CONDA_PREFIX", "MAKEFLAGS", "MAKELEVEL"):
        env.pop(var, None)

    def make(*args: str) -> str:
        out = subprocess.run(["make", "--no-print-directory", *args], cwd=root, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return out.stdout

    def would_run(*extra: str) -> set[str]:
        return set(re.findall(r'>> smoke: ([^"\n]+)', make("-n", "dag", "PROFILE=smoke", *extra)))

    plan = dag.plan("smoke", environ={})
    for key in plan.embed_keys:  # make -t touches files but creates no folders
        (work / "data" / "embeddings" / plan.dataset / dag.embedding_key(key)).mkdir(parents=True)
    (work / "results" / plan.out).mkdir(parents=True)

    def touch(*extra: str) -> None:
        """``make -t`` and the params copies a real run keeps (``params/built/``, see config.write_params_files)."""
        make("-t", "dag", "PROFILE=smoke", *extra)
        params = work / "build" / plan.out / "params"
        (params / "built").mkdir(exist_ok=True)
        for f in params.glob("*.yaml"):
            shutil.copy2(f, params / "built" / f.name)

    touch()
    assert would_run() == set()
    return root, touch, would_run


@functools.cache
def _sources() -> dict[str, list[str]]:
    return {node.name: dag.node_sources(node) for node in dag.plan("smoke", environ={}).nodes}  # same files as the copy


def _expected(module: str) -> set[str]:
    """Nodes whose import closure holds ``module``, and everything downstream of them."""
    names = _sources()
    hit = {n for n, src in names.items() if module in src}
    children = {n: {m for m in names if n in dag.NODES[m].needs or
                    (n == "embed" and any(x.startswith("embed:") for x in dag.NODES[m].needs)) or
                    (n == "00_adapt_backbone" and m == "embed")} for n in names}
    out, todo = set(), list(hit)
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo.extend(children[n])
    return out


def _nodes_of(ran: set[str]) -> set[str]:
    return {"embed" if r.startswith("embed") else r for r in ran}


FAST_MODULES = ["cxrlib/ablation.py"]
ALL_MODULES = sorted(str(p.relative_to(REPO)) for p in (REPO / "cxrlib").rglob("*.py"))


def _check_touch(touched_dag, module: str):
    root, _, would_run = touched_dag
    path = root / module
    st = path.stat()
    future = time.time_ns() + 10**11  # 100 s newer than every stamp
    os.utime(path, ns=(future, future))
    try:
        ran = _nodes_of(would_run())
    finally:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert ran == _expected(module), module


@pytest.mark.parametrize("module", FAST_MODULES)
def test_touching_a_module_reruns_exactly_its_dependents(touched_dag, module):
    _check_touch(touched_dag, module)


@pytest.mark.slow
@pytest.mark.parametrize("module", [m for m in ALL_MODULES if m not in FAST_MODULES])
def test_touching_any_module_reruns_exactly_its_dependents(touched_dag, module):
    _check_touch(touched_dag, module)


def test_loss_weight_reruns_only_what_depends_on_it(touched_dag):
    _, _, would_run = touched_dag
    assert would_run("W_SUPCON=0.5") == {"02_train", "03_retrieval_eval", "04_embedding_viz", "05_loss_ablation"}
    assert would_run() == set()  # the dry run left the recorded parameters' times as they were


def test_loss_weight_does_not_rerun_the_text_towers_that_wait_for_its_nodes(touched_dag):
    """Node 06 waits for 03-05 (order-only): a weight that reruns them leaves 06 as it was."""
    _, touch, would_run = touched_dag
    touch("TEXT_ENCODERS=true")
    try:
        assert would_run("TEXT_ENCODERS=true") == set()
        assert would_run("TEXT_ENCODERS=true", "W_SUPCON=0.5") == {"02_train", "03_retrieval_eval",
                                                                   "04_embedding_viz", "05_loss_ablation"}
    finally:
        touch()


def test_projector_batch_size_twice_reruns_nothing_the_second_time(touched_dag):
    """Case 3: BATCH_SIZE is the projector's: extraction is not rerun, and a second run has nothing to do."""
    _, touch, would_run = touched_dag
    first = would_run("BATCH_SIZE=128")
    assert first == {"02_train", "03_retrieval_eval", "04_embedding_viz", "05_loss_ablation"}
    touch("BATCH_SIZE=128")  # as if that run had happened
    assert would_run("BATCH_SIZE=128") == set()
    touch()


# ---- a cache hit stamps its target ----------------------------------------------------------------

def test_embedding_cache_hit_stamps_done_json(tmp_path):
    from test_embed import make_table

    from cxrlib.backbones import load_backbone
    from cxrlib.embed import STAMP, extract_embeddings

    tiny = load_backbone("tiny")
    table = make_table(tmp_path / "img", n=4)
    extract_embeddings(table, tiny, tmp_path / "emb", batch_size=4, num_workers=0, progress=False)
    stamp = tmp_path / "emb" / STAMP
    os.utime(stamp, ns=(10**18, 10**18))  # long ago: older than any prerequisite make would compare
    again = extract_embeddings(table, tiny, tmp_path / "emb", batch_size=2, num_workers=0, progress=False)
    assert again.cached == {"image": True, "text": True}
    assert stamp.stat().st_mtime_ns > 10**18 + 10**9


# ---- notebook 05's runs: the main run's recipe, cached per recipe ----------------------------------

SMALL = dict(width=32, batch_size=64, epochs=2, patience=1, dropout=0.3, clip_temperature=0.05)


@pytest.fixture(scope="module")
def splits():
    s = synthetic_splits(160, 60, dim=32, seed=0)
    return s["train"], s["val"]


def _save_main(folder: Path, train, val, cfg: TrainConfig, identity: dict, inputs: dict) -> str:
    """What notebook 02 does: train the recipe and save it under the run name of its recipe."""
    run = dag.run_id({**cfg.to_dict(), **identity})
    save_run(folder / run, train_projector(train, val, cfg, progress=False), {**identity, "run": run, "inputs": inputs},
             {"epochs_run": cfg.epochs})
    return run


def test_ablation_main_row_is_the_main_run(tmp_path, splits, monkeypatch):
    """Case 2: every setting of 02's recipe (dropout, clip_temperature ...) is 05's, and the main row is 02's run."""
    train, val = splits
    identity, inputs = {"dataset": "toy", "backbone": "b"}, {"table_sha256": "x"}
    cfg = TrainConfig(**SMALL, weights={"supcon": 0.5})
    run = _save_main(tmp_path, train, val, cfg, identity, inputs)
    base = ablation.main_config(tmp_path / run)
    assert base == cfg
    calls = []
    real = ablation.train_projector
    monkeypatch.setattr(ablation, "train_projector", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    _, runs = ablation.run_ablation(train, val, val, [(0.0, 0.0, 1.0), ablation.weights_of(base)], base,
                                    models_dir=tmp_path, identity=identity, inputs=inputs, n_boot=10, main=run)
    assert list(runs["run"])[1] == run and list(runs["reused"]) == [False, True]
    assert [dataclasses.replace(c, weights=cfg.weights) for c in calls] == [cfg]


def test_ablation_reuses_its_grid_when_only_the_main_weights_change(tmp_path, splits, monkeypatch):
    """Case 5: a new main weighting trains one run (the new main is 02's); the fixed grid is read back."""
    train, val = splits
    identity, inputs = {"dataset": "toy", "backbone": "b"}, {"table_sha256": "x"}
    grid_rows = [(0.0, 0.0, 1.0), (1.0, 0.0, 1.0)]
    first = TrainConfig(**SMALL)
    run1 = _save_main(tmp_path, train, val, first, identity, inputs)
    ablation.run_ablation(train, val, val, grid_rows + [ablation.weights_of(first)], first, models_dir=tmp_path,
                          identity=identity, inputs=inputs, n_boot=10, main=run1)
    second = dataclasses.replace(first, weights={**first.weights, "supcon": 0.5})
    run2 = _save_main(tmp_path, train, val, second, identity, inputs)
    calls = []
    monkeypatch.setattr(ablation, "train_projector", lambda *a, **k: calls.append(a) or pytest.fail("retrained"))
    results, runs = ablation.run_ablation(train, val, val, grid_rows + [ablation.weights_of(second)], second,
                                          models_dir=tmp_path, identity=identity, inputs=inputs, n_boot=10, main=run2)
    assert calls == [] and runs["reused"].all()
    # other inputs (re-extracted embeddings) are not reused: the grid is trained again, the main run is an error
    with pytest.raises(ValueError, match="main run"):
        ablation.run_ablation(train, val, val, [ablation.weights_of(second)], second, models_dir=tmp_path,
                              identity=identity, inputs={"table_sha256": "y"}, n_boot=10, main=run2)
    saved = json.loads((tmp_path / run2 / "config.json").read_text())
    assert saved["dropout"] == 0.3 and saved["clip_temperature"] == 0.05


def test_an_explicit_grid_always_holds_the_main_weights():
    assert ablation.parse_grid([[0, 0, 1]], (1.0, 0.5, 1.0)) == [(0.0, 0.0, 1.0), (1.0, 0.5, 1.0)]
    assert ablation.parse_grid([[1, 0.5, 1]], (1.0, 0.5, 1.0)) == [(1.0, 0.5, 1.0)]


# ---- node 00 reads the base backbone's frozen report features --------------------------------------

def test_adaptation_runs_after_the_frozen_set_of_its_base_backbone(tmp_path):
    """make -n on an empty work folder: 01, the frozen set, 00 (which reads its report features), the adapted
    set, then the projector; 00's prerequisites hold the frozen set's stamp, never the adapted one."""
    from conftest import run_make

    out = run_make(["-n", "dag", "PROFILE=smoke"], tmp_path).stdout
    steps = re.findall(r'>> smoke: ([^"\n]+)', out)
    assert steps[:5] == ["01_data_prep", "embed tiny", "00_adapt_backbone", "embed tiny-adapted", "02_train"], steps
    line = next(ln for ln in (tmp_path / "build" / "smoke" / "dag.mk").read_text().splitlines()
                if ln.startswith("$(B)/00_adapt_backbone.ipynb:"))
    assert "$(EMB_ROOT)/tiny/done.json" in line.split() and "$(EMB_ROOT)/tiny-adapted/done.json" not in line


def test_embed_base_is_a_prerequisite_only_where_the_base_set_exists(workdir):
    p = dag.plan("smoke", environ={})
    assert "embed:base" in dag.NODES["00_adapt_backbone"].needs and p.backbone in p.embed_keys

    def line_00(plan: dag.Plan) -> list[str]:
        return next(ln for ln in dag.make_text(plan).splitlines()
                    if ln.startswith("$(B)/00_adapt_backbone.ipynb:")).split()[1:]

    assert "$(EMB_ROOT)/tiny/done.json" in line_00(p)
    # a profile that did not embed the base backbone frozen: 00 needs data prep only, as before
    without = dataclasses.replace(p, embed_keys=[p.train_key])
    assert [d for d in line_00(without) if d.startswith("$(")] == ["$(B)/01_data_prep.ipynb"]
    # the paper profile does not adapt: no node 00, so no such prerequisite
    paper = dag.plan("paper", environ={})
    assert "00_adapt_backbone" not in [n.name for n in paper.nodes]
    assert "00_adapt_backbone" not in dag.make_text(paper)
    with pytest.raises(ValueError, match="embed:nothing"):
        dag.register(dag.Node("99_unknown_need", needs=("embed:nothing",)))


def test_a_new_frozen_set_reruns_the_adaptation(touched_dag):
    """The frozen set's stamp newer than node 00's: 00 and everything after it rerun, not the frozen set."""
    root, _, would_run = touched_dag
    plan = dag.plan("smoke", environ={})
    stamp = root / "work" / "data" / "embeddings" / plan.dataset / dag.embedding_key(plan.backbone) / "done.json"
    st = stamp.stat()
    future = time.time_ns() + 10**11
    os.utime(stamp, ns=(future, future))
    try:
        ran = would_run()
    finally:
        os.utime(stamp, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert ran == {"00_adapt_backbone", "embed tiny-adapted", "02_train", "03_retrieval_eval", "04_embedding_viz",
                   "05_loss_ablation"}, ran


# ---- a node off the paper's path waits for the paper's nodes -----------------------------------------

def test_text_towers_wait_for_the_papers_nodes_without_rerunning_for_them(workdir):
    """Node 06 is an order-only dependent of 03-05 (after the ``|``): make starts it once they are done, so
    on two job slots 03-05 run beside each other; a change that reruns 05 does not rerun 06 (the loss-weight
    rerun test checks that on a touched DAG)."""
    p = dag.plan("offline", environ={})  # the demo runs node 06 (text_encoders: true)
    assert "06_text_encoder" in [n.name for n in p.nodes]
    line = next(ln for ln in dag.make_text(p).splitlines() if ln.startswith("$(B)/06_text_encoder.ipynb:"))
    normal, _, order_only = line.partition(" | ")
    assert set(order_only.split()) == {"$(B)/03_retrieval_eval.ipynb", "$(B)/04_embedding_viz.ipynb",
                                       "$(B)/05_loss_ablation.ipynb"}
    assert "$(B)/05_loss_ablation.ipynb" not in normal.split()
    # a node it waits for that the plan does not hold is no prerequisite at all
    without = dataclasses.replace(p, nodes=[n for n in p.nodes if n.name != "05_loss_ablation"])
    line = next(ln for ln in dag.make_text(without).splitlines() if ln.startswith("$(B)/06_text_encoder.ipynb:"))
    assert "05_loss_ablation" not in line and set(line.partition(" | ")[2].split()) == {
        "$(B)/03_retrieval_eval.ipynb", "$(B)/04_embedding_viz.ipynb"}
    with pytest.raises(ValueError, match="99_nothing"):
        dag.register(dag.Node("99_waits", after=("99_nothing",)))


# ---- make test: the cores shared out among the xdist workers ------------------------------------
def _pytest_line(workdir: Path, *extra: str) -> str:
    from conftest import run_make

    out = run_make(["-n", "test", *extra], workdir).stdout
    return next(line for line in out.splitlines() if " -m pytest" in line)


def test_make_test_gives_each_worker_its_share_of_the_cores(tmp_path, monkeypatch):
    """Two workers on n cores: OMP_NUM_THREADS = max(1, n // 2) per worker, whatever OMP_NUM_THREADS the
    caller's shell holds (nproc would otherwise report it); one process (TEST_WORKERS=0): left alone."""
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    line = _pytest_line(tmp_path, "TEST_WORKERS=2")
    assert f"OMP_NUM_THREADS={max(1, cores // 2)} " in line and "-n 2 --dist loadfile" in line
    assert f"OMP_NUM_THREADS={max(1, cores // 4)} " in _pytest_line(tmp_path, "TEST_WORKERS=4")
    assert "OMP_NUM_THREADS=3 " in _pytest_line(tmp_path, "TEST_THREADS=3")
    alone = _pytest_line(tmp_path, "TEST_WORKERS=0")
    assert "OMP_NUM_THREADS" not in alone and " -n " not in alone
