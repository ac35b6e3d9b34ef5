"""Backbone adaptation (cxrlib.adapt): loss goes down, seeded runs repeat, checkpoints load back,
unreadable images are reported, and the helpers match hand-worked or naive references."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw
from torchvision import transforms as T

from cxrlib import adapt as A
from cxrlib.backbones import load_backbone


def _make_table(root, n_train: int = 32, n_val: int = 16, seed: int = 0) -> pd.DataFrame:
    """Generated 'radiographs': abnormal = a bright disc, normal = a grey bar; reports say which."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_train + n_val):
        lab = i % 2
        size = int(rng.integers(70, 100))
        img = Image.new("L", (size, size), int(rng.integers(10, 50)))
        d = ImageDraw.Draw(img)
        if lab:
            d.ellipse([size * 0.3, size * 0.25, size * 0.75, size * 0.7], fill=230)
        else:
            d.rectangle([size * 0.1, size * 0.6, size * 0.45, size * 0.9], fill=150)
        path = root / f"im{i}.png"
        img.save(path)
        rows.append({"study_id": f"s{i}", "image_id": f"i{i}", "image_path": str(path),
                     "report": "large right lung opacity" if lab else "no acute cardiopulmonary findings",
                     "label_abnormal": lab, "split": "train" if i < n_train else "val"})
    return pd.DataFrame(rows)


@pytest.fixture
def table(tmp_path):
    return _make_table(tmp_path)


