"""Tables rendered from the tidy CSV: every number traceable to a CSV value, escaping, notes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrlib import report, retrieval


def _tidy() -> pd.DataFrame:
    rows = []
    for model, base in (("Frozen_A & co", 0.2), ("Tuned", 0.3)):
        for d_i, direction in enumerate(retrieval.DIRECTIONS):
            for gallery in ("raw", "merged"):
                for k in (1, 5):
                    v = base + 0.1 * k / 5 + 0.01 * d_i + (0.05 if gallery == "merged" else 0)
                    rows.append(dict(model=model, direction=direction, gallery=gallery, query_class="all",
                                     metric="recall", k=k, value=v, ci_low=v - 0.02, ci_high=v + 0.03, n=100,
                                     n_excluded=0, n_patients=60, gallery_size=100, note=""))
                rows.append(dict(model=model, direction=direction, gallery=gallery, query_class="all",
                                 metric="median_rank", k=pd.NA, value=12.5, ci_low=10.0, ci_high=15.0, n=100,
                                 n_excluded=0, n_patients=60, gallery_size=100, note=""))
            for cls, n in (("all", 100), ("normal", 40), ("abnormal", 60)):
                rows.append(dict(model=model, direction=direction, gallery="raw", query_class=cls,
                                 metric="label_precision", k=5, value=base + 0.4, ci_low=np.nan, ci_high=np.nan,
                                 n=n, n_excluded=0, n_patients=60, gallery_size=100, note=""))
            rows.append(dict(model=model, direction=direction, gallery="merged", query_class="all", metric="recall",
                             k=500, value=np.nan, ci_low=np.nan, ci_high=np.nan, n=0, n_excluded=0, n_patients=0,
                             gallery_size=80, note="k=500 exceeds the merged gallery size (80)"))
    df = pd.DataFrame(rows, columns=retrieval.COLUMNS)
    df["k"] = df["k"].astype("Int64")
    return df


def test_format_rules():
    assert report.format_value("recall", 0.12345) == "12.3"
    assert report.format_value("median_rank", 12.0) == "12.0"
    assert report.format_value("mrr", np.nan) == "n/a"
    assert report.format_cell("recall", 0.5, 0.41, 0.592) == "50.0 [41.0, 59.2]"
    assert report.format_cell("recall", 0.5, np.nan, np.nan) == "50.0"
    assert report.format_p(0.0004) == "<0.001" and report.format_p(0.0414) == "0.041"
    assert report.format_p(0.001) == "0.001" and report.format_p(1.0) == "1.000" and report.format_p(np.nan) == "n/a"


def test_every_cell_comes_from_the_csv(tmp_path):
    df = _tidy()
    paths = report.write_tables(df, tmp_path, subtitle="DEMO LABEL")
    back = report.read_results(paths["csv"])
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    md = paths["md"].read_text()
    assert "DEMO LABEL" in md
    for _, r in df[(df.metric == "recall") & (df.k == 5) & (df.gallery == "raw")].iterrows():
        expected = f"{100 * r.value:.1f} [{100 * r.ci_low:.1f}, {100 * r.ci_high:.1f}]"
        row = next(line for line in md.splitlines() if line.startswith(f"| {r.model.replace('|', '')} ")
                   and report.DIRECTION_LABELS[r.direction] in line)
        assert expected in row
    assert "12.5 [10.0, 15.0]" in md  # median rank shown as a rank, not in percent
    assert "k=500 exceeds the merged gallery size (80)" in md  # the skipped k is stated
    assert "R@500" in md and "n/a" in md


def test_sections_and_per_class_columns():
    r = report.render_results(_tidy())
    present = {"strict", "unique_text", "label_match"}  # the protocols _tidy() holds (derived from gallery)
    assert set(r.tables) == {s.title for s in report.SECTIONS if s.protocol in present}
    per_class = r.tables["Label match per query class"]
    assert list(per_class.columns[:4]) == ["Model", "Direction", "n normal", "n abnormal"]
    assert per_class["n normal"].tolist() == [40] * 4 and "P@5 abnormal" in per_class.columns
    exact = r.tables[report.SECTIONS[0].title]
    assert exact["Model"].tolist() == ["Frozen_A & co", "Tuned"] * 2  # order of first appearance, per direction


def test_latex_is_escaped_booktabs():
    tex = report.render_results(_tidy()).latex
    assert tex.count(r"\begin{table}") == 8  # 4 sections x 2 directions
    assert r"\toprule" in tex and r"\bottomrule" in tex and tex.count(r"\resizebox{\linewidth}{!}") == 8
    assert r"Frozen\_A \& co" in tex and "Frozen_A & co" not in tex
    assert r"95\%" in tex


def test_comparison_table_from_paired_tests():
    rng = np.random.default_rng(0)
    from cxrlib.pairs import PairedSplit

    n, d = 40, 8
    txt = rng.standard_normal((n, d)).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    img = txt + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    noise = rng.standard_normal((n, d)).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    ids = np.arange(n).astype(str)
    labels = rng.integers(0, 2, n)  # random labels, the same for both models (the same queries)
    assert 0 < labels.sum() < n

    def mk(im):
        return PairedSplit(im, txt, labels, ids, ids, ids, np.arange(n), None, pd.DataFrame())

    a = retrieval.query_scores(mk(img), "tuned", (1, 5))
    b = retrieval.query_scores(mk(noise), "frozen", (1, 5))
    paired = retrieval.compare_models(a, b, n_boot=100, n_perm=500)
    t = report.comparison_table(paired)
    assert set(t["Comparison"]) == {"tuned vs frozen"}
    row = t[(t.Metric == "R@1") & (t.Direction == "image-to-report") & (t.Protocol == "strict")].iloc[0]
    src = paired[(paired.metric == "recall") & (paired.k == 1) & (paired.direction == "image_to_text")
                 & (paired.gallery == "raw") & (paired.query_class == "all")].iloc[0]
    assert row["A"] == f"{100 * src.value_a:.1f}" and row["B"] == f"{100 * src.value_b:.1f}"
    # the p cells, formatted here by the rule (3 decimals, "<0.001" below 0.001), not by report.format_p
    expected_p = "<0.001" if src.p_value < 0.001 else f"{src.p_value:.3f}"
    assert row["p"] == expected_p and row["p"] != "n/a"
    label = paired[(paired.metric == "label_precision") & (paired.k == 5) & (paired.direction == "text_to_image")
                   & (paired.query_class == "all")].iloc[0]
    cell = t[(t.Metric == "P@5") & (t.Direction == "report-to-image") & (t.B == f"{100 * label.value_b:.1f}")]
    assert cell["p"].tolist() == ["<0.001" if label.p_value < 0.001 else f"{label.p_value:.3f}"]
    md = report.render_results(retrieval.summarise(a, n_boot=20), paired).markdown
    assert "Paired comparison" in md


def test_markdown_escapes_pipes_and_handles_empty():
    t = pd.DataFrame({"Model": ["a|b"], "x": ["1.0"]})
    assert "a\\|b" in report.to_markdown(t)
    assert report.to_markdown(pd.DataFrame()) == "_no rows_\n"
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['direction', 'query_class', .*'n', "
                                         r"'protocol \(or gallery\)'\]"):
        report.wide_table(pd.DataFrame({"model": ["m"]}), report.SECTIONS[0])
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['ci_high'\]"):
        report.wide_table(_tidy().drop(columns="ci_high"), report.SECTIONS[0])


def test_latex_p_values_use_math_less_than():
    t = pd.DataFrame({"Comparison": ["a vs b"], "p": [report.format_p(1e-5)]})
    tex = report.to_latex(t, "cap", "tab:x")
    assert "$<$0.001" in tex and "& <0.001" not in tex
