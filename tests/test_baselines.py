"""The published-baselines file: schema, every row cited; placed beside ours only on a matching setting."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrlib import baselines


def test_published_file_schema_and_sources():
    df = baselines.load_published()
    assert list(df.columns[:len(baselines.COLUMNS)]) == list(baselines.COLUMNS)
    assert df["source"].str.contains("arXiv:").all() and df["location"].str.len().gt(5).all()
    assert df["verified"].str.len().gt(5).all()
    # every row states the outcome of its check: "checked <date>: <where> reads <value>" or "not checked: <why>"
    outcome = df["verified"].str.match(r"(checked \d{4}-\d{2}-\d{2}|not checked): \S")
    assert outcome.all(), df.loc[~outcome, ["model", "metric", "k", "verified"]]
    checked = df[df["verified"].str.startswith("checked")]
    cites_value = [f"reads {v}" in t for v, t in zip(checked["value"].astype(str), checked["verified"])]
    assert all(cites_value), checked.loc[[not c for c in cites_value], ["model", "metric", "k", "value"]]
    # at least the two settings the issue names
    assert {("mimic_5x200", "label_match_class"), ("mimic_test", "strict")} <= set(zip(df["eval_set"], df["protocol"]))
    assert df["proportion"].between(0, 1).all()


def test_a_row_without_source_or_with_a_wrong_metric_is_an_error(tmp_path):
    df = pd.read_csv(baselines.PUBLISHED_PATH)
    bad = df.copy()
    bad.loc[0, "source"] = ""
    bad.loc[1, "metric"] = "recall"  # not a metric of label_match_class
    bad.loc[2, "protocol"] = "recall_any"
    bad.loc[3, "verified"] = " "
    path = tmp_path / "b.csv"
    bad.to_csv(path, index=False)
    with pytest.raises(ValueError) as err:
        baselines.load_published(path)
    msg = str(err.value)
    assert "row 2" in msg and "empty source" in msg and "not one of protocol label_match_class" in msg
    assert "unknown protocol 'recall_any'" in msg
    assert "row 5" in msg and "empty verified" in msg


def _results(protocol, metric, eval_dir="image_to_text"):
    rows = [dict(model="ours", direction=eval_dir, protocol=protocol, query_class="all", metric=metric, k=k,
                 value=0.5, ci_low=0.4, ci_high=0.6) for k in (1, 5, 10)]
    df = pd.DataFrame(rows)
    df["k"] = df["k"].astype("Int64")
    return df


def test_beside_ours_only_where_eval_set_and_protocol_match():
    res = _results("label_match_class", "class_precision")
    tables = baselines.beside_ours(res, "mimic_5x200")
    t = tables[("label_match_class", "image_to_text")]
    assert t["Model"].tolist()[0] == "ours" and "MGCA-ViT" in t["Model"].tolist()
    assert t.loc[t["Model"] == "ours", "P@5"].item() == "50.0 [40.0, 60.0]"
    assert t.loc[t["Model"] == "MGCA-ViT", "Source"].item().startswith("Zhou et al.")
    assert baselines.beside_ours(res, "openi_test") == {}  # other evaluation set: nothing placed
    assert baselines.beside_ours(_results("strict", "recall"), "mimic_5x200") == {}  # other protocol
    assert baselines.beside_ours(_results("label_match_class", "class_precision", "text_to_image"),
                                 "mimic_5x200") == {}  # other direction


def test_published_value_rendered_from_the_file():
    df = baselines.load_published()
    t = baselines.beside_ours(_results("strict", "recall"), "mimic_test", df)[("strict", "image_to_text")]
    row = df[(df["model"] == "MedProbCLIP") & (df["k"] == 10) & (df["direction"] == "image_to_text")]
    assert t.loc[t["Model"] == "MedProbCLIP", "R@10"].item() == f"{float(row['value'].item()):.1f}"
    assert not np.isnan(row["proportion"].item())


def test_eval_set_names():
    assert baselines.eval_set_name("mimic", "test") == "mimic_test"
    assert baselines.eval_set_name("mimic_5x200") == "mimic_5x200"