def _cfg(**kw) -> A.AdaptConfig:
    base = dict(backbone="tiny", dataset="synthetic", epochs=2, batch_size=8, lr=1e-3, eval_batch_size=16,
                patience=5, seed=0, num_workers=0)
    return A.AdaptConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny adaptation run shared by the tests that only read its result."""
    table = _make_table(tmp_path_factory.mktemp("imgs"))
    result = A.adapt(table, load_backbone("tiny"), _cfg(epochs=3), progress=False)
    return table, result


def test_adaptation_lowers_contrastive_loss(run):
    _, result = run
    h = result.history
    assert list(h["epoch"]) == [0, 1, 2, 3]
    before, after = h.loc[0, "val_clip"], h["val_clip"].iloc[1:].min()
    assert after < before - 0.2, h[["epoch", "val_clip"]]
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[1]
    assert h.loc[0, "skipped"] == 0 and result.skipped.empty
    assert result.config["adapt"]["best_epoch"] == result.best_epoch >= 1
    assert result.config["model_cfg"]["embed_dim"] == 32


@pytest.mark.slow
def test_seeded_runs_repeat_and_seeds_differ(table):
    a = A.adapt(table, load_backbone("tiny"), _cfg(epochs=1), progress=False)
    b = A.adapt(table, load_backbone("tiny"), _cfg(epochs=1), progress=False)
    c = A.adapt(table, load_backbone("tiny"), _cfg(epochs=1, seed=1), progress=False)
    cols = ["train_loss", "val_loss", "val_recall"]
    pd.testing.assert_frame_equal(a.history[cols], b.history[cols])
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_checkpoint_round_trips_through_load_backbone(run, tmp_path):
    table, result = run
    path = A.save_adapted(tmp_path / "m" / "tiny-adapted.pt", result)
    assert path.is_file() and not list(path.parent.glob(".*"))  # atomic: no temp file left
    raw = torch.load(path, weights_only=True)
    assert raw["backbone"] == "tiny" and len(raw["history"]) == len(result.history)
    loaded = load_backbone("tiny", checkpoint=path)
    fresh = load_backbone("tiny")
    x = torch.stack([loaded.preprocess(Image.open(p).convert("RGB")) for p in table["image_path"][:4]])
    result.model.eval()
    with torch.no_grad():
        want = result.model.encode_image(x)
        assert torch.allclose(loaded.model.encode_image(x), want, atol=1e-6)
        assert not torch.allclose(fresh.model.encode_image(x), want, atol=1e-3)
    assert loaded.fingerprint != fresh.fingerprint


def test_unreadable_images_are_reported_by_id(table):
    Path(table.loc[3, "image_path"]).write_bytes(b"not a png")
    table.loc[40, "image_path"] = table.loc[40, "image_path"] + ".missing"
    result = A.adapt(table, load_backbone("tiny"), _cfg(epochs=1), progress=False)
    got = dict(zip(result.skipped["image_id"], result.skipped["reason"]))
    assert set(got) == {"i3", "i40"}
    assert got["i40"] == "file not found" and "i3" in got
    assert result.history["skipped"].iloc[-1] == 2 and result.config["adapt"]["skipped"] == 2


@pytest.mark.slow
def test_locked_text_tower_stays_fixed_and_unlocked_trains(table):
    base = load_backbone("tiny").model.state_dict()
    runs = [A.adapt(table, load_backbone("tiny"), _cfg(epochs=2, lock_text=lock), progress=False) for lock in (True, False)]
    assert all(r.best_epoch >= 1 for r in runs)  # an epoch was kept (epoch 0 = the start weights)
    locked, free = (r.model.state_dict() for r in runs)
    text_keys = [k for k in base if not k.startswith("visual.") and k != "logit_scale"]
    assert text_keys and all(torch.equal(base[k], locked[k]) for k in text_keys)
    assert not all(torch.equal(base[k], free[k]) for k in text_keys)
    assert not torch.equal(base["visual.conv1.weight"], locked["visual.conv1.weight"])


def test_max_steps_caps_training(table):
    result = A.adapt(table, load_backbone("tiny"), _cfg(epochs=3, max_steps=3), progress=False)
    assert result.history["step"].iloc[-1] == 3 and len(result.history) == 2


def test_recall_matches_naive_loop_with_duplicate_reports():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g)
    groups = np.array([i // 3 if i < 12 else i for i in range(30)])  # some reports repeated 3 times
    got = A.recall_at_k(img, txt, groups, (1, 5))
    sims = (img @ txt.T).numpy()
    for name, s in (("i2t", sims), ("t2i", sims.T)):
        for k in (1, 5):
            hits = [any(groups[j] == groups[q] for j in np.argsort(-s[q], kind="stable")[:k]) for q in range(30)]
            assert got[f"{name}_R@{k}"] == pytest.approx(np.mean(hits))
    assert got["recall"] == pytest.approx(np.mean([got[k] for k in got if k != "recall"]))


def test_warmup_then_cosine_schedule():
    """adapt's optimiser: warm-up over warmup_frac of the steps, then cosine (cxrlib.runtime's one schedule)."""
    net = torch.nn.Linear(2, 2)
    opt, sched = A._optimiser(net, A.AdaptConfig(backbone="tiny", lr=1.0, warmup_frac=0.2, weight_decay=0.5),
                              total_steps=20)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]  # weight matrix decays, bias does not
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # 4 warm-up steps rising linearly to the full rate, then a cosine over the remaining 16 steps
    assert lrs[:4] == pytest.approx([(i + 1) / 4 for i in range(4)])
    assert lrs[4:] == pytest.approx([0.5 * (1 + math.cos(math.pi * i / 16)) for i in range(16)])


def test_cached_images_match_streamed_validation_and_report_skips(table):
    """In-memory images: epoch 0 (before training) scores exactly as with images read from disk,
    unreadable files are still reported by id, and training on cached tensors runs."""
    table.loc[5, "image_path"] = table.loc[5, "image_path"] + ".missing"
    streamed = A.adapt(table, load_backbone("tiny"), _cfg(epochs=1), progress=False)
    cached = A.adapt(table, load_backbone("tiny"), _cfg(epochs=1, cache_images=True), progress=False)
    h0, h1 = streamed.history.iloc[0], cached.history.iloc[0]
    assert h1["val_loss"] == pytest.approx(h0["val_loss"], abs=1e-6)
    assert h1["val_recall"] == pytest.approx(h0["val_recall"], abs=1e-9)
    assert list(cached.skipped["image_id"]) == ["i5"] and cached.skipped["reason"][0] == "file not found"
    assert np.isfinite(cached.history["train_loss"].iloc[1])
    x = A.tensor_train_transform(32, (0.5,) * 3, (0.25,) * 3)(torch.full((1, 40, 40), 128, dtype=torch.uint8))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


def test_train_transform_is_radiograph_safe():
    tf = A.train_transform(32, (0.5,) * 3, (0.25,) * 3)
    assert not any(isinstance(t, T.RandomHorizontalFlip) for t in tf.transforms)
    assert any(isinstance(t, T.RandomHorizontalFlip)
               for t in A.train_transform(32, (0.5,) * 3, (0.25,) * 3, A.AugmentConfig(hflip=True)).transforms)
    x = tf(Image.new("RGB", (50, 70), (128, 128, 128)))
    assert x.shape == (3, 32, 32)


def test_image_config_of_tiny_backbone():
    bk = load_backbone("tiny")
    cfg = A.image_config(bk.model, bk.preprocess)
    assert cfg["size"] == 64 and cfg["mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))


@pytest.mark.parametrize("kw, msg", [({"weights": {"clip": -1.0}}, "adapt_w_clip"),
                                     ({"weights": {"clip": 0.0}}, "all adaptation loss weights"),
                                     ({"num_workers": -1}, "num_workers"),
                                     ({"monitor": "acc"}, "monitor"), ({"batch_size": 1}, "batch_size"),
                                     ({"precision": "fp16"}, "precision")])
def test_bad_config_is_named(kw, msg):
    with pytest.raises(ValueError, match=msg):
        _cfg(**kw).validate()


def test_defaults_are_notebook_00s_settings():
    """One default each: AdaptConfig's are the adapt settings notebook 00 declares (num_workers "auto" too)."""
    from cxrlib import accel, settings

    cfg, d = A.AdaptConfig(backbone="tiny"), settings.defaults("adapt")
    assert cfg.num_workers == d["num_workers"] == "auto" and cfg.workers() == accel.default_num_workers()
    assert cfg.weights == {t: d[f"adapt_w_{t}"] for t in settings.loss_terms()}
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.patience) == (d["adapt_epochs"], d["adapt_lr"],
                                                                   d["adapt_batch_size"], d["patience"])
    assert _cfg(num_workers=3).workers() == 3


