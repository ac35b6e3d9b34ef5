"""Embedding extraction: equal to a naive loop, counted skips, cache, resume, text dedup, precision."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cxrlib import embed
from cxrlib.backbones import fingerprint, load_backbone, save_adapted, text_fingerprint
from cxrlib.embed import extract_embeddings
from cxrlib.embstore import load_embeddings
from cxrlib.images import load_cxr_image


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


def make_table(folder, n=20, seed=0) -> pd.DataFrame:
    """``n`` small grayscale PNGs, two images per study, templated reports."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        path = folder / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (72, 90), dtype=np.uint8)).save(path)
        rows.append({"image_id": f"im{i:03d}", "image_path": str(path), "study_id": f"s{i // 2:03d}",
                     "report": f"Study {i // 2}: {'no acute disease' if i % 4 < 2 else 'small left effusion'}."})
    return pd.DataFrame(rows)


def naive(backbone, table):
    """One item at a time, fp32: the independent reference."""
    img = {}
    with torch.no_grad():
        for r in table.itertuples():
            x = backbone.preprocess(load_cxr_image(r.image_path))[None]
            img[r.image_id] = F.normalize(backbone.model.encode_image(x), dim=-1)[0].numpy()
        txt = {}
        for sid, rep in table.drop_duplicates("study_id")[["study_id", "report"]].itertuples(index=False):
            txt[sid] = F.normalize(backbone.model.encode_text(backbone.tokenizer([rep])), dim=-1)[0].numpy()
    return img, txt


def test_matches_naive_loop(tiny, tmp_path):
    table = make_table(tmp_path / "img", n=21)
    out = extract_embeddings(table, tiny, tmp_path / "emb", batch_size=4, num_workers=0, precision="fp32",
                             progress=False)
    assert set(out) == {"image", "text"} and out.stamp.is_file()
    img, txt = load_embeddings(out["image"], expect_backbone="tiny"), load_embeddings(out["text"])
    ref_img, ref_txt = naive(tiny, table)
    assert img.ids.tolist() == table["image_id"].tolist()
    assert txt.ids.tolist() == list(dict.fromkeys(table["study_id"]))  # one text per study
    np.testing.assert_allclose(img.emb, np.stack([ref_img[i] for i in img.ids]), atol=2e-6)
    np.testing.assert_allclose(txt.emb, np.stack([ref_txt[i] for i in txt.ids]), atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(img.emb, axis=1), 1, atol=1e-6)
    assert img.emb.dtype == np.float32
    for e, m in ((img, "image"), (txt, "text")):
        assert e.meta["modality"] == m and e.meta["fingerprint"] == tiny.fingerprint and e.meta["dim"] == 32
        assert e.meta["precision"] == "fp32"
    stamp = json.loads(out.stamp.read_text())
    assert stamp["modalities"]["image"]["n"] == 21 and stamp["modalities"]["text"]["n"] == 11


def test_unreadable_images_are_counted_skips(tiny, tmp_path):
    table = make_table(tmp_path / "img", n=12)
    (tmp_path / "img" / "img005.png").write_bytes((tmp_path / "img" / "img004.png").read_bytes()[:60])  # truncated
    table.loc[6, "image_path"] = str(tmp_path / "img" / "gone.png")
    out = extract_embeddings(table, tiny, tmp_path / "emb", batch_size=4, num_workers=2, precision="fp32",
                             progress=False)
    assert [s["id"] for s in out.skipped["image"]] == ["im005", "im006"]
    assert out.skipped["image"][1]["reason"] == "file not found"
    assert out.counts["image"] == 10
    stamp = json.loads(out.stamp.read_text())["modalities"]["image"]
    assert stamp["n_skipped"] == 2 and stamp["skip_reasons"]["file not found"] == 1
    assert [s["id"] for s in stamp["skipped"]] == ["im005", "im006"]
    img = load_embeddings(out["image"])
    assert "im005" not in img.ids and "im006" not in img.ids  # never a zero vector
    assert np.all(np.abs(np.linalg.norm(img.emb, axis=1) - 1) < 1e-5)
    ref, _ = naive(tiny, table.drop(index=[5, 6]))
    np.testing.assert_allclose(img.emb, np.stack([ref[i] for i in img.ids]), atol=2e-6)


