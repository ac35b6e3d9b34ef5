"""Image-embedding throughput of cxrlib's extractor on the BiomedCLIP architecture (random weights).

Compares, on the same images and this machine:
  naive      open_clip model + preprocess, fp32, one image at a time (PIL open -> preprocess -> encode)
  forward    the model's pure forward pass on ready tensors, batched, at the extractor's precision
  extractor  cxrlib.embed.extract_embeddings (DataLoader workers, inference mode, autocast, shards, merge)
and reports peak memory and the cosine between bf16-autocast and fp32 embeddings, plus the fp32 vs
bf16 forward speed that decides ``precision="auto"``. Targets: extractor >= 4x naive, >= 90% of
forward, cosine >= 0.995. Images: the real radiographs in ../shared/data/covid-cxr-sample when
present, else synthetic 1024 px PNGs. The last line is one JSON object.

    python benchmarks/embed_throughput.py [--n-images 64] [--batch-size 32] [--num-workers 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from cxrlib import backbones, embed, paths  # noqa: E402
from cxrlib.embstore import load_embeddings  # noqa: E402


def biomedclip_random(device: str) -> backbones.Backbone:
    """BiomedCLIP's released architecture (ViT-B/16 + BERT-base) with seeded random weights, offline."""
    cfg = backbones.read_open_clip_config(backbones.models_config_dir() / "biomedclip")
    fixture = backbones.models_config_dir() / "biomedbert-fixture"
    for key in ("hf_model_name", "hf_tokenizer_name"):
        cfg["model_cfg"]["text_cfg"][key] = str(fixture)
    return backbones.backbone_from_config("biomedclip-random", cfg, device=device)


def image_paths(n: int, tmp: Path) -> tuple[list[Path], str]:
    real = paths.shared_data_dir() / "covid-cxr-sample" / "images"
    files = sorted(real.glob("*.png")) if real.is_dir() else []
    if files:
        return [files[i % len(files)] for i in range(n)], f"covid-cxr-sample ({len(files)} real radiographs, <= 512 px)"
    rng = np.random.default_rng(0)
    base = np.linspace(0, 200, 1024)[None, :] + np.linspace(0, 50, 1024)[:, None]
    out = []
    for i in range(n):
        p = tmp / f"synth{i:04d}.png"
        Image.fromarray((base + rng.normal(0, 10, base.shape)).clip(0, 255).astype(np.uint8)).save(p)
        out.append(p)
    return out, "synthetic 1024 px PNGs"


def naive_loop(bb: backbones.Backbone, files: list[Path]) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    out = []
    with torch.no_grad():
        for p in files:
            x = bb.preprocess(Image.open(p).convert("RGB")).unsqueeze(0)
            f = bb.model.encode_image(x)
            out.append((f / f.norm(dim=-1, keepdim=True))[0].numpy())
    return len(files) / (time.perf_counter() - t0), np.stack(out)


def forward_only(bb: backbones.Backbone, x: torch.Tensor, batch_size: int, precision: str, device: str) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    out = []
    with torch.inference_mode(), embed.autocast(device, precision):
        for i in range(0, len(x), batch_size):
            out.append(F.normalize(bb.model.encode_image(x[i:i + batch_size].to(device)).float(), dim=-1).cpu())
    return len(x) / (time.perf_counter() - t0), torch.cat(out).numpy()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-images", type=int, default=64)
    ap.add_argument("--n-naive", type=int, default=12, help="images for the (slow) naive loop")
    ap.add_argument("--n-cosine", type=int, default=4, help="images for bf16-vs-fp32 (bf16 is slow without AMX)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    device = embed.resolve_device(args.device)
    precision = embed.resolve_precision(args.precision, device)
    bb = biomedclip_random(device)
    print(f"device {device}, {torch.get_num_threads()} threads, precision {args.precision} -> {precision}, "
          f"native bf16: {embed.cpu_has_native_bf16()}", file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        files, source = image_paths(args.n_images, tmp)
        x = torch.stack([bb.preprocess(Image.open(p).convert("RGB")) for p in files])
        forward_only(bb, x[:args.batch_size], args.batch_size, precision, device)  # warm-up

        naive_ips, naive_emb = naive_loop(bb, files[:args.n_naive])
        print(f"naive      {naive_ips:8.2f} images/s ({args.n_naive} images)", file=sys.stderr)
        fwd_ips, fwd_emb = forward_only(bb, x, args.batch_size, precision, device)
        print(f"forward    {fwd_ips:8.2f} images/s ({precision}, batch {args.batch_size})", file=sys.stderr)

        table = pd.DataFrame({"image_id": [f"im{i:04d}" for i in range(len(files))], "image_path": list(map(str, files)),
                              "study_id": [f"s{i:04d}" for i in range(len(files))], "report": "x"})
        t0 = time.perf_counter()
        res = embed.extract_embeddings(table, bb, tmp / "emb", modalities=["image"], batch_size=args.batch_size,
                                       num_workers=args.num_workers, precision=precision, device=device,
                                       progress=False)
        ext_ips = len(files) / (time.perf_counter() - t0)
        print(f"extractor  {ext_ips:8.2f} images/s ({args.num_workers} workers)", file=sys.stderr)
        ext = load_embeddings(res["image"])
        agree = float(np.min(np.sum(ext.emb[:args.n_naive] * naive_emb, axis=1)))

        # the precision decision: fp32 vs bf16 autocast on the forward pass, and how close bf16 stays
        xc = x[:args.n_cosine]
        fp32_ips, fp32_emb = forward_only(bb, xc, args.batch_size, "fp32", device)
        low = "bf16" if not device.startswith("cuda") or torch.cuda.is_bf16_supported() else "fp16"
        low_ips, low_emb = forward_only(bb, xc, args.batch_size, low, device)
        cosine = float(np.min(np.sum(fp32_emb * low_emb, axis=1)))
        print(f"fp32 {fp32_ips:.2f} vs {low} {low_ips:.2f} images/s on {len(xc)} images; min cosine {cosine:.5f}",
              file=sys.stderr)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if device.startswith("cuda"):
        peak_gpu = torch.cuda.max_memory_allocated() / 2**20
    result = {
        "benchmark": "embed_throughput", "model": "BiomedCLIP architecture, random weights", "images": source,
        "n_images": len(files), "device": device, "threads": torch.get_num_threads(),
        "cpu_native_bf16": embed.cpu_has_native_bf16(), "precision": precision, "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "naive_images_per_s": round(naive_ips, 3), "forward_images_per_s": round(fwd_ips, 3),
        "extractor_images_per_s": round(ext_ips, 3),
        "speedup_vs_naive": round(ext_ips / naive_ips, 2), "fraction_of_forward": round(ext_ips / fwd_ips, 3),
        "extractor_vs_naive_min_cosine": round(agree, 6),
        "fp32_forward_images_per_s": round(fp32_ips, 3), f"{low}_forward_images_per_s": round(low_ips, 3),
        f"{low}_vs_fp32_min_cosine": round(cosine, 6),
        "peak_rss_mb": round(peak, 1), "peak_worker_rss_mb": round(peak_children, 1),
        **({"peak_gpu_mb": round(peak_gpu, 1)} if device.startswith("cuda") else {}),
        "targets": {"speedup_vs_naive>=4": ext_ips / naive_ips >= 4, "fraction_of_forward>=0.9": ext_ips / fwd_ips >= 0.9,
                    "cosine>=0.995": cosine >= 0.995},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