def test_bad_table_and_image_size_are_named(table):
    with pytest.raises(ValueError, match="lacks columns"):
        A.adapt(table.drop(columns="report"), load_backbone("tiny"), _cfg(), progress=False)
    with pytest.raises(ValueError, match="no 'val' rows"):
        A.adapt(table[table["split"] == "train"], load_backbone("tiny"), _cfg(), progress=False)
    with pytest.raises(ValueError, match="image_size=96 differs"):
        A.adapt(table, load_backbone("tiny"), _cfg(image_size=96), progress=False)


def test_trimmed_text_encoding_equals_full_context():
    """Length-sorted, padding-trimmed batches give the features of the full-context tokens."""
    bk = load_backbone("offline")
    texts = ["no acute cardiopulmonary abnormality.", "heart size is mildly enlarged. small left pleural "
             "effusion with adjacent atelectasis. no pneumothorax.", "clear lungs.", "stable cardiomegaly."]
    got = A.encode_texts(bk.model, bk.tokenizer, texts, batch_size=2, progress=False)
    with torch.no_grad():
        want = bk.model.encode_text(bk.tokenizer(texts), normalize=True)
    assert torch.allclose(got, want, atol=1e-5)
    assert A.trim_padding(bk.tokenizer, bk.tokenizer(texts[:1])).shape[1] < bk.context_length