def test_rerun_reads_cache_and_inputs_invalidate_it(tiny, tmp_path):
    table = make_table(tmp_path / "img", n=8)
    first = extract_embeddings(table, tiny, tmp_path / "emb", batch_size=4, num_workers=0, progress=False)
    mtimes = {m: first[m].stat().st_mtime_ns for m in first}
    again = extract_embeddings(table, tiny, tmp_path / "emb", batch_size=2, num_workers=0, progress=False)
    assert again.cached == {"image": True, "text": True}
    assert {m: again[m].stat().st_mtime_ns for m in again} == mtimes
    # a changed report re-embeds the texts only
    changed = table.copy()
    changed.loc[changed["study_id"] == "s001", "report"] = "Large right pneumothorax."
    third = extract_embeddings(changed, tiny, tmp_path / "emb", batch_size=4, num_workers=0, progress=False)
    assert third.cached == {"image": True, "text": False}
    # other image weights (an image-only adapted checkpoint) re-embed the images; the text tower is the same,
    # so its features are kept, relabelled with the new set's name and fingerprint
    adapted = load_backbone("tiny")
    with torch.no_grad():
        adapted.model.visual.proj.mul_(2.0)
    ckpt = save_adapted(tmp_path / "tiny-adapted.pt", adapted)
    fourth = extract_embeddings(changed, "tiny", tmp_path / "emb", checkpoint=ckpt, name="tiny-adapted",
                                batch_size=4, num_workers=0, progress=False)
    assert fourth.cached == {"image": False, "text": True}
    emb = load_embeddings(fourth["image"], expect_backbone="tiny-adapted")
    assert emb.meta["source_backbone"] == "tiny"
    txt = load_embeddings(fourth["text"], expect_backbone="tiny-adapted")
    assert txt.meta["fingerprint"] == emb.meta["fingerprint"] != tiny.fingerprint
    stamp = json.loads(fourth.stamp.read_text())
    assert stamp["checkpoint"] == str(ckpt) and stamp["backbone"] == "tiny-adapted"
    # a trained text tower re-embeds the reports too
    with torch.no_grad():
        next(p for k, p in adapted.model.named_parameters() if not k.startswith("visual.")).add_(0.5)
    ckpt2 = save_adapted(tmp_path / "tiny-text-adapted.pt", adapted)
    fifth = extract_embeddings(changed, "tiny", tmp_path / "emb", checkpoint=ckpt2, name="tiny-adapted",
                               batch_size=4, num_workers=0, progress=False)
    assert fifth.cached == {"image": False, "text": False}


def _count_encodes(monkeypatch) -> list[str]:
    """Patch the extraction's batch encoder to record the modality of every batch it encodes."""
    calls, real = [], embed._encode

    def counting(model, modality, *args, **kwargs):
        calls.append(modality)
        return real(model, modality, *args, **kwargs)

    monkeypatch.setattr(embed, "_encode", counting)
    return calls


