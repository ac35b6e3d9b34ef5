"""Notebooks opened by hand: parameters resolved as make resolves them, outputs kept apart from make's,
text progress in executed notebooks, and notebooks that stay clean (git filter, save hook, source keys)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nbformat
import pytest
import yaml
from conftest import REPO

from cxrlib import dag, interactive, nbclean, paths


@pytest.fixture(autouse=True)
def _reset(monkeypatch):
    monkeypatch.delenv(interactive.PROFILE_ENV, raising=False)
    monkeypatch.delenv(interactive.PUBLISH_ENV, raising=False)
    monkeypatch.delenv(interactive.MAKE_ENV, raising=False)
    yield
    paths.set_interactive(None)


def _cell(node: str, **edits) -> dict:
    """A notebook namespace after its committed parameters cell ran, with ``edits`` typed into it."""
    return {**interactive.committed_defaults(node), **edits}


def _make_params_file(node: str, profile: str = "smoke") -> dict:
    """What make writes for ``node`` (build/<profile>/params/<node>.yaml), overlaid on the notebook defaults."""
    dag.write_make_text(profile)
    written = yaml.safe_load((paths.build_dir() / profile / "params" / f"{node}.yaml").read_text())
    return {**interactive.committed_defaults(node), **written}


def test_only_profile_set_resolves_every_parameter_as_make(workdir, capsys):
    ns = _cell("02_train", profile="smoke")
    res = interactive.setup("02_train", ns)
    expected = _make_params_file("02_train")
    assert {k: ns[k] for k in expected} == expected
    assert res.sources["profile"] == "cell"
    assert res.sources["epochs"] == "configs/smoke.yaml nodes.02_train" and res.sources["dataset"].startswith("cxrlib.dag")
    assert res.sources["lr"] == "notebook default"
    assert res.mode == "interactive" and res.run == dag.plan("smoke").run
    out = capsys.readouterr().out
    assert "interactive run" in out and str(res.results_dir) in out


def test_a_value_typed_in_the_cell_overrides_for_that_run_only(workdir):
    ns = _cell("02_train", profile="smoke", w_supcon=0.7)
    res = interactive.setup("02_train", ns)
    assert ns["w_supcon"] == 0.7 and res.sources["w_supcon"] == "cell (this run only)"
    assert ns["epochs"] == _make_params_file("02_train")["epochs"]
    assert res.run != dag.plan("smoke").run and "supcon0.7" in res.run
    published = paths.published_results_dir(dag.out_key("smoke"))
    assert paths.results_dir(dag.out_key("smoke")) == published / "interactive" / res.run
    assert paths.figures_dir("smoke").parts[-2:] == ("interactive", res.run)
    # the profile is unchanged: a fresh setup with only the profile is back to make's values
    ns2 = _cell("02_train", profile="smoke")
    interactive.setup("02_train", ns2)
    assert ns2["w_supcon"] == _make_params_file("02_train")["w_supcon"]


def test_profile_from_the_environment(workdir, monkeypatch):
    monkeypatch.setenv(interactive.PROFILE_ENV, "smoke")
    ns = _cell("03_retrieval_eval")
    res = interactive.setup("03_retrieval_eval", ns)
    assert ns["profile"] == "smoke" and res.sources["profile"].startswith(interactive.PROFILE_ENV)
    assert ns["models"] == _make_params_file("03_retrieval_eval")["models"]


def test_papermill_runs_are_left_alone(workdir):
    ns = _cell("02_train", profile="smoke", epochs=1)
    ns["In"] = ["", "profile = 'paper'", "# Parameters\nprofile = \"smoke\"\nepochs = 1\n"]
    before = dict(ns)
    res = interactive.setup("02_train", ns)
    assert res.mode == "papermill" and ns == before
    assert paths.results_dir("smoke") == paths.published_results_dir("smoke")


def test_make_runs_are_left_alone(workdir, monkeypatch):
    monkeypatch.setenv(interactive.MAKE_ENV, "02_train")
    ns = _cell("02_train", profile="smoke")
    assert interactive.setup("02_train", ns).mode == "papermill" and ns["epochs"] == _cell("02_train")["epochs"]


def test_publish_flag_writes_into_make_outputs(workdir):
    ns = _cell("02_train", profile="smoke", publish=True)
    res = interactive.setup("02_train", ns)
    assert res.mode == "publish" and paths.results_dir("smoke") == paths.published_results_dir("smoke")


def test_bad_cell_value_is_an_error_naming_it(workdir):
    ns = _cell("02_train", profile="smoke", w_supcon=-1.0)
    with pytest.raises(ValueError, match="w_supcon"):
        interactive.setup("02_train", ns)


def test_unknown_profile_lists_the_valid_ones(workdir):
    with pytest.raises(ValueError, match="smoke"):
        interactive.setup("02_train", _cell("02_train", profile="nope"))


def test_data_nodes_write_their_data_apart_and_inputs_fall_back(workdir):
    paths.set_interactive("01_data_prep", data="processed")
    assert paths.processed_dir() == paths.data_dir() / "interactive" / "01_data_prep" / "processed"
    assert paths.models_dir() == paths.data_dir() / "models"
    paths.set_interactive("runA")
    ckpt = paths.results_dir("smoke") / "models" / "runA" / "projector.pt"
    assert paths.readable(ckpt) == paths.published_results_dir("smoke") / "models" / "runA" / "projector.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    assert paths.readable(ckpt) == ckpt


@pytest.mark.slow
def test_executed_notebook_shows_text_progress_at_100(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "cxr-retrieval", "display_name": "Python (cxr-retrieval)", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("import cxrlib\nfrom tqdm.auto import tqdm\n"
                                          "for _ in tqdm(range(50), desc='work'):\n    pass")]
    src, out = tmp_path / "p.ipynb", tmp_path / "p.out.ipynb"
    nbformat.write(nb, src)
    env = {**os.environ, "PYTHONPATH": str(REPO), interactive.PLAIN_PROGRESS_ENV: "1"}
    run = subprocess.run([sys.executable, "-m", "papermill", "-k", "cxr-retrieval", "--no-progress-bar", str(src), str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    outputs = nbformat.read(out, as_version=4).cells[0].outputs
    assert not [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    text = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream" and o["name"] == "stdout")
    assert text.split("\r")[-1].strip().startswith("work: 100%") and "50/50" in text


# ---- clean notebooks -----------------------------------------------------------------------------

def _executed(nb_path) -> dict:
    """A notebook as JupyterLab saves it after a run: outputs, counts, full language_info, widget state."""
    nb = json.loads(nb_path.read_text())
    nb["metadata"]["language_info"] = {"name": "python", "version": "3.11.2", "mimetype": "text/x-python",
                                       "codemirror_mode": {"name": "ipython", "version": 3},
                                       "file_extension": ".py", "nbconvert_exporter": "python",
                                       "pygments_lexer": "ipython3"}
    nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    for i, c in enumerate(nb["cells"]):
        if c["cell_type"] == "code":
            c["execution_count"] = i + 1
            c["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hello\n"]}]
            c["metadata"]["execution"] = {"iopub.execute_input": "2026-01-01T00:00:00"}
    return nb


@pytest.mark.parametrize("name", ["02_train", "07_explore"])
def test_save_hook_writes_the_committed_file(tmp_path, name):
    committed = REPO / "notebooks" / f"{name}.ipynb"
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    model = {"type": "notebook", "content": _executed(committed)}
    nbclean.strip_on_save(model, f"notebooks/{name}.ipynb", type("CM", (), {"root_dir": str(tmp_path)})())
    target = tmp_path / "notebooks" / f"{name}.ipynb"
    nbformat.write(model["content"], target)
    assert target.read_text() == committed.read_text()


def test_save_hook_leaves_other_notebooks(tmp_path):
    model = {"type": "notebook", "content": _executed(REPO / "notebooks" / "02_train.ipynb")}
    nbclean.strip_on_save(model, "elsewhere/scratch.ipynb", type("CM", (), {"root_dir": str(tmp_path)})())
    assert model["content"]["cells"][1]["outputs"]


def test_source_key_ignores_outputs_and_metadata_not_code(tmp_path):
    committed = REPO / "notebooks" / "02_train.ipynb"
    ran = tmp_path / "02_train.ipynb"
    ran.write_text(json.dumps(_executed(committed)))
    assert nbclean.source_key(ran) == nbclean.source_key(committed)
    nb = json.loads(committed.read_text())
    nb["cells"][1]["source"][0] = 'profile = "smoke"\n'
    ran.write_text(json.dumps(nb))
    assert nbclean.source_key(ran) != nbclean.source_key(committed)
    keys = tmp_path / "keys"
    nbclean.write_source_keys(keys, [committed])
    before = (keys / "02_train.src").stat().st_mtime_ns
    nbclean.write_source_keys(keys, [committed])
    assert (keys / "02_train.src").stat().st_mtime_ns == before


def test_git_filter_hides_outputs_not_code(tmp_path):
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    committed = REPO / "notebooks" / "02_train.ipynb"
    nb_path = repo / "notebooks" / "02_train.ipynb"
    nb_path.write_text(committed.read_text())
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-C", str(repo)]
    subprocess.run(git + ["init", "-q"], check=True)
    nbclean.install_git(repo)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "nb"], check=True)
    status = lambda: subprocess.run(git + ["status", "--porcelain"], capture_output=True, text=True, check=True).stdout  # noqa: E731
    nb_path.write_text(json.dumps(_executed(committed), indent=1))
    # git status flags the changed size until the next add; the content through the filter is unchanged
    # (JupyterLab's saves are stripped by the save hook, so they do not change the size either)
    assert subprocess.run(git + ["diff", "--quiet"]).returncode == 0
    subprocess.run(git + ["add", "."], check=True)
    assert status() == ""
    edited = json.loads(committed.read_text())
    edited["cells"][1]["source"][0] = 'profile = "smoke"\n'
    nb_path.write_text(json.dumps(edited, indent=1))
    assert "02_train.ipynb" in status()


def test_install_jupyter_sets_the_save_hook_that_the_server_reads(tmp_path):
    (tmp_path / "jupyter_server_config.json").write_text(json.dumps({"ServerApp": {"port": 9999}}))
    path = nbclean.install_jupyter(tmp_path)
    assert json.loads(path.read_text()) == {"ServerApp": {"port": 9999},
                                            "ContentsManager": {"pre_save_hook": nbclean.HOOK}}
    code = ("from jupyter_server.serverapp import ServerApp; app = ServerApp(); "
            "app.initialize(argv=['--allow-root', '--port=0'], find_extensions=False, new_httpserver=False); "
            "print(app.contents_manager.pre_save_hook.__module__, app.contents_manager.pre_save_hook.__name__)")
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt"),
           "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("cxrlib.nbclean strip_on_save"), out.stderr[-1500:]