# notebook 00 on the smoke profile: tests/test_pipeline.py::test_notebook_00_outputs asserts on the
# session's one smoke DAG run (conftest smoke_dag) instead of a papermill run of its own


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_write_a_loadable_checkpoint(tmp_path):
    """``adapt.main`` with the arguments :func:`adapt.torchrun_command` gives each rank, on 2 forked gloo ranks
    with torchrun's environment (tests/ranks.py; the launcher itself runs in test_embed_distributed and
    test_lora_dist): DDP path, rank 0 saves."""
    from ranks import fork_ranks

    table = _make_table(tmp_path)
    table.to_parquet(tmp_path / "t.parquet")
    cfg = _cfg(epochs=1, num_workers=0)
    cmd = A.torchrun_command(tmp_path / "t.parquet", cfg, tmp_path / "ddp.pt", nproc=2)
    assert cmd[cmd.index("--nproc_per_node=2") + 1:cmd.index("cxrlib.adapt") + 1] == ["-m", "cxrlib.adapt"]
    fork_ranks(A.main, cmd[cmd.index("cxrlib.adapt") + 1:])
    run = A.read_run(tmp_path / "ddp.pt")
    assert run.config["adapt"]["world_size"] == 2
    # 32 train rows, 8 per rank per step -> 2 steps of 16 images
    assert run.history["step"].iloc[-1] == 2
    load_backbone("tiny", checkpoint=tmp_path / "ddp.pt")


# ---- the locked-text cache read from the base backbone's frozen embedding set ------------------------

def _varied_reports(table: pd.DataFrame) -> pd.DataFrame:
    """Several distinct reports, some repeated across studies, and test rows the adaptation never reads."""
    table = table.copy()
    table["report"] = [f"{r} case {i % 7}" for i, r in enumerate(table["report"])]
    test = table.iloc[:4].copy()
    test["study_id"] = [f"t{i}" for i in range(4)]
    test["image_id"] = [f"ti{i}" for i in range(4)]
    test["split"] = "test"
    test["report"] = [f"only in the test split {i}" for i in range(4)]
    return pd.concat([table, test], ignore_index=True)


def _frozen_set(table: pd.DataFrame, bk, out: Path):
    """The frozen set's text features as the extractor writes them (fp32, the shared store beside it)."""
    from cxrlib.embed import extract_embeddings

    return extract_embeddings(table, bk, out / "emb", modalities=["text"], batch_size=5, num_workers=0,
                              precision="fp32", progress=False, text_store=out / "store")


def _cache(table: pd.DataFrame, bk, **kw) -> tuple[A._Text, A._Rows]:
    rows = A._prepare_rows(table)
    return A._prepare_text(bk.model, bk, rows, _cfg(**kw), "cpu", False, table), rows


def test_locked_text_cache_read_from_the_frozen_set_equals_encoding(table, tmp_path, monkeypatch, capsys):
    """The set's own text.npz and its shared-store copy give encode_texts' features (within float rounding),
    each distinct train/val report once, and nothing is encoded."""
    from cxrlib.embed import store_path

    table = _varied_reports(table)
    bk = load_backbone("tiny")
    res = _frozen_set(table, bk, tmp_path)
    shared = list((tmp_path / "store").glob("text-*.npz"))
    assert len(shared) == 1 and shared[0] == store_path(tmp_path / "store", "text", shared[0].stem[5:])
    rows = A._prepare_rows(table)
    want = A.encode_texts(bk.model, bk.tokenizer, list(rows.texts), 16, "cpu", progress=False)
    assert len(rows.texts) == 14  # 2 findings x 7 cases; the test rows' reports are not needed
    monkeypatch.setattr(A, "encode_texts", lambda *a, **k: pytest.fail("encoded although the file holds them"))
    for path in (res["text"], shared[0]):
        text, _ = _cache(table, bk, text_features=path)
        assert text.n_encoded == 0 and text.source == str(path)
        assert text.cache.shape == want.shape and torch.allclose(text.cache, want, atol=1e-5)
        assert f"14 of 14 distinct reports read from {path}" in capsys.readouterr().out