def test_shared_text_store_serves_a_backbone_with_the_same_text_tower(tiny, tmp_path, monkeypatch):
    """The frozen backbone and an image-only adaptation: reports are encoded once (the second set copies them
    from the store and is stamped); a changed text tower misses; the image side is keyed on the image tower."""
    table = make_table(tmp_path / "img", n=10)
    store = tmp_path / "emb" / ".shared" / "text"
    kw = dict(batch_size=4, num_workers=0, precision="fp32", progress=False, text_store=store)
    image_only = load_backbone("tiny")
    with torch.no_grad():  # not a scaling, which the L2 normalisation would undo
        image_only.model.visual.proj.add_(torch.linspace(-0.5, 0.5, image_only.model.visual.proj.numel())
                                          .reshape(image_only.model.visual.proj.shape))
    image_only.fingerprint = fingerprint(image_only.model)
    assert image_only.text_key == tiny.text_key and image_only.fingerprint != tiny.fingerprint
    calls = _count_encodes(monkeypatch)

    frozen = extract_embeddings(table, tiny, tmp_path / "emb" / "tiny", **kw)
    n_text = calls.count("text")
    assert n_text > 0 and [p.name for p in store.iterdir()] == [f"text-{frozen_key(frozen)}.npz"]
    adapted = extract_embeddings(table, image_only, tmp_path / "emb" / "tiny-adapted", name="tiny-adapted", **kw)
    assert calls.count("text") == n_text  # no report encoded again
    assert adapted.cached == {"image": False, "text": True} and calls.count("image") == 2 * (10 // 4 + 1)
    stamp = json.loads(adapted.stamp.read_text())
    assert stamp["backbone"] == "tiny-adapted" and stamp["modalities"]["text"]["copied_from"].startswith(str(store))
    a, b = load_embeddings(frozen["text"]), load_embeddings(adapted["text"], expect_backbone="tiny-adapted")
    assert np.array_equal(a.emb, b.emb) and a.ids.tolist() == b.ids.tolist()
    assert b.meta["fingerprint"] == image_only.fingerprint  # the set's own backbone, not the store's writer
    assert not np.allclose(load_embeddings(frozen["image"]).emb, load_embeddings(adapted["image"]).emb)
    # a rerun of the adapted set is a plain cache hit that still stamps its target (make sees it up to date)
    before = adapted.stamp.stat().st_mtime_ns
    again = extract_embeddings(table, image_only, tmp_path / "emb" / "tiny-adapted", name="tiny-adapted", **kw)
    assert again.cached == {"image": True, "text": True} and again.stamp.stat().st_mtime_ns >= before
    assert calls.count("text") == n_text

    text_trained = load_backbone("tiny")
    with torch.no_grad():
        next(p for k, p in text_trained.model.named_parameters() if not k.startswith("visual.")).add_(0.5)
    text_trained.fingerprint = fingerprint(text_trained.model)
    text_trained.text_fingerprint = text_fingerprint(text_trained.model, text_trained.tokenizer,
                                                     text_trained.context_length)
    assert text_trained.text_key != tiny.text_key
    other = extract_embeddings(table, text_trained, tmp_path / "emb" / "tiny-text", **kw)
    assert other.cached == {"image": False, "text": False}
    assert calls.count("text") == 2 * n_text and len(list(store.iterdir())) == 2
    assert not np.allclose(load_embeddings(other["text"]).emb, a.emb)


def frozen_key(result) -> str:
    return json.loads(result.stamp.read_text())["modalities"]["text"]["key"]


def test_changed_report_changes_text_embedding(tiny, tmp_path):
    table = make_table(tmp_path / "img", n=4)
    a = load_embeddings(extract_embeddings(table, tiny, tmp_path / "a", modalities=["text"], progress=False)["text"])
    table.loc[table["study_id"] == "s001", "report"] = "Large right pneumothorax."
    b = load_embeddings(extract_embeddings(table, tiny, tmp_path / "a", modalities=["text"], progress=False)["text"])
    assert np.array_equal(a.take(["s000"]), b.take(["s000"]))
    assert not np.allclose(a.take(["s001"]), b.take(["s001"]))


def test_interrupted_run_resumes_from_shards(tiny, tmp_path, monkeypatch):
    table = make_table(tmp_path / "img", n=26)
    kwargs = dict(modalities=["image"], batch_size=2, num_workers=0, chunk_size=4, precision="fp32", progress=False)
    whole = load_embeddings(extract_embeddings(table, tiny, tmp_path / "whole", **kwargs)["image"])

    real_write, written = embed._write_shard, []

    def crash_after_three(path, *args):
        if len(written) == 3:
            raise KeyboardInterrupt("simulated kill")
        real_write(path, *args)
        written.append(path.name)

    monkeypatch.setattr(embed, "_write_shard", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        extract_embeddings(table, tiny, tmp_path / "resumed", **kwargs)
    assert not (tmp_path / "resumed" / "done.json").exists() and not (tmp_path / "resumed" / "image.npz").exists()
    monkeypatch.setattr(embed, "_write_shard", real_write)
    out = extract_embeddings(table, tiny, tmp_path / "resumed", **kwargs)
    stamp = json.loads(out.stamp.read_text())
    assert stamp["modalities"]["image"]["chunks_reused"] == 3
    resumed = load_embeddings(out["image"])
    assert resumed.ids.tolist() == whole.ids.tolist()
    assert np.array_equal(resumed.emb, whole.emb)
    assert not (tmp_path / "resumed" / ".partial").exists()


def test_stale_or_corrupt_shard_is_recomputed(tiny, tmp_path, monkeypatch):
    table = make_table(tmp_path / "img", n=8)
    kwargs = dict(modalities=["image"], batch_size=2, num_workers=0, chunk_size=4, precision="fp32", progress=False)
    real_write = embed._write_shard

    def stop(path, *args):
        real_write(path, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(embed, "_write_shard", stop)
    with pytest.raises(KeyboardInterrupt):
        extract_embeddings(table, tiny, tmp_path / "emb", **kwargs)
    monkeypatch.setattr(embed, "_write_shard", real_write)
    shard = next((tmp_path / "emb" / ".partial").rglob("chunk-000000.npz"))
    shard.write_bytes(b"not a zip")
    out = extract_embeddings(table, tiny, tmp_path / "emb", **kwargs)
    assert json.loads(out.stamp.read_text())["modalities"]["image"]["chunks_reused"] == 0
    assert load_embeddings(out["image"]).ids.tolist() == table["image_id"].tolist()


def test_text_dedup_conflicts_and_empty_reports(tiny, tmp_path):
    table = make_table(tmp_path / "img", n=6)
    table.loc[table["study_id"] == "s002", "report"] = "  "
    out = extract_embeddings(table, tiny, tmp_path / "emb", modalities=["text"], progress=False)
    assert out.skipped["text"] == [{"id": "s002", "reason": "empty report"}]
    assert load_embeddings(out["text"]).ids.tolist() == ["s000", "s001"]
    table.loc[0, "report"] = "something else"
    with pytest.raises(ValueError, match="s000"):
        extract_embeddings(table, tiny, tmp_path / "emb2", modalities=["text"], progress=False)
    with pytest.raises(ValueError, match="lacks columns"):
        extract_embeddings(table.drop(columns=["report"]), tiny, tmp_path / "emb3", progress=False)
    dup = pd.concat([table, table.iloc[:1]])
    with pytest.raises(ValueError, match="duplicate image_id.*im000"):
        extract_embeddings(dup, tiny, tmp_path / "emb4", modalities=["image"], progress=False)


def test_precision_choice(monkeypatch):
    from cxrlib import runtime

    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert embed.resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert embed.resolve_precision("auto", "cpu") == "bf16"
    assert embed.resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match="fp16"):
        embed.resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision must be"):
        embed.resolve_precision("int8", "cpu")


def test_bf16_close_to_fp32(tiny, tmp_path):
    table = make_table(tmp_path / "img", n=6)
    kw = dict(modalities=["image"], num_workers=0, progress=False)
    a = load_embeddings(extract_embeddings(table, tiny, tmp_path / "a", precision="fp32", **kw)["image"])
    b = load_embeddings(extract_embeddings(table, tiny, tmp_path / "b", precision="bf16", **kw)["image"])
    assert b.meta["precision"] == "bf16"
    assert np.min(np.sum(a.emb * b.emb, axis=1)) > 0.99


def test_16bit_radiograph_keeps_its_contrast(tiny, tmp_path):
    """A 12-bit image stored in 16 bits reaches the backbone with its full grey range, as RGB."""
    ramp = np.tile(np.linspace(0, 4095, 64), (64, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "r16.png")
    Image.fromarray((ramp / 4095 * 255).round().astype(np.uint8)).save(tmp_path / "r8.png")
    x16 = tiny.preprocess(load_cxr_image(tmp_path / "r16.png"))
    x8 = tiny.preprocess(load_cxr_image(tmp_path / "r8.png"))
    assert x16.shape == (3, 64, 64)
    mean, std = torch.tensor(tiny.model.visual.preprocess_cfg["mean"]), torch.tensor(tiny.model.visual.preprocess_cfg["std"])
    pixels = x16 * std[:, None, None] + mean[:, None, None]  # back to [0, 1]
    assert pixels.min() < 0.02 and pixels.max() > 0.98  # not crushed into a few grey levels
    assert len(torch.unique((pixels[0] * 255).round())) > 50
    assert torch.allclose(pixels[0], pixels[1], atol=1e-6) and torch.allclose(pixels[0], pixels[2], atol=1e-6)
    assert (x16 - x8).abs().max() < 0.05


def test_cli(tmp_path, capsys):
    table = make_table(tmp_path / "img", n=6)
    table.to_parquet(tmp_path / "t.parquet")
    rc = embed.main(["--table", str(tmp_path / "t.parquet"), "--backbone", "tiny", "--out-dir", str(tmp_path / "e"),
                     "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--precision", "fp32",
                     "--no-progress"])
    assert rc == 0 and (tmp_path / "e" / "done.json").is_file()
    assert "image: 6 embedded" in capsys.readouterr().out
    rc = embed.main(["--table", str(tmp_path / "t.parquet"), "--backbone", "nope", "--out-dir", str(tmp_path / "f")])
    assert rc == 2 and "valid names" in capsys.readouterr().err


def test_full_disk_is_a_clear_error_and_leaves_no_stamp(tiny, tmp_path, monkeypatch):
    import errno

    table = make_table(tmp_path / "img", n=4)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(embed.np, "savez", no_space)
    with pytest.raises(OSError, match=r"cannot write embedding shard .*chunk-000000.npz.*disk full"):
        extract_embeddings(table, tiny, tmp_path / "emb", modalities=["image"], progress=False)
    assert not (tmp_path / "emb" / "done.json").exists() and not (tmp_path / "emb" / "image.npz").exists()
    assert not list((tmp_path / "emb").rglob("*.npz"))  # no half-written shard left behind
