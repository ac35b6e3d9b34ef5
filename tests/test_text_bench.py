"""Report-side benchmarks on hand-built embeddings with known answers, against a naive loop, and
the variant sets / embedding cache / tables on a tiny table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrlib import stats
from cxrlib import text_bench as tb
from cxrlib.text_bench import VariantSets

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _unit(v):
    v = np.asarray(v, np.float32)
    return v / np.linalg.norm(v)


def _sets(rewrites: dict[str, list[tuple[str, str]]], groups=(0, 1, 2, 2), errors=(), equivalent=()):
    ids = [f"s{i}" for i in range(len(groups))]
    studies = pd.DataFrame({"study_id": ids, "patient_id": [f"p{i}" for i in range(len(groups))],
                            "report_group": list(groups), "text": [f"t{g}" for g in groups]})
    rw = {k: pd.DataFrame([(s, t, "r") for s, t in v], columns=["study_id", "text", "rules"]) for k, v in rewrites.items()}
    return VariantSets(studies, rw, pd.DataFrame(list(equivalent), columns=["study_id", "text"]),
                       pd.DataFrame(list(errors), columns=["study_id", "kind", "text", "detail"]), {"a": 1})


def _naive_group_rank(q, qg, gal, gg):
    ranks = []
    for i in range(len(q)):
        s = gal @ q[i]
        order = sorted(range(len(gal)), key=lambda j: (-s[j], j))
        ranks.append(1 + next(r for r, j in enumerate(order) if gg[j] == qg[i]))
    return np.array(ranks)


def test_style_robustness_hand_built_and_equal_to_a_naive_loop():
    e = np.eye(4, dtype=np.float32)
    emb = {"orig|s0": e[0], "orig|s1": e[1], "orig|s2": e[2], "orig|s3": e[2],
           "style:a|s0": _unit([1, 0.1, 0, 0]),      # nearest its own original: rank 1
           "style:a|s1": _unit([0, 0.5, 1, 0]),      # nearer group 2 than its own: rank 2
           "style:a|s3": _unit([0.2, 0, 1, 0])}      # group 2 (identical reports s2/s3 are one item): rank 1
    sets = _sets({"a": [("s0", "x"), ("s1", "y"), ("s3", "z")]})
    sc = tb.style_scores(sets, emb, "m", ks=(1, 2))
    ids, r1 = sc.values[("style_robustness", "a", "report_to_report", "recall", "", 1)]
    _, r2 = sc.values[("style_robustness", "a", "report_to_report", "recall", "", 2)]
    assert list(ids) == ["s0", "s1", "s3"] and list(r1) == [1, 0, 1] and list(r2) == [1, 1, 1]
    gal = np.stack([e[0], e[1], e[2]])
    q = np.stack([emb["style:a|s0"], emb["style:a|s1"], emb["style:a|s3"]])
    naive = _naive_group_rank(q, [0, 1, 2], gal, [0, 1, 2])
    assert list(naive <= 1) == list(r1.astype(bool))
    df = tb.summarise(sc, n_boot=200, seed=1)
    row = df[(df["k"] == 1)].iloc[0]
    iv = stats.bootstrap_ci(r1, ["p0", "p1", "p3"], 200, 1)
    assert row["value"] == pytest.approx(2 / 3) and row["ci_low"] == iv.ci_low and row["n_patients"] == 3
    assert "leaves unchanged" in row["note"]


def test_random_embeddings_match_the_naive_loop():
    rng = np.random.default_rng(0)
    n, d = 30, 8
    groups = rng.integers(0, 20, n)
    orig = {f"orig|s{i}": _unit(rng.standard_normal(d)) for i in range(n)}
    rew = {f"style:a|s{i}": _unit(rng.standard_normal(d)) for i in range(n)}
    sets = _sets({"a": [(f"s{i}", "x") for i in range(n)]}, groups=tuple(groups))
    sc = tb.style_scores(sets, {**orig, **rew}, "m", ks=(1, 5))
    gg = sorted(set(groups.tolist()))  # merged gallery: each group's mean member embedding, re-normalised
    gal = np.stack([_unit(sum(orig[f"orig|s{i}"] for i in range(n) if groups[i] == g)) for g in gg])
    q = np.stack([rew[f"style:a|s{i}"] for i in range(n)])
    naive = _naive_group_rank(q, groups, gal, gg)
    _, r5 = sc.values[("style_robustness", "a", "report_to_report", "recall", "", 5)]
    np.testing.assert_array_equal(r5, (naive <= 5).astype(float))


def test_merged_gallery_is_the_group_mean_whatever_the_row_order():
    """Two members of one group whose raw texts embed differently: the group's item is their mean, so
    reordering the rows changes nothing (the first member would make s1's query a miss or a hit)."""
    e = np.eye(3, dtype=np.float32)
    emb = {"orig|s0": e[0], "orig|s1": e[1], "orig|s2": _unit([0.9, 1, 0]),
           "style:a|s0": _unit([1, 0.8, 0])}
    # the query scores 0.78 with s0, 0.62 with s1 alone (a hit if s1 stood for group 1), 0.99 with s2
    # alone (a miss), 0.86 with the group's mean (a miss): only the mean is independent of the order
    for order in ([0, 1, 2], [0, 2, 1]):
        sets = _sets({"a": [("s0", "x")]}, groups=(0, 1, 1))
        sets.studies = sets.studies.iloc[order].reset_index(drop=True)
        sc = tb.style_scores(sets, emb, "m", ks=(1,))
        _, r1 = sc.values[("style_robustness", "a", "report_to_report", "recall", "", 1)]
        assert list(r1) == [0.0]


def test_image_to_report_drop_hand_built():
    e = np.eye(3, dtype=np.float32)
    emb = {"orig|s0": e[0], "orig|s1": e[1], "orig|s2": e[2],
           "style:a|s0": _unit([0, 1, 0.1]), "style:a|s1": e[1]}  # s0's rewrite moves onto s1's direction
    img = {"s0": _unit([1, 0.2, 0]), "s1": _unit([0.1, 1, 0]), "s2": e[2]}
    sets = _sets({"a": [("s0", "x"), ("s1", "y")]}, groups=(0, 1, 2))
    sc = tb.style_scores(sets, emb, "m", ks=(1,), image_emb=img)
    _, orig = sc.values[("style_robustness", "original", "image_to_report", "recall", "", 1)]
    _, rew = sc.values[("style_robustness", "a", "image_to_report", "recall", "", 1)]
    assert list(orig) == [1, 1, 1] and list(rew) == [0, 1, 1]
    drop = tb.style_drop(sc, n_boot=100, n_perm=100)
    assert drop.iloc[0]["diff"] == pytest.approx(1 / 3) and drop.iloc[0]["style"] == "a"


def test_error_discrimination_hand_worked_ties_fail():
    e = np.eye(3, dtype=np.float32)
    emb = {"orig|s0": e[0], "orig|s1": e[1], "equiv|s0": _unit([1, 0.5, 0]), "equiv|s1": _unit([0.5, 1, 0]),
           "err:flip|s0": _unit([1, 0, 0.9]),      # below the rewrite
           "err:side|s0": _unit([1, 0, 0.1]),      # above the rewrite
           "err:flip|s1": _unit([0.5, 1, 0])}      # ties the rewrite: a failure
    sets = _sets({}, groups=(0, 1), equivalent=[("s0", "x"), ("s1", "y")],
                 errors=[("s0", "flip", "a", ""), ("s0", "side", "b", ""), ("s1", "flip", "c", "")])
    sc = tb.error_scores(sets, emb, "m")
    key = lambda kind: ("error_discrimination", "", "report_to_report", "accuracy", kind, 0)  # noqa: E731
    assert list(sc.values[key("flip")][1]) == [1, 0]
    assert list(sc.values[key("side")][1]) == [0]
    assert list(sc.values[key("all")][1]) == [0, 0]
    table = tb.error_table(tb.summarise(sc, n_boot=0))
    assert list(table.columns) == ["Model", "overall (n=2)", "flip (n=2)", "side (n=1)"]


def test_compare_equals_stats_paired_test():
    ids = np.array(["s0", "s1", "s2", "s3"])
    key = ("style_robustness", "a", "report_to_report", "recall", "", 1)
    pats = {s: f"p{i // 2}" for i, s in enumerate(ids)}
    a = tb.BenchScores("A", {key: (ids, np.array([1.0, 1, 0, 1]))}, pats)
    b = tb.BenchScores("B", {key: (ids, np.array([0.0, 1, 0, 0]))}, pats)
    df = tb.compare(a, b, n_boot=100, n_perm=1000, seed=3)
    ref = stats.paired_test([1, 1, 0, 1], [0, 1, 0, 0], ["p0", "p0", "p1", "p1"], 100, 1000, 3)
    assert df.iloc[0]["diff"] == ref.diff and df.iloc[0]["p_value"] == ref.p_value
    c = tb.BenchScores("C", {key: (ids[::-1], np.zeros(4))}, pats)
    with pytest.raises(ValueError, match="different queries"):
        tb.compare(a, c)


# ---- on a tiny table -------------------------------------------------------------------------------

TABLE = pd.DataFrame({
    "study_id": ["s1", "s2", "s3", "s4"], "patient_id": ["p1", "p1", "p2", "p3"],
    "findings": ["There is a small left pleural effusion. No pneumothorax.", "Mild cardiomegaly. No effusion.",
                 "Lungs are clear. No pleural effusion or pneumothorax.", "Lungs are clear. No pleural effusion or pneumothorax."],
    "impression": ["Small left pleural effusion.", "Mild cardiomegaly.", "No acute cardiopulmonary abnormality.",
                   "No acute cardiopulmonary abnormality."],
})
TABLE["report"] = TABLE["findings"] + " " + TABLE["impression"]
TABLE["report_group"] = [0, 1, 2, 2]


def test_variant_sets_ids_unique_and_seeded():
    a = tb.build_variant_sets(TABLE, ("abbreviated", "reordered"), seed=0)
    b = tb.build_variant_sets(TABLE, ("abbreviated", "reordered"), seed=0)
    texts = a.texts()
    assert texts["id"].is_unique and texts.equals(b.texts())
    assert set(a.errors["study_id"]) <= set(a.equivalent["study_id"])
    assert a.unchanged["abbreviated"] + len(a.rewrites["abbreviated"]) == 4
    with pytest.raises(ValueError, match="lacks columns"):
        tb.build_variant_sets(TABLE.drop(columns="impression"), ("reordered",))


def test_end_to_end_with_the_tiny_llama_through_the_cache(tmp_path):
    from cxrlib import text_towers as tt

    bk = tt.load_text_tower("tiny-llama")
    sets = tb.build_variant_sets(TABLE, ("abbreviated", "reordered"), seed=0)
    emb = tb.embed_texts(bk, sets.texts(), tmp_path / "emb", batch_size=8, progress=False)
    assert len(emb) == len(sets.texts()["id"].unique())
    sc = tb.merge_scores(tb.style_scores(sets, emb, "tiny"), tb.error_scores(sets, emb, "tiny"))
    df = tb.summarise(sc, n_boot=50)
    assert set(df["benchmark"]) == {"style_robustness", "error_discrimination"}
    assert df["value"].between(0, 1).all()
    files = tb.write_results(df, tb.compare(sc, sc, n_boot=10, n_perm=10), tmp_path / "out", subtitle="TINY")
    md = (tmp_path / "out" / "text_bench.md").read_text()
    assert "TINY" in md and "Error discrimination" in md and all(f.is_file() for f in files)
    again = tb.embed_texts(bk, sets.texts(), tmp_path / "emb", batch_size=8, progress=False)
    assert all(np.array_equal(emb[k], again[k]) for k in emb)
    fig = tb.plot_text_bench(df, k=10)
    assert len(fig.axes) == 2