def test_a_file_of_another_tower_or_table_is_ignored_and_said_so(table, tmp_path, capsys):
    """Another text tower, another precision, other reports (a test row's) or no file: encoded as before."""
    import dataclasses

    from cxrlib.backbones import text_fingerprint

    table = _varied_reports(table)
    bk = load_backbone("tiny")
    rows = A._prepare_rows(table)
    want = A.encode_texts(bk.model, bk.tokenizer, list(rows.texts), 16, "cpu", progress=False)
    other = load_backbone("tiny")
    with torch.no_grad():
        other.model.token_embedding.weight.add_(0.5)
    other = dataclasses.replace(other, text_fingerprint=text_fingerprint(other.model, other.tokenizer,
                                                                         other.context_length))
    changed = table.copy()
    changed.loc[changed["split"] == "test", "report"] = "another test report"
    from cxrlib.embed import extract_embeddings

    files = {"another text tower": _frozen_set(table, other, tmp_path / "tower")["text"],
             "bf16 features": extract_embeddings(table, bk, tmp_path / "bf16" / "emb", modalities=["text"],
                                                 batch_size=5, num_workers=0, precision="bf16",
                                                 progress=False)["text"],
             "other reports": _frozen_set(changed, bk, tmp_path / "table")["text"],
             "absent": tmp_path / "none" / "text.npz"}
    for why, path in files.items():
        text, _ = _cache(table, bk, text_features=path)
        out = capsys.readouterr().out.strip().splitlines()
        assert len(out) == 1 and why in out[0] and str(path) in out[0], (why, out)
        assert "14 distinct reports encoded with the locked text tower" in out[0]
        assert text.n_encoded == 14 and text.source == "encoded"
        assert torch.equal(text.cache, want), why  # exactly what encode_texts gives: nothing read


def test_a_report_missing_from_the_file_is_encoded_and_counted(table, tmp_path, monkeypatch, capsys):
    """An empty report is a skip of the extractor (not in its file): the adaptation encodes that one only."""
    table = _varied_reports(table)
    table.loc[[3, 10], "report"] = ""  # one distinct report (two studies) the frozen set skips
    bk = load_backbone("tiny")
    res = _frozen_set(table, bk, tmp_path)
    assert {s["id"] for s in res.skipped["text"]} == {"s3", "s10"}
    rows = A._prepare_rows(table)
    want = A.encode_texts(bk.model, bk.tokenizer, list(rows.texts), 16, "cpu", progress=False)
    real, encoded = A.encode_texts, []
    monkeypatch.setattr(A, "encode_texts", lambda m, t, texts, *a, **k: encoded.append(texts) or real(m, t, texts, *a, **k))
    text, _ = _cache(table, bk, text_features=res["text"])
    assert encoded == [[""]] and text.n_encoded == 1 and text.source == str(res["text"])
    n = len(rows.texts)
    assert f"{n - 1} of {n} distinct reports read from {res['text']}; 1 not in it encoded here" in capsys.readouterr().out
    assert torch.allclose(text.cache, want, atol=1e-5)


def test_adapted_checkpoint_records_where_the_report_features_came_from(table, tmp_path):
    table = _varied_reports(table)
    bk = load_backbone("tiny")
    path = _frozen_set(table, bk, tmp_path)["text"]
    read = A.adapt(table, bk, _cfg(epochs=1, max_steps=1, text_features=path), progress=False)
    ckpt = A.read_run(A.save_adapted(tmp_path / "m" / "tiny-adapted.pt", read)).config["adapt"]
    assert ckpt["text_features_from"] == str(path) == ckpt["text_features"]
    assert ckpt["n_reports_encoded"] == 0 and ckpt["text_cache_seconds"] >= 0
    assert "14 of 14 distinct reports read" in ckpt["text_features_note"]
    encoded = A.adapt(table, load_backbone("tiny"), _cfg(epochs=1, max_steps=1), progress=False)
    rec = encoded.config["adapt"]
    assert rec["text_features_from"] == "encoded" and rec["n_reports_encoded"] == 14 and rec["text_features"] is None
    # epoch 0 (the start weights): the read features score as the encoded ones
    assert read.history["val_loss"][0] == pytest.approx(encoded.history["val_loss"][0], abs=1e-5)
