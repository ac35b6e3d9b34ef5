"""Retrieval metrics against independent implementations: torchmetrics, open_clip's R@K, hand-worked cases."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMAP, RetrievalMRR, RetrievalPrecision

from cxrlib import retrieval
from cxrlib.pairs import PairedSplit


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _split(img, txt, labels, groups, patients=None, findings=None) -> PairedSplit:
    n = len(labels)
    ids = np.array([f"s{i}" for i in range(n)])
    return PairedSplit(img=_unit(img), txt=_unit(txt), labels=np.asarray(labels, np.int64), study_ids=ids,
                       patient_ids=np.asarray(patients if patients is not None else ids), image_ids=ids,
                       report_groups=np.asarray(groups, np.int64), findings=findings, table=pd.DataFrame())


def _random_split(seed=0, n=48, d=12, n_groups=30, with_findings=True, ties=False):
    """Random pairs with repeated report groups; ``ties``: identical texts share one embedding exactly."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, n_groups, n) if n_groups < n else rng.permutation(n)
    base = rng.standard_normal((n_groups, d))
    txt = base[groups] + (0 if ties else 1e-3 * rng.standard_normal((n, d)))
    img = txt + 1.0 * rng.standard_normal((n, d))
    findings = None
    if with_findings:
        findings = (rng.random((n, 5)) < 0.25).astype(np.float32)
        findings[rng.random((n, 5)) < 0.1] = np.nan
    return _split(img, txt, rng.integers(0, 2, n), groups, rng.integers(0, n // 3, n).astype(str), findings)


def _tm(metric, q, g, rel):
    """A torchmetrics retrieval metric over every (query, gallery) pair.

    Scores are shifted to be positive (same ranking): torchmetrics' average precision counts items
    with a score <= 0 as not relevant, and cosine similarities can be negative.
    """
    s = torch.from_numpy(q) @ torch.from_numpy(g).T + 2.0
    idx = torch.arange(len(q))[:, None].expand_as(s)
    return float(metric(s.reshape(-1), torch.as_tensor(rel).reshape(-1), indexes=idx.reshape(-1)))


def _group_means_loop(emb, groups):
    """The merged gallery's items written as a loop: each group's mean embedding, re-normalised, by group id."""
    keys = sorted(set(groups.tolist()))
    means = []
    for key in keys:
        members = [emb[i].astype(np.float64) for i in range(len(groups)) if groups[i] == key]
        m = sum(members) / len(members)
        means.append(m / np.linalg.norm(m))
    return np.array(keys), np.array(means, np.float32)


def _mean(scores, key):
    return float(np.nanmean(scores.values[key]))


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_equal_torchmetrics_random(seed):
    """torchmetrics orders tied scores arbitrarily, so this comparison uses inputs without ties."""
    sp = _random_split(seed)
    ks = (1, 5, 10)
    sc = retrieval.query_scores(sp, "m", ks)
    fpos = np.nan_to_num(sp.findings, nan=0) == 1
    for direction in retrieval.DIRECTIONS:
        q, g = (sp.img, sp.txt) if direction == "image_to_text" else (sp.txt, sp.img)
        pair = np.eye(len(q), dtype=bool)
        label = sp.labels[:, None] == sp.labels[None, :]
        finding = (fpos.astype(int) @ fpos.T.astype(int)) > 0
        groups = sp.report_groups
        if direction == "image_to_text":
            keys, g_merged = _group_means_loop(g, groups)
            merged = groups[:, None] == keys[None, :]
        else:
            g_merged, merged = g, groups[:, None] == groups[None, :]
        for gallery, gal, rel in (("raw", g, pair), ("merged", g_merged, merged)):
            assert _mean(sc, (direction, gallery, "mrr", 0)) == pytest.approx(_tm(RetrievalMRR(), q, gal, rel))
            for k in ks:
                assert _mean(sc, (direction, gallery, "recall", k)) == pytest.approx(
                    _tm(RetrievalHitRate(top_k=k), q, gal, rel))
        for name, rel in (("label", label), ("finding", finding)):
            skip = dict(empty_target_action="skip")
            assert _mean(sc, (direction, "raw", f"{name}_map", 0)) == pytest.approx(
                _tm(RetrievalMAP(**skip), q, g, rel))
            for k in ks:
                assert _mean(sc, (direction, "raw", f"{name}_precision", k)) == pytest.approx(
                    _tm(RetrievalPrecision(top_k=k, **skip), q, g, rel))
                assert _mean(sc, (direction, "raw", f"{name}_hit", k)) == pytest.approx(
                    _tm(RetrievalHitRate(top_k=k, **skip), q, g, rel))
        excluded = int((~finding.any(1)).sum())
        assert np.isnan(sc.values[(direction, "raw", "finding_map", 0)]).sum() == excluded


def _open_clip_metrics(image_features, text_features):
    """open_clip_train.zero_shot/train.get_clip_metrics (v2.x), verbatim in substance."""
    metrics = {}
    logits_per_image = image_features @ text_features.t()
    logits = {"image_to_text": logits_per_image, "text_to_image": logits_per_image.t()}
    ground_truth = torch.arange(len(text_features)).view(-1, 1)
    for name, logit in logits.items():
        ranking = torch.argsort(logit, descending=True)
        preds = torch.where(ranking == ground_truth)[1].numpy()
        metrics[f"{name}_median_rank"] = np.floor(np.median(preds)) + 1
        for k in [1, 5, 10]:
            metrics[f"{name}_R@{k}"] = np.mean(preds < k)
    return metrics


def test_exact_pair_metrics_equal_open_clip():
    sp = _random_split(3, n=64, n_groups=64, with_findings=False)  # distinct texts, no ties
    ref = _open_clip_metrics(torch.from_numpy(sp.img), torch.from_numpy(sp.txt))
    sc = retrieval.query_scores(sp, "m", (1, 5, 10))
    for d in retrieval.DIRECTIONS:
        for k in (1, 5, 10):
            assert _mean(sc, (d, "raw", "recall", k)) == pytest.approx(ref[f"{d}_R@{k}"])
        assert np.floor(np.median(sc.values[(d, "raw", "median_rank", 0)])) == ref[f"{d}_median_rank"]


def test_ties_equal_naive_loop():
    """Exact duplicate texts: every metric equals a loop sorting by (score desc, gallery index asc)."""
    sp = _random_split(7, n=40, n_groups=8, ties=True)
    ks = (1, 3)
    sc = retrieval.query_scores(sp, "m", ks)
    fpos = np.nan_to_num(sp.findings, nan=0) == 1
    for direction in retrieval.DIRECTIONS:
        q, g = (sp.img, sp.txt) if direction == "image_to_text" else (sp.txt, sp.img)
        s = (torch.from_numpy(q) @ torch.from_numpy(g).T).numpy()  # the same float32 products
        for a in range(len(q)):
            order = sorted(range(len(g)), key=lambda b: (-s[a, b], b))
            rank = order.index(a) + 1
            assert sc.values[(direction, "raw", "median_rank", 0)][a] == rank
            for name, rel in (("label", [sp.labels[b] == sp.labels[a] for b in order]),
                              ("finding", [bool((fpos[a] & fpos[b]).any()) for b in order])):
                got = sc.values[(direction, "raw", f"{name}_map", 0)][a]
                if not any(rel):
                    assert np.isnan(got)
                    continue
                hits = np.cumsum(rel)
                ap = np.mean([hits[i] / (i + 1) for i in range(len(rel)) if rel[i]])
                assert got == pytest.approx(ap)
                for k in ks:
                    assert sc.values[(direction, "raw", f"{name}_precision", k)][a] == pytest.approx(np.mean(rel[:k]))
                    assert sc.values[(direction, "raw", f"{name}_hit", k)][a] == any(rel[:k])


# hand-worked: texts 0 and 1 are identical (group 0), exact ties everywhere
A, B, C = [1, 0, 0], [0, 1, 0], [0, 0, 1]
HAND = dict(img=[A, A, [0.6, 0.8, 0], [0, 1, 1]], txt=[A, A, B, C], labels=[0, 0, 1, 1], groups=[0, 0, 1, 2])


def test_hand_worked_ranks_with_ties_and_duplicate_texts():
    sc = retrieval.query_scores(_split(**HAND), "m", (1, 2))
    v = sc.values
    # image->text raw: I1 ties with text 0 (lower index first) -> 2; I3 ties B and C -> 2
    np.testing.assert_array_equal(v[("image_to_text", "raw", "median_rank", 0)], [1, 2, 1, 2])
    np.testing.assert_array_equal(v[("image_to_text", "merged", "median_rank", 0)], [1, 1, 1, 2])
    np.testing.assert_array_equal(v[("text_to_image", "raw", "median_rank", 0)], [1, 2, 1, 1])
    np.testing.assert_array_equal(v[("text_to_image", "merged", "median_rank", 0)], [1, 1, 1, 1])
    np.testing.assert_array_equal(v[("image_to_text", "raw", "recall", 1)], [1, 0, 1, 0])
    np.testing.assert_allclose(v[("image_to_text", "raw", "mrr", 0)], [1, 0.5, 1, 0.5])
    # label AP, image 2 ranks texts B(.8), A(.6), A(.6), C(0): relevant at 1 and 4 -> (1 + 2/4) / 2
    np.testing.assert_allclose(v[("image_to_text", "raw", "label_map", 0)], [1, 1, 0.75, 1])
    np.testing.assert_allclose(v[("image_to_text", "raw", "label_precision", 2)], [1, 1, 0.5, 1])
    assert sc.gallery_size == {("image_to_text", "raw"): 4, ("image_to_text", "merged"): 3,
                               ("text_to_image", "raw"): 4, ("text_to_image", "merged"): 4}


def test_evaluate_pairs_table_hand_case():
    df = retrieval.evaluate_pairs(_split(**HAND), "hand", ks=(1, 2), n_boot=50, seed=0)
    assert list(df.columns) == retrieval.COLUMNS
    row = df[(df.direction == "image_to_text") & (df.gallery == "raw") & (df.metric == "mrr")
             & (df.query_class == "all")].iloc[0]
    assert row.value == pytest.approx(0.75) and row.n == 4 and row.n_patients == 4 and pd.isna(row.k)
    assert row.ci_low <= row.value <= row.ci_high
    medr = df[(df.direction == "image_to_text") & (df.gallery == "raw") & (df.metric == "median_rank")
              & (df.query_class == "all")].iloc[0]
    assert medr.value == 1.5
    per_class = df[(df.metric == "recall") & (df.k == 1) & (df.direction == "image_to_text") & (df.gallery == "raw")]
    assert dict(zip(per_class.query_class, per_class.value)) == {"all": 0.5, "normal": 0.5, "abnormal": 0.5}


def test_k_larger_than_gallery_is_a_stated_row():
    # merged image->text gallery has 3 texts: k=4 is computed on the raw gallery (4) but not on the merged one
    df = retrieval.evaluate_pairs(_split(**HAND), "hand", ks=(1, 4), n_boot=0)
    merged = df[(df.direction == "image_to_text") & (df.gallery == "merged") & (df.k == 4)]
    assert len(merged) == 3 and merged.value.isna().all()
    assert merged.note.str.contains("exceeds the merged gallery size \\(3\\)").all()
    raw = df[(df.direction == "image_to_text") & (df.gallery == "raw") & (df.metric == "recall") & (df.k == 4)]
    assert (raw.value.dropna() == 1.0).all() and len(raw.dropna(subset=["value"])) == 3
    with pytest.raises(ValueError, match="gallery size"):
        retrieval.scan_metrics(_unit(HAND["img"]), _unit(HAND["txt"]), {}, [5])


def test_missing_class_and_queries_without_relevant_items_are_counted():
    findings = np.array([[1, 0], [0, 0], [np.nan, 1], [0, 1]], np.float32)  # query 1: no positive finding
    sp = _split(**{**HAND, "labels": [0, 0, 0, 0]}, findings=findings)
    df = retrieval.evaluate_pairs(sp, "m", ks=(1,), n_boot=20)
    abn = df[(df.query_class == "abnormal")]
    assert (abn.n == 0).all() and abn.note.str.contains("no abnormal queries").all()
    f = df[(df.metric == "finding_map") & (df.query_class == "all")]
    assert (f.n == 3).all() and (f.n_excluded == 1).all() and f.note.str.contains("1 queries").all()
    # query 0 (finding 0 only) has no other item with finding 0 but its own pair: AP over its ranking
    assert not df[(df.metric == "finding_precision")].empty


def test_no_findings_means_no_finding_rows():
    df = retrieval.evaluate_pairs(_split(**HAND), "m", ks=(1,), n_boot=0)
    assert not df.metric.str.startswith("finding").any()
    assert set(df.metric) == {"recall", "mrr", "median_rank", "label_precision", "label_hit", "label_map"}


def test_compare_models_requires_same_queries_and_detects_a_better_model():
    good = _random_split(5, n=90, with_findings=False)
    bad = PairedSplit(**{**good.__dict__, "img": _unit(np.random.default_rng(9).standard_normal(good.img.shape))})
    a = retrieval.query_scores(good, "good", (1, 5))
    b = retrieval.query_scores(bad, "bad", (1, 5))
    cmp = retrieval.compare_models(a, b, n_boot=200, n_perm=2000, seed=0)
    assert list(cmp.columns) == retrieval.PAIRED_COLUMNS
    assert "median_rank" not in set(cmp.metric)
    r = cmp[(cmp.metric == "mrr") & (cmp.direction == "image_to_text") & (cmp.gallery == "raw")
            & (cmp.query_class == "all")].iloc[0]
    assert r["diff"] == pytest.approx(r.value_a - r.value_b) and r.ci_low > 0 and r.p_value < 0.01
    other = retrieval.query_scores(_random_split(6, n=80, with_findings=False), "x", (1,))
    with pytest.raises(ValueError, match="different queries"):
        retrieval.compare_models(a, other)


def test_block_boundaries_do_not_change_results(monkeypatch):
    sp = _random_split(11, n=30, ties=True)
    ref = retrieval.query_scores(sp, "m", (1, 5)).values
    monkeypatch.setattr(retrieval, "SCAN_BLOCK_ELEMENTS", 70)  # 2 query rows per block, 15 blocks
    assert retrieval.rows_per_block(30, 4096, retrieval.SCAN_BLOCK_ELEMENTS) == 2
    got = retrieval.query_scores(sp, "m", (1, 5)).values
    assert got.keys() == ref.keys()
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key])


