"""make check-demo: reference cells stored by make readme, compared with a finished run's CIs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cxrlib import check_demo, paths

MODELS = ("offline (frozen, unadapted)", "offline-adapted + projector")


def _results(rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for model in MODELS:
        for direction in ("image_to_text", "text_to_image"):
            for metric, gallery, k in [*check_demo.HEADLINE, ("recall", "raw", 5), ("mrr", "merged", None)]:
                for cls in ("all", "normal"):
                    v = float(rng.uniform(0.05, 0.8))
                    rows.append({"model": model, "direction": direction, "metric": metric, "gallery": gallery,
                                 "k": k, "query_class": cls, "value": v, "ci_low": v - 0.02, "ci_high": v + 0.03,
                                 "n": 791})
    return pd.DataFrame(rows)


PARAMS = {"02_train": {"w_supcon": 1.0, "seed": 0}, "embed": {"precision": "fp32"}}


def _write_run(results: pd.DataFrame, parameters: dict = PARAMS) -> None:
    res = paths.ensure_dir(paths.results_dir("offline"))
    results.to_csv(res / "retrieval.csv", index=False)
    (res / "run_manifest.json").write_text(json.dumps({"git": {"commit": "abc1234def", "dirty": False},
                                                        "created": "2026-12-01T21:00:00",
                                                        "parameters": parameters}))


@pytest.fixture
def run(workdir):
    results = _results(np.random.default_rng(0))
    _write_run(results)
    ref = workdir / "reference.json"
    check_demo.write_reference("offline", ref)
    return results, ref


def test_reference_holds_every_headline_cell(run):
    results, ref = run
    stored = json.loads(ref.read_text())
    assert stored["commit"] == "abc1234def"
    assert len(stored["values"]) == len(MODELS) * 2 * len(check_demo.HEADLINE)
    # an independent pick of one cell: report-to-image mAP of the projector, all queries
    want = results[(results.model == MODELS[1]) & (results.direction == "text_to_image")
                   & (results.metric == "label_map") & (results.query_class == "all")].iloc[0]
    got = [v for v in stored["values"] if v["model"] == MODELS[1] and v["direction"] == "text_to_image"
           and v["metric"] == "label_map"]
    assert len(got) == 1 and got[0]["value"] == pytest.approx(want["value"]) and got[0]["k"] is None


def test_same_run_passes_identical(run, capsys):
    _, ref = run
    assert check_demo.main(["--reference", str(ref)]) == 0
    out = capsys.readouterr().out
    assert "16/16 headline numbers inside" in out and "(16 identical)" in out and "PASS" in out


def test_value_inside_ci_passes_outside_fails(run, capsys):
    results, ref = run
    sel = ((results.model == MODELS[1]) & (results.direction == "image_to_text") & (results.metric == "recall")
           & (results.gallery == "merged") & (results.k == 5) & (results.query_class == "all"))
    moved = results.copy()
    moved.loc[sel, "value"] += 0.025  # inside [v - 0.02, v + 0.03]
    _write_run(moved)
    assert check_demo.main(["--reference", str(ref)]) == 0
    moved.loc[sel, "value"] += 0.01  # now 0.035 above: outside
    _write_run(moved)
    assert check_demo.main(["--reference", str(ref)]) == 1
    out = capsys.readouterr().out
    bad = [line for line in out.splitlines() if line.rstrip().endswith("NO")]
    assert len(bad) == 1 and "image-to-report" in bad[0] and "R@5 merged" in bad[0]
    assert "FAIL: 1 outside" in out


def test_a_missing_cell_fails(run, capsys):
    results, ref = run
    drop = (results.model == MODELS[0]) & (results.metric == "label_precision") & (results.query_class == "all")
    _write_run(results[~drop])
    assert check_demo.main(["--reference", str(ref)]) == 1
    assert "missing" in capsys.readouterr().out


def test_no_run_names_make_demo(workdir, capsys):
    ref = workdir / "reference.json"
    ref.write_text(json.dumps({"values": []}))
    assert check_demo.main(["--reference", str(ref)]) == 2
    assert "make demo" in capsys.readouterr().err


def test_no_reference_names_make_readme(workdir, capsys):
    _write_run(_results(np.random.default_rng(1)))
    assert check_demo.main(["--reference", str(workdir / "absent.json")]) == 2
    assert "make readme" in capsys.readouterr().err


def test_duplicate_rows_are_an_error(workdir):
    results = _results(np.random.default_rng(2))
    with pytest.raises(ValueError, match="expected one"):
        check_demo.headline_values(pd.concat([results, results.iloc[:1]]))


def test_a_run_with_other_settings_is_named_setting_by_setting(run, capsys):
    results, ref = run
    assert json.loads(ref.read_text())["parameters"] == PARAMS
    check_demo.main(["--reference", str(ref)])
    assert "settings differ" not in capsys.readouterr().out  # the same settings: nothing said
    _write_run(results, {"02_train": {"w_supcon": 0.5, "seed": 0}, "embed": {"precision": "fp32", "x": 1}})
    assert check_demo.main(["--reference", str(ref)]) == 0  # the verdict is the numbers' alone
    out = capsys.readouterr().out
    assert "differ from the reference's in 2 place(s)" in out and "make demo" in out
    assert "02_train.w_supcon: reference 1.0, this run 0.5" in out
    assert "embed.x: reference not set, this run 1" in out


def test_setting_differences_without_recorded_parameters_says_nothing():
    assert check_demo.setting_differences(None, PARAMS) == [] and check_demo.setting_differences(PARAMS, {}) == []
    assert check_demo.setting_differences(PARAMS, PARAMS) == []
