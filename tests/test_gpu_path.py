"""The GPU path's code run on CPU: device decoding equals the CPU reader, counted skips, OOM back-off,
auto batch size and decode decisions with CUDA faked, and imports free of the notebook stack."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrlib import accel, embed
from cxrlib.backbones import load_backbone
from cxrlib.embed import extract_embeddings
from cxrlib.embstore import load_embeddings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _leave_global_rng_as_found():
    """These tests leave torch's global RNG as they found it (later modules' fixtures draw from it)."""
    with torch.random.fork_rng(devices=[]):
        yield


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny")


def radiograph(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth grey ramp with a bright blob and noise: something a resize can get wrong."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = 40 + 120 * xx / w + 60 * np.exp(-(((yy - h / 2) / (h / 5)) ** 2 + ((xx - w / 3) / (w / 6)) ** 2))
    return (img + rng.normal(0, 8, (h, w))).clip(0, 255).astype(np.uint8)


def jpeg_bytes(arr: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def mixed_table(folder: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """Grey and colour JPEGs of several sizes, 8- and 16-bit PNGs, a truncated and a corrupt JPEG.

    Returns the table and ``{image_id: expected skip}`` for the two bad files.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rows, bad = [], {}

    def add(name: str, data: bytes | None = None, image: Image.Image | None = None):
        path = folder / name
        if data is not None:
            path.write_bytes(data)
        else:
            image.save(path)
        i = len(rows)
        rows.append({"image_id": f"im{i:02d}", "image_path": str(path), "study_id": f"s{i:02d}", "report": f"r{i}"})
        return f"im{i:02d}"

    add("a.jpg", jpeg_bytes(radiograph(300, 240, 0)))
    add("b.jpg", jpeg_bytes(radiograph(180, 420, 1)))
    colour = np.stack([radiograph(200, 260, 2)] * 3, -1)
    colour[..., 0] = (colour[..., 0] * 0.8).astype(np.uint8)
    add("c.jpg", jpeg_bytes(colour))
    bad[add("truncated.jpg", jpeg_bytes(radiograph(200, 200, 3))[:-400])] = "truncated"
    add("d.png", image=Image.fromarray(radiograph(256, 256, 4)))
    add("e16.png", image=Image.fromarray(radiograph(220, 200, 5).astype(np.uint16) * 200 + 1000))
    good = jpeg_bytes(radiograph(120, 100, 6))
    corrupt = good[:3] + bytes(np.random.default_rng(7).integers(0, 256, 300, dtype=np.uint8)) + good[-2:]
    bad[add("corrupt.jpg", corrupt)] = "corrupt"
    add("f.jpg", jpeg_bytes(radiograph(1100, 900, 8)))
    add("g.jpg", jpeg_bytes(radiograph(64, 64, 9)))
    return pd.DataFrame(rows), bad


@pytest.mark.parametrize("interpolation,resize_mode,size", [("bicubic", "shortest", 64), ("bilinear", "shortest", 64),
                                                            ("bicubic", "squash", 48), ("bicubic", "shortest", 224)])
@pytest.mark.parametrize("hw", [(300, 240), (180, 420), (64, 64), (1100, 900)])
def test_device_preprocess_matches_the_cpu_transform(interpolation, resize_mode, size, hw):
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from torchvision.io import ImageReadMode, decode_jpeg

    cfg = PreprocessCfg(size=(size, size), interpolation=interpolation, resize_mode=resize_mode,
                        mean=(0.5, 0.45, 0.4), std=(0.27, 0.26, 0.28))
    cpu = image_transform_v2(cfg, is_train=False)
    dev = accel.DevicePreprocess(size=(size, size), mean=cfg.mean, std=cfg.std, interpolation=interpolation,
                                 resize_mode=resize_mode)
    data = jpeg_bytes(radiograph(*hw, seed=hw[0]))
    ref = cpu(Image.open(io.BytesIO(data)).convert("L").convert("RGB"))
    got = dev(decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.GRAY))
    assert got.shape == ref.shape
    # in 8-bit grey levels: the decoders agree bit for bit, the resamplers within one level (rounding)
    levels = (got - ref).abs() * torch.tensor(cfg.std).view(3, 1, 1) * 255
    assert float(levels.max()) <= 1.0 + 1e-3 and float(levels.mean()) < 0.3