def test_merged_gallery_does_not_depend_on_row_order():
    """Members of a report group with different embeddings (raw texts differ in case or punctuation): the group's
    item is their re-normalised mean, so permuting the rows permutes the per-query values and nothing else."""
    sp = _random_split(3, n=40, d=6, n_groups=12)
    txt = sp.txt + 0.4 * np.random.default_rng(9).standard_normal(sp.txt.shape).astype(np.float32)  # members differ
    sp = dataclasses.replace(sp, txt=_unit(txt))
    perm = np.random.default_rng(1).permutation(len(sp))
    shuffled = dataclasses.replace(sp, img=sp.img[perm], txt=sp.txt[perm], labels=sp.labels[perm],
                                   study_ids=sp.study_ids[perm], patient_ids=sp.patient_ids[perm],
                                   image_ids=sp.image_ids[perm], report_groups=sp.report_groups[perm],
                                   findings=sp.findings[perm])
    a, b = retrieval.query_scores(sp, "m", (1, 3)), retrieval.query_scores(shuffled, "m", (1, 3))
    for key, v in a.values.items():
        if key[1] == "merged":
            np.testing.assert_allclose(b.values[key], v[perm], err_msg=str(key))
    reps, keys = retrieval.group_representatives(sp.txt, sp.report_groups)
    ref_keys, ref = _group_means_loop(sp.txt, sp.report_groups)
    np.testing.assert_array_equal(keys, ref_keys)
    np.testing.assert_allclose(reps, ref, atol=1e-6)


