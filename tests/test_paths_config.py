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
    import os

    f = tmp_path / "p.yaml"
    assert write_text_if_changed(f, "a: 1\n")
    os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    assert not write_text_if_changed(f, "a: 1\n")
    assert f.stat().st_mtime_ns == 1_000_000_000  # same content: not rewritten, so make sees no change
    assert write_text_if_changed(f, "a: 2\n")
    assert f.stat().st_mtime_ns > 1_000_000_000 and f.read_text() == "a: 2\n"


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
    params = config.resolve_params("smoke", "x", {"w_supcon": 0.5, "unrelated": 3, "seed": None},
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
    out = tmp_path / "params.yaml"
    assert config._cli(["params", "--profile", "smoke", "--node", "02_train", "--out", str(out), "W_SUPCON=0.25"]) == 0
    written = yaml.safe_load(out.read_text())
    assert written["w_supcon"] == 0.25 and written["profile"] == "smoke" and written["epochs"] == 3
    assert config._cli(["params", "--profile", "nope", "--node", "x", "--out", str(out)]) == 2
    assert "unknown profile" in capsys.readouterr().err


def test_cli_flags_for_a_script_node(tmp_path, capsys):
    f = tmp_path / "embed.yaml"
    f.write_text(yaml.safe_dump({"batch_size": 16, "num_workers": "auto", "compile": False, "decode": "auto",
                                 "device": "cpu", "precision": None}))
    assert config._cli(["flags", str(f)]) == 0
    printed = capsys.readouterr().out.split()
    assert "--compile" not in printed and "--precision" not in printed
    assert printed[printed.index("--batch-size") + 1] == "16" and printed[printed.index("--num-workers") + 1] == "auto"


def test_script_node_gets_every_schema_setting():
    params = config.resolve_params("smoke", "embed")
    assert params["batch_size"] == 16 and params["precision"] == "fp32"  # the profile's
    assert params["decode"] == "auto" and params["compile"] is False  # the schema's defaults


def test_profiles_read_with_libyaml_equal_pyyamls_safe_load():
    """load_profile parses with libyaml's C parser where PyYAML has it: the same values as yaml.safe_load."""
    for profile in config.available_profiles():
        cfg = config.load_profile(profile)
        want = yaml.safe_load((paths.configs_dir() / f"{profile}.yaml").read_text())
        assert {k: v for k, v in cfg.items() if k != "profile"} == {"common": {}, "nodes": {}, **want}, profile
    assert config.parse_value("0.5") == 0.5 and config.parse_value("true") is True and config.parse_value("a") == "a"


def test_a_profile_read_twice_is_two_independent_copies(tmp_path, monkeypatch):
    """Profiles are parsed once per file version in a process; a caller changing its copy changes nobody else's,
    and an edited file is read again."""
    monkeypatch.setattr(paths, "configs_dir", lambda: tmp_path)
    (tmp_path / "p.yaml").write_text("common: {seed: 1}\n")
    a = config.load_profile("p")
    a["common"]["seed"] = 99
    assert config.load_profile("p")["common"]["seed"] == 1
    (tmp_path / "p.yaml").write_text("common: {seed: 22}\n")
    assert config.load_profile("p")["common"]["seed"] == 22
