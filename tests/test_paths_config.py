"""cxrlib.paths redirects, cxrlib.config profile resolution and validation."""

from __future__ import annotations

import json

import pytest
import yaml

from cxrlib import config, paths
from cxrlib.io import atomic_path, write_text_if_changed


def test_workdir_redirects_everything(workdir):
    assert paths.data_dir() == workdir / "data"
    assert paths.results_dir("smoke") == workdir / "results" / "smoke"
    assert paths.figures_dir("offline") == workdir / "figures" / "offline"
    assert paths.build_dir() == workdir / "build"
    assert paths.study_table_path("openi") == workdir / "data" / "processed" / "openi.parquet"
    assert paths.openi_root() == workdir / "data" / "raw" / "openi"
    assert paths.mimic_root() is None


def test_individual_overrides(workdir, monkeypatch, tmp_path):
    monkeypatch.setenv("OPENI_ROOT", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("CXR_RESULTS_DIR", str(tmp_path / "res"))
    assert paths.openi_root() == tmp_path / "elsewhere"
    assert paths.results_dir("paper") == tmp_path / "res" / "paper"


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "t.txt"
    target.write_text("good")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["t.txt"]


def test_write_if_changed_keeps_mtime(tmp_path):
    f = tmp_path / "p.yaml"
    assert write_text_if_changed(f, "a: 1\n")
    assert not write_text_if_changed(f, "a: 1\n")
    assert write_text_if_changed(f, "a: 2\n")


def _nb(tmp_path, src):
    nb = {"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": src,
                     "outputs": [], "execution_count": None}], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    p = tmp_path / "n.ipynb"
    p.write_text(json.dumps(nb))
    return p


def test_notebook_parameters_parsed_not_executed(tmp_path):
    p = _nb(tmp_path, "profile = 'paper'\nw_supcon = 1.0\nseed: int = 3\n")
    assert config.notebook_parameters(p) == {"profile": "paper", "w_supcon": 1.0, "seed": 3}


def test_resolve_only_declared_keys_and_overrides(tmp_path):
    p = _nb(tmp_path, "profile = 'paper'\nw_supcon = 1.0\nw_bce = 1.0\nw_clip = 1.0\nseed = 0\n")
    params = config.resolve_params("smoke", "02_train", {"w_supcon": 0.5, "unrelated": 3, "seed": None},
                                   notebook=p)
    assert params["w_supcon"] == 0.5 and params["profile"] == "smoke"
    assert "unrelated" not in params


@pytest.mark.parametrize("bad", [{"w_supcon": -1}, {"w_bce": 0, "w_supcon": 0, "w_clip": 0}, {"seed": -2},
                                 {"w_clip": "x"}])
def test_bad_parameters_rejected(bad):
    with pytest.raises(config.ConfigError):
        config.validate_params(bad)


def test_unknown_profile_names_known_ones():
    with pytest.raises(config.ConfigError, match="smoke"):
        config.load_profile("nope")


def test_cli_writes_params(tmp_path, capsys):
    p = _nb(tmp_path, "profile = 'paper'\nw_supcon = 1.0\n")
    out = tmp_path / "params.yaml"
    # the CLI resolves notebooks by node name; use the API path for an ad-hoc notebook instead
    params = config.resolve_params("smoke", "x", {"w_supcon": 0.25}, notebook=p)
    write_text_if_changed(out, yaml.safe_dump(params))
    assert yaml.safe_load(out.read_text())["w_supcon"] == 0.25
    assert config._cli(["params", "--profile", "nope", "--node", "x", "--out", str(out)]) == 2
    assert "unknown profile" in capsys.readouterr().err