def test_unique_text_protocol_does_not_depend_on_row_order():
    """The protocol notebook 03 reports (one gallery text per report string) uses the same mean rule."""
    from cxrlib import protocols

    sp = _random_split(4, n=40, d=6, n_groups=12)
    txt = sp.txt + 0.4 * np.random.default_rng(2).standard_normal(sp.txt.shape).astype(np.float32)
    sp = dataclasses.replace(sp, txt=_unit(txt), table=pd.DataFrame({"report": [f"r{g}" for g in sp.report_groups]}))
    perm = np.random.default_rng(5).permutation(len(sp))
    shuffled = dataclasses.replace(sp, img=sp.img[perm], txt=sp.txt[perm], labels=sp.labels[perm],
                                   study_ids=sp.study_ids[perm], patient_ids=sp.patient_ids[perm],
                                   image_ids=sp.image_ids[perm], report_groups=sp.report_groups[perm],
                                   findings=sp.findings[perm], table=sp.table.iloc[perm].reset_index(drop=True))
    a = protocols.protocol_scores(sp, "m", ["unique_text"], ks=(1, 3)).scores.values
    b = protocols.protocol_scores(shuffled, "m", ["unique_text"], ks=(1, 3)).scores.values
    assert a and set(a) == set(b)
    for key, v in a.items():
        np.testing.assert_allclose(b[key], v[perm], err_msg=str(key))