def test_from_backbone_reads_the_transform(tiny):
    pre = accel.DevicePreprocess.from_backbone(tiny)
    assert pre.size == (64, 64) and pre.interpolation == "bicubic" and pre.resize_mode == "shortest"
    assert pre.mean == tuple(tiny.model.visual.preprocess_cfg["mean"])


def _cosines(a, b) -> np.ndarray:
    ea, eb = load_embeddings(a), load_embeddings(b)
    assert ea.ids.tolist() == eb.ids.tolist()
    return np.sum(ea.emb * eb.emb, axis=1)


def test_gpu_path_embeddings_equal_the_cpu_path(tiny, tmp_path):
    """The same extraction with JPEGs decoded by decode_jpeg + device transform (on CPU here) vs PIL workers."""
    table, bad = mixed_table(tmp_path / "img")
    kw = dict(modalities=["image"], batch_size=4, num_workers=0, precision="fp32", device="cpu", progress=False)
    cpu = extract_embeddings(table, tiny, tmp_path / "cpu", decode="cpu", **kw)
    dev = extract_embeddings(table, tiny, tmp_path / "dev", decode="device", **kw)
    cos = _cosines(cpu["image"], dev["image"])
    assert len(cos) == len(table) - len(bad) and cos.min() >= 0.995
    for res in (cpu, dev):  # the two bad files are counted skips naming them; their batch-mates are kept
        assert {s["id"] for s in res.skipped["image"]} == set(bad)
        assert all(s["reason"] for s in res.skipped["image"])
    stamp = json.loads(dev.stamp.read_text())
    assert stamp["decode"] == "device" and stamp["modalities"]["image"]["n_skipped"] == 2
    assert json.loads(cpu.stamp.read_text())["decode"] == "cpu"
    # the decode path is part of the cache key: switching it recomputes, not reuses
    assert load_embeddings(cpu["image"]).meta["cache_key"] != load_embeddings(dev["image"]).meta["cache_key"]


def test_device_decoder_rejecting_a_file_falls_back_to_the_cpu_reader(tiny, tmp_path, monkeypatch):
    """nvjpeg refuses some valid JPEGs (e.g. some progressive ones): the batch is redone one by one
    and the refused file read on CPU, so it is kept, not skipped."""
    table, bad = mixed_table(tmp_path / "img")
    refused = (tmp_path / "img" / "b.jpg").stat().st_size
    real, calls = accel._decode, []

    def picky(data, device):
        calls.append(len(data))
        if any(len(d) == refused for d in data):
            raise RuntimeError("nvjpeg: unsupported JPEG")
        return real(data, device)

    monkeypatch.setattr(accel, "_decode", picky)
    kw = dict(modalities=["image"], batch_size=4, num_workers=0, precision="fp32", device="cpu", progress=False)
    dev = extract_embeddings(table, tiny, tmp_path / "dev", decode="device", **kw)
    monkeypatch.setattr(accel, "_decode", real)
    cpu = extract_embeddings(table, tiny, tmp_path / "cpu", decode="cpu", **kw)
    assert {s["id"] for s in dev.skipped["image"]} == set(bad)
    assert _cosines(cpu["image"], dev["image"]).min() >= 0.995
    assert 1 in calls  # the one-by-one retry ran


def test_decode_on_device_keeps_batch_order(tiny):
    """Positions come back in batch order with JPEG and CPU-ready items interleaved."""
    from torchvision.io import encode_jpeg

    pre = accel.DevicePreprocess.from_backbone(tiny)
    jpgs = [encode_jpeg(torch.full((1, 80, 80), v, dtype=torch.uint8)) for v in (10, 200)]
    ready = torch.stack([torch.full((3, 64, 64), 7.0), torch.full((3, 64, 64), -7.0)])
    batch = accel.EncodedBatch([0, 2], jpgs, [1, 3], ready, 4)
    x, kept, failed = accel.decode_on_device(batch, [5, 6, 7, 8], pre, "cpu", lambda i: (None, "unused"))
    assert kept == [0, 1, 2, 3] and failed == []
    assert float(x[1].mean()) == 7.0 and float(x[3].mean()) == -7.0
    assert float(x[0].mean()) < float(x[2].mean())  # dark JPEG before bright JPEG


