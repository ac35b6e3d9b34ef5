"""The GPU check (run by ``benchmarks/gpu_check.sh``): extraction, projector training and search on a GPU.

1. ``embed_throughput`` on CUDA: BiomedCLIP architecture (random weights), synthetic MIMIC-like JPEGs
   and Open-I-like PNGs; naive loop, pure forward, extractor with CPU and with GPU decode, and under
   ``torch.compile`` (skip with ``--no-compile``); peak GPU memory; cosines.
2. A short projector training on ``--train-pairs`` synthetic 512-d pairs, its embeddings resident on
   the GPU, eager and compiled (``train_projector(compile=True)``); seconds per epoch and the projected time of
   ``--target-epochs`` epochs.
3. Top-``k`` search of ``--queries`` against ``--gallery`` items on the GPU, checked against the CPU
   search on a sample of queries.
4. Backbone adaptation (notebook 00's ``cxrlib.adapt``) of the BiomedCLIP architecture on ``--adapt-images``
   synthetic PNGs, under bf16 autocast and under fp16 with the loss scaler: training images/s, finite losses.
5. With two GPUs or more: a 2-process ``torchrun`` extraction (NCCL), checked against one process.

Targets (one recent data-centre GPU): extractor >= 90% of the forward on PNGs, >= 2,000 images/s on
full-resolution JPEGs with GPU decode, 300k pairs x 50 epochs under 120 s, 2,000 x 300,000 top-10
under 2 s. The last line printed is one JSON object. Without a GPU it says so and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from cxrlib import accel  # noqa: E402

TARGETS = {"train_projected_s": 120.0, "search_s": 2.0, "jpeg_device_images_per_s": 2000.0,
           "png_fraction_of_forward": 0.9}


def _sync(device: str) -> None:
    if accel.is_cuda(device):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if accel.is_cuda(device):
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if accel.is_cuda(device) else None


def environment() -> dict:
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "cores": accel.available_cores(),
            "bf16": torch.cuda.is_bf16_supported(), "build_problem": accel.cuda_build_problem(),
            "gpu_jpeg_decode_problem": accel.decoder_problem("cuda")}


def check_embed(compile: bool) -> dict:
    import embed_throughput

    with contextlib.redirect_stdout(sys.stderr):  # its own JSON line is not the check's last line
        res = embed_throughput.main(["--device", "cuda"] + (["--compile"] if compile else []))
    keep = ("precision", "images", "decoder_only", "forward_batch_size", "num_workers", "naive_images_per_s", "forward_images_per_s",
            "forward_peak_gpu_mb", "extractor", "extractor_png_fraction_of_forward",
            "low_precision_vs_fp32_min_cosine", "device_vs_cpu_decode_min_cosine", "seconds", "targets")
    return {k: res[k] for k in keep}


def check_train(n_train: int, n_val: int, epochs: int, target_epochs: int, device: str = "cuda",
                compile: bool = False) -> dict:
    """The projector trainer (the default recipe) on synthetic 512-d pairs: seconds per epoch after the first
    (which includes compiling, with ``compile``) and the projected time of ``target_epochs`` epochs."""
    from cxrlib.train import TrainConfig, synthetic_splits, train_projector

    t0 = time.perf_counter()
    splits = synthetic_splits(n_train, n_val, dim=512, seed=0)
    made = time.perf_counter() - t0
    cfg = TrainConfig(epochs=epochs, patience=epochs, device=device, seed=0)
    _reset_peak(device)
    _sync(device)
    t0 = time.perf_counter()
    res = train_projector(splits["train"], splits["val"], cfg, progress=False, compile=compile)
    _sync(device)
    seconds = time.perf_counter() - t0
    per_epoch = float(res.history["seconds"].iloc[2 if epochs > 1 else 1:].mean())  # epoch 0 = before training
    # the time outside the training loops (set-up and the epochs + 1 validations) counted as each validation's:
    # the projection errs long
    per_validation = (seconds - float(res.history["seconds"].sum())) / (epochs + 1)
    return {"pairs": n_train, "val": n_val, "epochs": epochs, "batch_size": cfg.batch_size, "compile": compile,
            "seconds": round(seconds, 2), "first_epoch_seconds": round(float(res.history["seconds"].iloc[1]), 2),
            "seconds_per_epoch": round(per_epoch, 3),
            "seconds_per_validation": round(per_validation, 3),
            f"projected_{target_epochs}_epochs_s": round(seconds + (per_epoch + per_validation) * (target_epochs - epochs),
                                                         1),
            "data_seconds": round(made, 1), "best_val_metric": round(res.best_metric, 4),
            "peak_gpu_mb": _peak_mb(device)}


def check_search(n_queries: int, n_gallery: int, k: int, n_verify: int, device: str = "cuda") -> dict:
    from cxrlib.retrieval import topk_similarity

    rng = np.random.default_rng(0)
    g = rng.standard_normal((n_gallery, 512), dtype=np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = g[rng.integers(0, n_gallery, n_queries)] + 0.5 * rng.standard_normal((n_queries, 512), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    topk_similarity(q[:64], g, k, device=device)  # warm-up (CUDA context, kernels)
    _sync(device)
    t0 = time.perf_counter()
    s, i = topk_similarity(q, g, k, device=device)
    seconds = time.perf_counter() - t0
    cs, ci = topk_similarity(q[:n_verify], g, k, device="cpu")
    same = float(np.mean(ci == i[:n_verify]))
    return {"queries": n_queries, "gallery": n_gallery, "k": k, "seconds": round(seconds, 3),
            "verified_queries": n_verify, "same_indices_as_cpu": same,
            "max_score_diff_vs_cpu": float(np.abs(cs - s[:n_verify]).max())}


def adapt_table(folder: Path, n_images: int) -> pd.DataFrame:
    """``n_images`` radiograph-like PNGs (embed_throughput's) with two kinds of report; a quarter for validation."""
    import embed_throughput

    files = embed_throughput.make_images(folder, n_images, "png", seed=2)
    n_val = max(n_images // 4, 2)
    return pd.DataFrame({"study_id": [f"s{i:05d}" for i in range(n_images)],
                         "image_id": [f"i{i:05d}" for i in range(n_images)], "image_path": list(map(str, files)),
                         "report": ["right lower lobe opacity" if i % 2 else "no acute cardiopulmonary findings"
                                    for i in range(n_images)],
                         "label_abnormal": [i % 2 for i in range(n_images)],
                         "split": ["val" if i < n_val else "train" for i in range(n_images)]})


def check_adapt(tmp: Path, n_images: int, epochs: int, precisions: tuple[str, ...] = ("bf16", "fp16"),
                device: str = "cuda", batch_size: int | None = None, backbone: str = "biomedclip-random") -> dict:
    """:func:`cxrlib.adapt.adapt` on the BiomedCLIP architecture (random weights) at each precision (fp16
    trains through the loss scaler), notebook 00's other settings at their defaults: the last epoch's training
    images/s (the first one warms up the kernels), whether every loss stayed finite, peak GPU memory.
    ``batch_size`` None: notebook 00's default; ``backbone`` another registered one (the test's ``tiny``)."""
    import embed_throughput

    from cxrlib import adapt as A
    from cxrlib.backbones import load_backbone

    table = adapt_table(tmp / "adapt", n_images)
    out: dict = {"backbone": backbone, "images": n_images, "train_images": int((table["split"] == "train").sum()), "epochs": epochs}
    for precision in precisions:
        bb = (embed_throughput.biomedclip_random(device) if backbone == "biomedclip-random"
              else load_backbone(backbone, device=device))
        cfg = A.AdaptConfig(backbone=backbone, dataset="synthetic", epochs=epochs, patience=epochs,
                            seed=0, precision=precision, device=device,
                            **({} if batch_size is None else {"batch_size": batch_size}))
        _reset_peak(device)
        _sync(device)
        t0 = time.perf_counter()
        res = A.adapt(table, bb, cfg, progress=False)
        _sync(device)
        h = res.history.iloc[1:]
        losses = h["train_loss"].to_numpy(dtype=float)
        out[precision] = {"seconds": round(time.perf_counter() - t0, 2), "batch_size": cfg.batch_size,
                          "num_workers": cfg.workers(), "cache_images": cfg.cache_images,
                          "train_images_per_s": [round(float(v), 1) for v in h["images_per_s"]],
                          "train_loss": [round(float(v), 4) for v in losses],
                          "finite": bool(np.isfinite(losses).all()), "skipped": len(res.skipped),
                          "peak_gpu_mb": _peak_mb(device)}
        del bb, res
    return out


def compare_runs(one: Path, two: Path) -> dict:
    """One process's extraction in ``one`` against ``two`` ranks' in ``two``: same ids, cosine of each pair."""
    from cxrlib.embstore import load_embeddings

    out = {}
    for m in ("image", "text"):
        a, b = load_embeddings(one / f"{m}.npz"), load_embeddings(two / f"{m}.npz")
        same = a.ids.tolist() == b.ids.tolist()
        out[m] = {"same_ids": same, "min_cosine": float(np.min(np.sum(a.emb * b.emb, axis=1))) if same else None}
    stamp = json.loads((two / "done.json").read_text())
    return {"ok": all(v["same_ids"] and v["min_cosine"] > 0.999 for v in out.values()),
            "world_size": stamp["world_size"], **out}


def check_torchrun(tmp: Path, device: str = "cuda") -> dict:
    """2-process extraction under torchrun (NCCL on GPUs, gloo on CPU) vs one process: same ids, same embeddings.
    (On the CPU, tests/test_embed_distributed.py runs the same torchrun command and this comparison.)"""
    from PIL import Image

    from cxrlib import embed

    if accel.is_cuda(device) and torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU: the 2-process check needs two"}
    rng = np.random.default_rng(0)
    rows = []
    for i in range(96):
        p = tmp / f"t{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (80, 96), dtype=np.uint8)).save(p)
        rows.append({"image_id": f"i{i:03d}", "image_path": str(p), "study_id": f"s{i:03d}", "report": f"report {i}"})
    pd.DataFrame(rows).to_parquet(tmp / "t.parquet")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    common = ["--backbone", "tiny", "--batch-size", "8", "--num-workers", "2" if accel.is_cuda(device) else "0",
              "--precision", "fp32", "--no-progress"]
    t0 = time.perf_counter()
    two = subprocess.run(embed.torchrun_command(tmp / "t.parquet", tmp / "two", 2, [*common, "--device", device]),
                         env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    one = subprocess.run([sys.executable, "-m", "cxrlib.embed", "--table", str(tmp / "t.parquet"),
                          "--out-dir", str(tmp / "one"), *common,
                          "--device", "cuda:0" if accel.is_cuda(device) else device], env=env,
                         capture_output=True, text=True)
    if two.returncode or one.returncode:
        return {"ok": False, "error": (two.stderr or one.stderr)[-800:]}
    return {**compare_runs(tmp / "one", tmp / "two"), "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurement")
    ap.add_argument("--train-pairs", type=int, default=300_000)
    ap.add_argument("--val-pairs", type=int, default=5_000)
    ap.add_argument("--epochs", type=int, default=4, help="epochs run (the target's epochs are projected)")
    ap.add_argument("--target-epochs", type=int, default=50)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--gallery", type=int, default=300_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--adapt-images", type=int, default=1024)
    ap.add_argument("--adapt-epochs", type=int, default=2)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu_check", "gpu": None, "message": "no GPU: nothing checked"}))
        return 0
    t_all = time.perf_counter()
    summary: dict = {"benchmark": "gpu_check", **environment()}
    steps = [("embed", lambda: check_embed(not args.no_compile)),
             ("train", lambda: check_train(args.train_pairs, args.val_pairs, args.epochs, args.target_epochs)),
             ("train_compiled", lambda: check_train(args.train_pairs, args.val_pairs, args.epochs, args.target_epochs,
                                                    compile=True)),
             ("search", lambda: check_search(args.queries, args.gallery, args.k, 64))]
    with tempfile.TemporaryDirectory() as tmp:
        steps += [("adapt", lambda: check_adapt(Path(tmp), args.adapt_images, args.adapt_epochs)),
                  ("torchrun", lambda: check_torchrun(Path(tmp)))]
        for name, step in steps:
            t0 = time.perf_counter()
            try:
                summary[name] = step()
            except Exception as exc:  # noqa: BLE001 - one failed step is reported, the others still run
                summary[name] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
            # each step's result as it ends: a run stopped later still leaves the finished steps' figures
            print(f"gpu_check: {name} done in {time.perf_counter() - t0:.1f} s: {json.dumps(summary[name])}",
                  file=sys.stderr)
    emb, tr, se = summary["embed"], summary["train"], summary["search"]
    jpeg = emb.get("extractor", {}).get("jpeg_device_decode", {}).get("images_per_s")
    projected = tr.get(f"projected_{args.target_epochs}_epochs_s")
    projected_compiled = summary["train_compiled"].get(f"projected_{args.target_epochs}_epochs_s")
    summary["targets"] = {
        "extractor_png>=0.9*forward": (emb["extractor_png_fraction_of_forward"] >= TARGETS["png_fraction_of_forward"]
                                       if "extractor_png_fraction_of_forward" in emb else None),
        "jpeg_device_decode>=2000/s": jpeg >= TARGETS["jpeg_device_images_per_s"] if jpeg else None,
        "cosines>=0.995": (min(emb["low_precision_vs_fp32_min_cosine"], emb["device_vs_cpu_decode_min_cosine"]) >= 0.995
                           if "low_precision_vs_fp32_min_cosine" in emb else None),
        f"train_{args.train_pairs}x{args.target_epochs}<120s": projected < TARGETS["train_projected_s"] if projected else None,
        f"train_compiled_{args.train_pairs}x{args.target_epochs}<120s": (
            projected_compiled < TARGETS["train_projected_s"] if projected_compiled else None),
        f"search_{args.queries}x{args.gallery}<2s": se["seconds"] < TARGETS["search_s"] if "seconds" in se else None,
        # fp32 sums in another order: scores agree to rounding, indices but for near-ties
        "adapt_losses_finite": (all(summary["adapt"][p]["finite"] for p in ("bf16", "fp16"))
                                if "error" not in summary["adapt"] else None),
        "search_equals_cpu": (se["same_indices_as_cpu"] >= 0.99 and se["max_score_diff_vs_cpu"] < 1e-4
                              if "same_indices_as_cpu" in se else None),
    }
    summary["seconds"] = round(time.perf_counter() - t_all, 1)
    print(json.dumps(summary))
    return 0 if all(v is not False for v in summary["targets"].values()) and \
        not any("error" in v for v in summary.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
