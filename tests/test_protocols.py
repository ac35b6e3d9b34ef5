"""The named retrieval protocols on a hand-built gallery where they disagree, chance levels, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrlib import protocols
from cxrlib.datasets.table import report_groups
from cxrlib.pairs import PairedSplit


def _angles(deg):
    r = np.deg2rad(np.asarray(deg, np.float64))
    return np.stack([np.cos(r), np.sin(r)], 1).astype(np.float32)


# Four studies. Reports 0 and 2 are the same string (same text embedding, angle 0); report 1 differs
# only in case and punctuation (canonically equal to 0 and 2); report 3 is abnormal.
REPORTS = ["No acute disease.", "no acute disease", "No acute disease.", "Large effusion."]
TXT_DEG = [0, 60, 0, 90]
IMG_DEG = [80, 40, 85, 50]
LABELS = [0, 0, 0, 1]
# image -> text rankings (cos of the angle difference; t0 before t2 on their exact tie):
#   i0: t3 t1 t0 t2   i1: t1 t0 t2 t3   i2: t3 t1 t0 t2   i3: t1 t3 t0 t2


def hand_split(**table_extra) -> PairedSplit:
    table = pd.DataFrame({"report": REPORTS, **table_extra})
    ids = np.array([f"s{i}" for i in range(4)])
    return PairedSplit(img=_angles(IMG_DEG), txt=_angles(TXT_DEG), labels=np.array(LABELS, np.int64),
                       study_ids=ids, patient_ids=ids, image_ids=ids,
                       report_groups=report_groups(table["report"])[0], findings=None, table=table)


def _values(ps, direction, gallery, metric, k=0):
    return ps.scores.values[(direction, gallery, metric, k)]


def test_protocols_disagree_on_the_hand_gallery():
    ps = protocols.protocol_scores(hand_split(), "m", ["strict", "unique_text", "duplicate_positive", "label_match"],
                                   ks=(1, 2))
    i2t = "image_to_text"
    # strict: own-text ranks 3, 1, 4, 2
    np.testing.assert_array_equal(_values(ps, i2t, "raw", "median_rank"), [3, 1, 4, 2])
    assert np.mean(_values(ps, i2t, "raw", "recall", 2)) == 0.5
    assert np.mean(_values(ps, i2t, "raw", "mrr")) == pytest.approx((1 / 3 + 1 + 1 / 4 + 1 / 2) / 4)
    # unique_text: gallery of 3 strings; query 2's string is the one of t0 -> rank 3, not 4
    np.testing.assert_array_equal(_values(ps, i2t, "merged", "median_rank"), [3, 1, 3, 2])
    assert np.mean(_values(ps, i2t, "merged", "mrr")) == pytest.approx((1 / 3 + 1 + 1 / 3 + 1 / 2) / 4)
    assert ps.scores.gallery_size[(i2t, "merged")] == 3
    # duplicate_positive: t0, t1, t2 are all hits for queries 0-2 -> t1 at rank 2 counts
    np.testing.assert_array_equal(_values(ps, i2t, "duplicates", "median_rank"), [2, 1, 2, 2])
    assert np.mean(_values(ps, i2t, "duplicates", "recall", 2)) == 1.0
    assert np.mean(_values(ps, i2t, "duplicates", "mrr")) == pytest.approx(0.625)
    # label_match: P@2 = (1/2 + 1 + 1/2 + 1/2) / 4
    np.testing.assert_allclose(_values(ps, i2t, "raw", "label_precision", 2), [0.5, 1, 0.5, 0.5])
    np.testing.assert_allclose(_values(ps, i2t, "raw", "label_precision", 1), [0, 1, 0, 0])


def test_chance_levels_on_the_hand_gallery():
    ps = protocols.protocol_scores(hand_split(), "m", ["strict", "unique_text", "duplicate_positive", "label_match"],
                                   ks=(1, 2))
    df = protocols.summarise(ps, n_boot=0)
    row = df[(df["direction"] == "image_to_text") & (df["query_class"] == "all") & (df["k"] == 1)]
    chance = dict(zip(zip(row["protocol"], row["metric"]), row["chance"]))
    assert chance[("strict", "recall")] == pytest.approx(1 / 4)
    assert chance[("unique_text", "recall")] == pytest.approx(1 / 3)
    assert chance[("duplicate_positive", "recall")] == pytest.approx((3 / 4 * 3 + 1 / 4) / 4)
    assert chance[("label_match", "label_precision")] == pytest.approx((3 / 4 * 3 + 1 / 4) / 4)
    mrr = df[(df["protocol"] == "strict") & (df["metric"] == "mrr") & (df["query_class"] == "all")]
    assert mrr["chance"].iloc[0] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert set(df["protocol"]) == {"strict", "unique_text", "duplicate_positive", "label_match"}
    assert list(df.columns) == protocols.COLUMNS


@pytest.mark.parametrize("m", [1, 3, 7])
def test_chance_values_match_simulated_random_rankings(m):
    n, k = 12, 3
    rng = np.random.default_rng(0)
    ranks = np.array([np.flatnonzero(rng.permutation(n) < m)[0] + 1 for _ in range(40000)])
    mm = np.array([m])
    assert protocols.chance_values(mm, n, "recall", k)[0] == pytest.approx((ranks <= k).mean(), abs=0.01)
    assert protocols.chance_values(mm, n, "mrr", 0)[0] == pytest.approx((1 / ranks).mean(), abs=0.01)
    assert abs(protocols.chance_values(mm, n, "median_rank", 0)[0] - np.median(ranks)) <= 0.5
    if m == 1:
        assert protocols.chance_values(mm, n, "median_rank", 0)[0] == (n + 1) / 2
    assert protocols.chance_values(mm, n, "label_precision", k)[0] == pytest.approx(m / n)
    assert np.isnan(protocols.chance_values(np.array([0]), n, "recall", k)[0])


def test_unique_text_text_to_image_hits_every_image_of_the_string():
    ps = protocols.protocol_scores(hand_split(), "m", ["unique_text", "duplicate_positive"], ks=(1,))
    # report query 1 ("no acute disease") is a different string from 0/2: only image 1 is its hit
    t2i_u = _values(ps, "text_to_image", "merged", "median_rank")
    t2i_d = _values(ps, "text_to_image", "duplicates", "median_rank")
    assert t2i_u[1] >= t2i_d[1]
    assert (t2i_d <= t2i_u).all()


def test_unknown_protocol_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown retrieval protocol 'recall_any'.*strict"):
        protocols.protocol_scores(hand_split(), "m", ["recall_any"])


def test_protocols_needing_labels_are_skipped_with_reasons():
    ps = protocols.protocol_scores(hand_split(), "m", ["label_match_class", "graded", "strict"], ks=(1,))
    assert set(ps.skipped_protocols) == {"label_match_class", "graded"}
    assert "onehot_label" in ps.skipped_protocols["label_match_class"]
    assert "finding labels" in ps.skipped_protocols["graded"]
    df = protocols.summarise(ps, n_boot=0)
    skipped = df[df["protocol"] == "graded"]
    assert skipped["value"].isna().all() and skipped["note"].str.startswith("protocol skipped").all()


def test_label_match_class_uses_the_one_hot_class():
    ps = protocols.protocol_scores(hand_split(onehot_label=["Edema", "Edema", "Atelectasis", "Atelectasis"]), "m",
                                   ["label_match_class"], ks=(1, 2))
    # i0: t3 t1 -> classes Atel, Edema vs query Edema -> 1/2; i1: t1 t0 -> 1; i2 (Atel): t3 t1 -> 1/2; i3: t1 t3 -> 1/2
    np.testing.assert_allclose(_values(ps, "image_to_text", "raw", "class_precision", 2), [0.5, 1, 0.5, 0.5])
    # at k=1, i2's top text t3 shares its class (Atelectasis) though not its normal/abnormal label
    np.testing.assert_allclose(_values(ps, "image_to_text", "raw", "class_precision", 1), [0, 1, 1, 0])


def test_graded_protocol_runs_with_findings():
    sp = hand_split()
    f = np.zeros((4, 3), np.float32)
    f[3, 0] = 1
    sp.findings = f
    ps = protocols.protocol_scores(sp, "m", ["graded"], ks=(1,))
    # i1's top text t1 is normal like the query: gain 1
    assert _values(ps, "image_to_text", "raw", "ndcg", 1)[1] == 1.0
    assert _values(ps, "image_to_text", "raw", "label_f1", 1)[0] == 0.0  # i0 (normal) retrieves t3 (effusion)


def test_compare_names_the_protocol():
    a = protocols.protocol_scores(hand_split(), "a", ["strict", "label_match"], ks=(1,))
    b = protocols.protocol_scores(hand_split(), "b", ["strict", "label_match"], ks=(1,))
    df = protocols.compare(a, b, n_boot=10, n_perm=10)
    assert set(df["protocol"]) == {"strict", "label_match"}
    assert np.allclose(df["diff"].dropna(), 0)


def test_every_protocol_documents_its_source():
    table = protocols.describe()
    assert set(table["protocol"]) == set(protocols.PROTOCOLS)
    assert table["follows"].str.len().gt(10).all() and table["definition"].str.len().gt(20).all()


def test_shared_scans_equal_one_protocol_at_a_time():
    rng = np.random.default_rng(3)
    n, d = 30, 6
    reports = pd.Series(rng.choice(["A.", "a", "B.", "C."], n))
    norm = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    txt = norm(rng.standard_normal((n, d)))
    ids = np.array([f"s{i}" for i in range(n)])
    findings = (rng.random((n, 3)) < 0.4).astype(np.float32)
    sp = PairedSplit(img=norm(txt + rng.standard_normal((n, d))), txt=txt, labels=rng.integers(0, 2, n),
                     study_ids=ids, patient_ids=ids, image_ids=ids, report_groups=report_groups(reports)[0],
                     findings=findings, table=pd.DataFrame({"report": reports}))
    together = protocols.protocol_scores(sp, "m", None, ks=(1, 3))
    for name in together.protocol_of.values():
        alone = protocols.protocol_scores(sp, "m", [name], ks=(1, 3))
        for key, v in alone.scores.values.items():
            np.testing.assert_array_equal(v, together.scores.values[key], err_msg=f"{name} {key}")
            np.testing.assert_array_equal(alone.chance[key], together.chance[key])