def test_extraction_backs_off_on_oom_without_losing_items(tiny, tmp_path, monkeypatch):
    from test_embed import make_table  # tests/ is on sys.path (pytest rootdir-less import)

    table = make_table(tmp_path / "img", n=23)
    kw = dict(modalities=["image"], num_workers=0, precision="fp32", device="cpu", progress=False)
    ref = extract_embeddings(table, tiny, tmp_path / "ref", batch_size=8, **kw)
    real, sizes = tiny.model.encode_image, []

    def small_gpu(x, *a, **k):
        if len(x) > 3:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate for {len(x)} images")
        sizes.append(len(x))
        return real(x, *a, **k)

    monkeypatch.setattr(tiny.model, "encode_image", small_gpu)
    got = extract_embeddings(table, tiny, tmp_path / "oom", batch_size=8, **kw)
    monkeypatch.setattr(tiny.model, "encode_image", real)
    a, b = load_embeddings(ref["image"]), load_embeddings(got["image"])
    assert b.ids.tolist() == table["image_id"].tolist()  # every item once, in order
    np.testing.assert_allclose(a.emb, b.emb, atol=1e-5)
    assert sum(sizes) == len(table) and max(sizes) <= 3
    stamp = json.loads(got.stamp.read_text())
    assert stamp["batch_size_used"]["image"] == 2 and stamp["oom_backoffs"]["image"] == 2  # 8 -> 4 -> 2


def test_auto_batch_size(tiny, monkeypatch):
    assert embed.resolve_batch_size("auto", "image", tiny, "cpu", "fp32") == embed.AUTO_BATCH["cpu"]
    assert embed.resolve_batch_size(16, "image", tiny, "cuda", "bf16") == 16
    with pytest.raises(ValueError, match="batch_size"):
        embed.resolve_batch_size(0, "image", tiny, "cpu", "fp32")
    seen = []

    def fake_encode(model, modality, x, tokenizer, device, precision):  # a GPU holding 300 images
        seen.append((modality, len(x), device, tuple(x.shape[1:]) if modality == "image" else None))
        if len(x) > 300:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return np.zeros((len(x), 32), np.float32)

    monkeypatch.setattr(embed, "_encode", fake_encode)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setitem(embed.AUTO_BATCH, "image_limit", 1024)
    assert embed.resolve_batch_size("auto", "image", tiny, "cuda", "bf16") == 256
    assert seen[0] == ("image", 32, "cuda", (3, 64, 64)) and max(n for _, n, _, _ in seen) == 512
    monkeypatch.setitem(embed.AUTO_BATCH, "text_limit", 128)
    assert embed.resolve_batch_size("auto", "text", tiny, "cuda", "bf16") == 128
    with pytest.raises(ValueError):
        extract_embeddings(pd.DataFrame(), tiny, "unused", batch_size="big")


def test_resolve_decode(tiny, monkeypatch):
    assert embed.resolve_decode("auto", "cpu", tiny) == "cpu"
    assert embed.resolve_decode("device", "cpu", tiny) == "device"  # the GPU code on CPU (tests, benchmarks)
    assert embed.resolve_decode("cpu", "cuda", tiny) == "cpu"
    with pytest.raises(ValueError):
        embed.resolve_decode("gpu", "cpu", tiny)
    monkeypatch.setattr(accel, "decoder_problem", lambda device: "decode_jpeg on cuda failed: no nvjpeg")
    assert embed.resolve_decode("auto", "cuda", tiny) == "cpu"
    with pytest.raises(accel.DeviceError, match="no nvjpeg"):
        embed.resolve_decode("device", "cuda", tiny)
    monkeypatch.setattr(accel, "decoder_problem", lambda device: None)
    assert embed.resolve_decode("auto", "cuda", tiny) == "device"
    monkeypatch.setattr(accel.DevicePreprocess, "from_backbone", classmethod(lambda cls, b: None))
    assert embed.resolve_decode("auto", "cuda", tiny) == "cpu"


