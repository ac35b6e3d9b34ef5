"""A peer's evaluation set in the make DAG: ``make paper EVAL_SET=<set>`` builds the set's table and embeds it
with every backbone key before notebook 03; without ``EVAL_SET`` the DAG is the one it always was."""

from __future__ import annotations

import re
import shutil

import pandas as pd
import pytest
from conftest import run_make

from cxrlib import dag
from cxrlib.datasets.fixtures import make_fake_openi_nlm


def _steps(workdir, *extra: str) -> list[str]:
    """The steps ``make -n dag PROFILE=smoke`` would run, in make's order."""
    out = run_make(["-n", "dag", "PROFILE=smoke", *extra], workdir).stdout
    return re.findall(r'>> smoke: ([^"\n]+)', out)


def test_eval_set_build_and_embeddings_run_before_notebook_03(tmp_path):
    with_set = _steps(tmp_path, "EVAL_SET=openi_cxrclip")
    without = _steps(tmp_path)
    eval_steps = ["evalset openi_cxrclip", "embed openi_cxrclip tiny", "embed openi_cxrclip tiny-adapted"]
    assert set(eval_steps) <= set(with_set), with_set
    at = {s: i for i, s in enumerate(with_set)}
    assert at["evalset openi_cxrclip"] < at["embed openi_cxrclip tiny"] < at["03_retrieval_eval"]
    assert at["00_adapt_backbone"] < at["embed openi_cxrclip tiny-adapted"] < at["03_retrieval_eval"]
    # without EVAL_SET: the same DAG less the evaluation set's steps, nothing of the set in its make text
    assert [s for s in with_set if s not in eval_steps] == without
    assert not any("openi_cxrclip" in s or s.startswith("evalset") for s in without)
    assert "EVAL_" not in (tmp_path / "build" / "smoke" / "dag.mk").read_text()


def test_eval_set_params_follow_the_training_data_set(workdir):
    """The set's table and embedding folders are shared by every profile and data set, so what they are built
    from is recorded there too: an adapted backbone trained on another DATASET is another checkpoint."""
    p = dag.plan("smoke", ["EVAL_SET=openi_cxrclip"], environ={})
    assert p.eval_set == "openi_cxrclip" and "evalset" in [n.name for n in p.nodes]
    assert p.eval_build == workdir / "build" / "evalsets" / "openi_cxrclip"
    par = p.eval_set_params()
    assert set(par) == {"table", "tiny", "tiny-adapted"}
    assert par["tiny"]["backbone"] == "tiny" and par["tiny"]["checkpoint"] is None
    assert par["tiny-adapted"]["checkpoint"].endswith("synthetic/tiny-adapted.pt")
    assert par["tiny-adapted"]["precision"] == p.params["embed"]["precision"]
    other = dag.plan("smoke", ["EVAL_SET=openi_cxrclip", "DATASET=openi"], environ={}).eval_set_params()
    assert other["tiny-adapted"]["checkpoint"].endswith("openi/tiny-adapted.pt")
    assert other["tiny"] == par["tiny"]
    assert "dataset" not in par["table"] and "openi_root" in par["table"]
    none = dag.plan("smoke", [], environ={})
    assert none.eval_set is None and none.eval_set_params() == {} and "evalset" not in [n.name for n in none.nodes]


def test_unknown_eval_set_stops_make_with_one_line(tmp_path):
    out = run_make(["-n", "dag", "PROFILE=smoke", "EVAL_SET=chexpert_5x200"], tmp_path, check=False)
    assert out.returncode != 0 and "EVAL_SET" in out.stderr and "openi_cxrclip" in out.stderr


@pytest.mark.slow
def test_make_with_eval_set_end_to_end(smoke_dag, tmp_path):
    """A copy of the session's smoke DAG (mtimes kept) + a fake Open-I copy: one make command builds the set,
    embeds it, reruns notebook 03 on it and nothing else; a second one runs nothing. The fake copy sits in
    the default place (data/raw/openi): OPENI_ROOT is a parameter of notebook 01 and would rerun it all."""
    work = tmp_path / "work"
    shutil.copytree(smoke_dag[0], work, symlinks=True)
    make_fake_openi_nlm(work / "data" / "raw" / "openi", n_studies=24)
    args = ["dag", "PROFILE=smoke", "EVAL_SET=openi_cxrclip"]
    ran = re.findall(r">> smoke: (.+)", run_make(args, work).stdout)
    assert ran == ["evalset openi_cxrclip", "embed openi_cxrclip tiny", "embed openi_cxrclip tiny-adapted",
                   "03_retrieval_eval"], ran
    table = pd.read_parquet(work / "data" / "processed" / "openi_cxrclip.parquet")
    assert len(table) == 24 and set(table["split"]) == {"test"}
    res = pd.read_csv(work / "results" / "smoke-openi_cxrclip" / "retrieval.csv")
    assert {"tiny (frozen)", "tiny-adapted + projector"} <= set(res["model"]) and "unique_text" in set(res["protocol"])
    assert "Evaluation set: `openi_cxrclip`" in (work / "results" / "smoke-openi_cxrclip" / "retrieval.md").read_text()
    assert re.findall(r">> smoke: (.+)", run_make(args, work).stdout) == []


def test_table_params_keep_what_the_set_is_built_from():
    from cxrlib import evalsets

    got = evalsets.table_params("openi_cxrclip", {"dataset": "synthetic", "n_examples": 4, "openi_root": "/x",
                                                  "verify_images": False, "profile": "smoke"})
    assert got == {"openi_root": "/x", "verify_images": False}
    with pytest.raises(ValueError, match="unknown evaluation set"):
        evalsets.table_params("chexpert_5x200", {})


def test_preflight_checks_the_eval_sets_copy_before_anything_runs(workdir, capsys):
    from cxrlib import preflight

    assert preflight.main(["--profile", "smoke", "--eval-set", "mimic_5x200"]) == 2
    assert "MIMIC_ROOT" in capsys.readouterr().err
    assert preflight.main(["--profile", "smoke", "--eval-set", ""]) == 0