def test_decoder_probe_on_cpu():
    assert accel.decoder_problem("cpu") is None


def test_cli_cuda_without_cuda_fails_in_one_line_before_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = embed.main(["--table", str(tmp_path / "missing.parquet"), "--backbone", "tiny",
                     "--out-dir", str(tmp_path / "out"), "--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "DEVICE=cuda" in err and "not available" in err
    assert not (tmp_path / "out").exists()


BLOCKER = r"""
import importlib.abc, sys
BLOCKED = {"papermill", "umap", "jupyter", "jupyter_client", "jupyter_core", "nbformat", "nbclient",
           "ipykernel", "ipywidgets", "IPython", "faiss", "openTSNE", "pytorch_metric_learning"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked import of {name}")
        return None
sys.meta_path.insert(0, Block())
import importlib, importlib.util
for mod in MODULES:
    importlib.import_module(mod)
for path in SCRIPTS:
    spec = importlib.util.spec_from_file_location("bench_" + path.split("/")[-1][:-3], path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not loaded, loaded
print("ok")
"""

#: what benchmarks/gpu_check.sh runs (a GPU machine has none of the notebook stack, nor faiss or
#: pytorch-metric-learning: the losses it trains with are cxrlib's and open_clip's)
GPU_CHECK_MODULES = ["cxrlib", "cxrlib.accel", "cxrlib.embed", "cxrlib.backbones", "cxrlib.train",
                     "cxrlib.retrieval", "cxrlib.projector", "cxrlib.losses", "cxrlib.pairs", "cxrlib.embstore"]
GPU_CHECK_SCRIPTS = ["benchmarks/embed_throughput.py", "benchmarks/gpu_check.py"]


def test_gpu_check_imports_without_the_notebook_stack():
    code = f"MODULES = {GPU_CHECK_MODULES!r}\nSCRIPTS = {[str(REPO / s) for s in GPU_CHECK_SCRIPTS]!r}\n" + BLOCKER
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_blocker_catches_a_notebook_import(tmp_path):
    """The hygiene test above can fail: a module importing papermill is caught."""
    (tmp_path / "leaky.py").write_text("import papermill\n")
    code = "MODULES = ['leaky']\nSCRIPTS = []\n" + BLOCKER
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode != 0 and "blocked import of papermill" in out.stderr


def _gpu_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_train_and_search_steps_on_cpu():
    """The check's steps are the package's own code on any device: here on CPU at a toy size."""
    gc = _gpu_check_module()
    tr = gc.check_train(600, 200, epochs=2, target_epochs=50, device="cpu")
    assert tr["epochs"] == 2 and tr["seconds_per_epoch"] > 0 and tr["projected_50_epochs_s"] > tr["seconds"]
    se = gc.check_search(100, 3000, 10, n_verify=20, device="cpu")
    assert se["same_indices_as_cpu"] == 1.0 and se["max_score_diff_vs_cpu"] == 0.0


def test_gpu_check_adapt_step_trains_at_each_precision_on_cpu(tmp_path):
    """The adaptation step is notebook 00's adapt() at each precision asked for (here the tiny backbone on CPU,
    fp32 and bf16): a table with a quarter held out, one history row per epoch, finite losses, nothing skipped."""
    gc = _gpu_check_module()
    table = gc.adapt_table(tmp_path / "t", 24)
    assert (table["split"] == "val").sum() == 6 and set(table["label_abnormal"]) == {0, 1}
    assert all(Path(p).is_file() for p in table["image_path"])
    res = gc.check_adapt(tmp_path, 24, epochs=2, precisions=("fp32", "bf16"), device="cpu", batch_size=6,
                         backbone="tiny")
    assert res["train_images"] == 18 and res["backbone"] == "tiny"
    for precision in ("fp32", "bf16"):
        r = res[precision]
        assert r["finite"] and r["skipped"] == 0 and r["batch_size"] == 6 and r["peak_gpu_mb"] is None
        assert len(r["train_loss"]) == 2 and all(v > 0 for v in r["train_images_per_s"])
    assert res["fp32"]["train_loss"] != res["bf16"]["train_loss"]  # each ran at its own precision


def test_gpu_check_compares_runs_by_ids_and_cosines(tmp_path):
    """The torchrun step's verdict (its real run on CPU ranks is in test_embed_distributed): equal runs pass,
    a reordered or a changed embedding set fails."""
    from cxrlib.embstore import Embeddings, save_embeddings

    gc = _gpu_check_module()
    rng = np.random.default_rng(0)
    ids = [f"i{i}" for i in range(6)]
    sets = {m: rng.normal(size=(6, 4)).astype(np.float32) for m in ("image", "text")}
    sets = {m: e / np.linalg.norm(e, axis=1, keepdims=True) for m, e in sets.items()}

    def write(folder: str, order: list[int], changed: str | None = None) -> Path:
        d = tmp_path / folder
        d.mkdir()
        for m, e in sets.items():
            e = e[order].copy()
            if m == changed:
                e[2] = -e[2]
            save_embeddings(d / f"{m}.npz", Embeddings([ids[i] for i in order], e))
        (d / "done.json").write_text(json.dumps({"world_size": 2}))
        return d

    one = write("one", list(range(6)))
    assert gc.compare_runs(one, write("same", list(range(6)))) == {
        "ok": True, "world_size": 2, **{m: {"same_ids": True, "min_cosine": pytest.approx(1.0)} for m in sets}}
    reordered = gc.compare_runs(one, write("reordered", [1, 0, 2, 3, 4, 5]))
    assert not reordered["ok"] and reordered["image"]["same_ids"] is False
    changed = gc.compare_runs(one, write("changed", list(range(6)), changed="text"))
    assert not changed["ok"] and changed["image"]["min_cosine"] == pytest.approx(1.0)
    assert changed["text"]["min_cosine"] == pytest.approx(-1.0)


def test_gpu_check_torchrun_step_runs_the_extractors_torchrun_command(tmp_path, monkeypatch):
    """The step launches :func:`cxrlib.embed.torchrun_command` (2 ranks) and one plain process with the same
    extractor options, on a 96-image table; a failed process is reported with its error, not compared."""
    gc = _gpu_check_module()
    ran: list[list[str]] = []
    monkeypatch.setattr(gc.subprocess, "run", lambda cmd, **kw: ran.append(cmd) or
                        subprocess.CompletedProcess(cmd, 1, "", "rank 1 failed"))
    assert gc.check_torchrun(tmp_path, device="cpu") == {"ok": False, "error": "rank 1 failed"}
    two, one = ran
    opts = two[two.index("cxrlib.embed") + 1:]
    assert two == embed.torchrun_command(tmp_path / "t.parquet", tmp_path / "two", 2, opts[4:])
    assert one[:3] == [sys.executable, "-m", "cxrlib.embed"]
    assert one[3:] == [*opts[:3], str(tmp_path / "one"), *opts[4:]]
    table = pd.read_parquet(tmp_path / "t.parquet")
    assert len(table) == 96 and all(Path(p).is_file() for p in table["image_path"])


@pytest.mark.skipif(torch.cuda.is_available() or Path("/usr/bin/nvidia-smi").exists(), reason="a GPU machine runs the check")
def test_gpu_check_without_gpu_says_so_at_once():
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["gpu"] is None and "no GPU" in line["message"]


def test_make_device_cuda_without_cuda_fails_before_any_node(monkeypatch, capsys):
    """`make ... DEVICE=cuda` on a machine without CUDA: `dag check` (run before any node) says so in one line."""
    from cxrlib import dag

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dag.main(["check", "--profile", "smoke", "DEVICE=cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "DEVICE=cuda" in err and "not available" in err
    assert dag.main(["check", "--profile", "smoke", "DEVICE=cpu"]) == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(accel, "cuda_build_problem", lambda: None)
    assert dag.main(["check", "--profile", "smoke", "DEVICE=cuda"]) == 0
    plan = dag.plan("smoke", ["DEVICE=cuda"])  # and it reaches every node that runs on a device
    assert {n for n, p in plan.params.items() if p.get("device") == "cuda"} >= {"embed", "02_train"}


def test_adaptation_in_fp16_goes_through_the_grad_scaler(tmp_path, monkeypatch):
    """fp16 adaptation (GPUs without bf16) scales the loss; the same code runs here with CPU autocast."""
    from test_adapt import _cfg, _make_table  # tests/ is on sys.path

    from cxrlib import adapt as A

    with pytest.raises(ValueError, match="fp16 is for GPUs"):
        _cfg(precision="fp16", device="cpu").validate()
    made = []
    real = accel.grad_scaler

    def spy(precision, device):
        made.append(real(precision, device))
        return made[-1]

    monkeypatch.setattr(accel, "grad_scaler", spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = A.adapt(_make_table(tmp_path), load_backbone("tiny"), _cfg(precision="fp16", device="auto", epochs=1),
                  progress=False)
    assert len(made) == 1 and made[0].is_enabled() and made[0].get_scale() > 0
    assert np.isfinite(res.history["train_loss"].iloc[1])


def test_batched_resize_equals_one_by_one(monkeypatch):
    """Same-size images are resized together, in groups; the result equals resizing each alone, in order."""
    monkeypatch.setattr(accel, "RESIZE_GROUP", 2)
    pre = accel.DevicePreprocess(size=(32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    shapes = [(1, 90, 70), (1, 40, 50), (1, 90, 70), (3, 90, 70), (1, 90, 70), (1, 40, 50), (1, 90, 70)]
    g = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 256, s, generator=g, dtype=torch.uint8) for s in shapes]
    got = pre.batch(imgs)
    assert got.shape == (len(imgs), 3, 32, 32)
    for i, img in enumerate(imgs):
        torch.testing.assert_close(got[i], pre(img), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def biomedclip_arch():
    """BiomedCLIP's released architecture with seeded random weights (``embed_throughput.biomedclip_random``),
    built once for the tests that embed with it (building ViT-B/16 + BERT-base takes seconds here)."""
    _gpu_check_module()  # puts benchmarks/ on sys.path
    import embed_throughput as et

    return et.biomedclip_random("cpu")


@pytest.mark.slow
def test_biomedclip_architecture_device_decode_equals_cpu(tmp_path, biomedclip_arch):
    """BiomedCLIP's ViT-B/16 at 224 px (random weights) on full-resolution-like JPEGs: cosine >= 0.995."""
    gc = _gpu_check_module()  # puts benchmarks/ on sys.path
    import embed_throughput as et

    bb = biomedclip_arch
    files = et.make_images(tmp_path / "jpg", 4, "jpeg")
    table = pd.DataFrame({"image_id": [f"i{i}" for i in range(4)], "image_path": list(map(str, files)),
                          "study_id": [f"s{i}" for i in range(4)], "report": "x"})
    kw = dict(modalities=["image"], batch_size=4, num_workers=0, precision="fp32", device="cpu", progress=False)
    cpu = extract_embeddings(table, bb, tmp_path / "cpu", decode="cpu", **kw)
    dev = extract_embeddings(table, bb, tmp_path / "dev", decode="device", **kw)
    assert gc is not None and _cosines(cpu["image"], dev["image"]).min() >= 0.995


@pytest.mark.slow
def test_embed_throughput_benchmark_runs_and_says_cpu(tmp_path, biomedclip_arch, monkeypatch):
    """The benchmark end to end on CPU, on the module's BiomedCLIP-architecture model (the same function
    builds it; the device-decode test above checks that model) and the fewest images each stage needs."""
    _gpu_check_module()  # puts benchmarks/ on sys.path
    import embed_throughput as et

    asked = []
    monkeypatch.setattr(et, "biomedclip_random", lambda device: asked.append(device) or biomedclip_arch)
    res = et.main(["--device", "cpu", "--n-png", "2", "--n-jpeg", "2", "--n-naive", "1", "--batch-size", "4",
                   "--num-workers", "0", "--precision", "fp32", "--workdir", str(tmp_path)])
    assert res["gpu"] is None and "no GPU" in res["note"] and res["targets"]["jpeg_device_decode>=2000/s"] is None
    assert res["extractor"]["jpeg_device_decode"]["decode"] == "device"
    assert res["extractor"]["jpeg_cpu_decode"]["decode"] == "cpu"
    assert res["device_vs_cpu_decode_min_cosine"] >= 0.995 and res["low_precision_vs_fp32_min_cosine"] > 0.999
    assert asked == ["cpu"]


def test_encoded_images_route_each_file(tiny, tmp_path):
    """Complete JPEGs travel as bytes, other files as decoded grey pixels (resized on the device), bad files
    as a reason; with resize_on_device=False the other files are preprocessed on CPU."""
    from cxrlib.images import load_cxr_image

    table, bad = mixed_table(tmp_path / "img")
    ds = accel.EncodedImages(table["image_path"].tolist(), tiny.preprocess, load_cxr_image)
    kinds = {table["image_id"][i]: ds[i][2] for i in range(len(ds))}
    assert {k for k, v in kinds.items() if v == "pixels"} == {"im04", "im05"}  # the 8- and 16-bit PNGs
    assert kinds["im03"] not in ("jpeg", "pixels")  # truncated: not a complete JPEG, unreadable on CPU
    assert kinds["im06"] == "jpeg"  # corrupt inside: left to the device decoder, then the CPU reader
    px = ds[5][1]
    assert px.dtype == torch.uint8 and px.shape == (1, 220, 200) and int(px.max()) == 255  # 16-bit windowed
    cpu = accel.EncodedImages(table["image_path"].tolist(), tiny.preprocess, load_cxr_image, resize_on_device=False)
    assert cpu[4][2] is None and cpu[4][1].shape == (3, 64, 64)


def test_compile_flag_wraps_the_image_forward(tiny, tmp_path, monkeypatch):
    """compile=True runs the image forward through torch.compile (eager backend here: the wiring, not
    inductor), leaves the model itself untouched, and embeds the same as without."""
    from test_embed import make_table  # tests/ is on sys.path (pytest rootdir-less import)

    real, wrapped = torch.compile, []

    def eager_compile(fn, **kw):
        wrapped.append(getattr(fn, "__name__", fn))
        return real(fn, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    table = make_table(tmp_path / "img", n=6)
    kw = dict(batch_size=4, num_workers=0, precision="fp32", device="cpu", progress=False)
    ref = extract_embeddings(table, tiny, tmp_path / "ref", **kw)
    got = extract_embeddings(table, tiny, tmp_path / "compiled", compile=True, **kw)
    assert wrapped == ["encode_image"] and tiny.model.encode_image.__func__.__name__ == "encode_image"
    for m in ("image", "text"):
        np.testing.assert_allclose(load_embeddings(ref[m]).emb, load_embeddings(got[m]).emb, atol=1e-5)
    assert json.loads(got.stamp.read_text())["compile"] is True


def test_encode_returns_float32_unit_features_in_both_forms(tiny):
    """_encode at bf16: the autocast forward's features L2-normalised in float32, as numpy (default) or
    as a tensor left on the device (the extraction loop's form)."""
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            raw = tiny.model.encode_image(x)
        ref = torch.nn.functional.normalize(raw.float(), dim=-1).numpy()
    got = embed._encode(tiny.model, "image", x, None, "cpu", "bf16")
    dev = embed._encode(tiny.model, "image", x, None, "cpu", "bf16", to_numpy=False)
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
    assert dev.dtype == torch.float32 and np.allclose(dev.numpy(), got)
