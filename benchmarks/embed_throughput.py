"""Image-embedding throughput of cxrlib's extractor on the BiomedCLIP architecture (random weights).

Images made here, so the figures compare across machines: full-resolution MIMIC-like grey JPEGs
(default 2544 x 3056 px, the size of a MIMIC-CXR-JPG PA view; the JSON gives their bytes) and 512 px Open-I-like PNGs.
Measured on this machine, on ``--device`` (``cuda`` on a GPU; on CPU the JSON says so):

  naive            open_clip model + preprocess, fp32, one image at a time (PIL open -> preprocess -> encode)
  forward          the pure forward pass on ready tensors on the device, batched, at the chosen precision
  extractor_png    cxrlib.embed.extract_embeddings on the PNGs (CPU workers decode; on CUDA the resize and
                   normalisation run on the GPU)
  extractor_jpeg_cpu_decode / extractor_jpeg_device_decode   the JPEGs, decoded by CPU workers vs by
                   ``torchvision.io.decode_jpeg`` on the device (batched, resize + normalise there)
  compile          (``--compile``) the device-decode extractor with ``torch.compile``: a first run
                   (compiling included) and a second one

plus peak GPU memory per stage, the cosine of the low-precision forward vs fp32, and of device vs CPU
decoding. Targets (one recent data-centre GPU): extractor_png >= 90% of forward, >= 2,000 images/s
on full-resolution JPEGs with device decode, cosines >= 0.995. The last line is one JSON object.

    python benchmarks/embed_throughput.py --device cuda        # GPU defaults: 2,048 images per set
    python benchmarks/embed_throughput.py                      # CPU: a few images, says so
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a plain checkout: cxrlib without installing

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from cxrlib import accel, backbones, embed  # noqa: E402
from cxrlib.embstore import load_embeddings  # noqa: E402

#: per-device defaults: images per set, naive-loop images, batch size, workers
#: (n_jpeg_cpu None: one batch per worker, so that every worker decodes: a worker assembles a whole batch)
DEFAULTS = {"cuda": {"n_png": 16384, "n_jpeg": 4096, "n_jpeg_cpu": None, "n_naive": 64, "batch_size": "auto",
                     "num_workers": "auto"},
            "cpu": {"n_png": 32, "n_jpeg": 8, "n_jpeg_cpu": 8, "n_naive": 8, "batch_size": 32, "num_workers": 1}}
MIMIC_HW = (3056, 2544)  # height x width of a typical MIMIC-CXR-JPG PA view
UNIQUE_IMAGES = 16  # distinct drawings, one file each; the image lists repeat them (decode cost is the same per read)


def biomedclip_random(device: str) -> backbones.Backbone:
    """BiomedCLIP's released architecture (ViT-B/16 + BERT-base) with seeded random weights, offline."""
    cfg = backbones.read_open_clip_config(backbones.models_config_dir() / "biomedclip")
    fixture = backbones.models_config_dir() / "biomedbert-fixture"
    for key in ("hf_model_name", "hf_tokenizer_name"):
        cfg["model_cfg"]["text_cfg"][key] = str(fixture)
    return backbones.backbone_from_config("biomedclip-random", cfg, device=device)


def radiograph_like(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A grey image with a radiograph's broad structure (bright mediastinum, dark lungs) and film noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / h, xx / w
    img = 60 + 100 * np.exp(-((xx - 0.5) / 0.12) ** 2) + 70 * yy
    for cx in (0.3, 0.7):  # lungs
        img -= 45 * np.exp(-(((xx - cx) / 0.15) ** 2 + ((yy - 0.45) / 0.25) ** 2))
    img += rng.normal(0, 3, (h, w)).astype(np.float32)
    return img.clip(0, 255).astype(np.uint8)


def make_images(folder: Path, n: int, kind: str, seed: int = 0) -> list[Path]:
    """``n`` paths of ``kind`` ``jpeg`` (MIMIC-like full resolution) or ``png`` (512 px, Open-I-like), over
    :data:`UNIQUE_IMAGES` files (the page cache holds them, as it held fresh copies: decoding is what is timed)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    hw = MIMIC_HW if kind == "jpeg" else (512, 512)
    blobs = []
    for _ in range(min(n, UNIQUE_IMAGES)):
        h, w = int(hw[0] * rng.uniform(0.9, 1.0)), int(hw[1] * rng.uniform(0.9, 1.0))
        im = Image.fromarray(radiograph_like(h, w, rng))
        tmp = folder / "draw.tmp"
        if kind == "jpeg":
            im.save(tmp, "JPEG", quality=95)
        else:
            im.save(tmp, "PNG")
        blobs.append(tmp.read_bytes())
    files = []
    for i, blob in enumerate(blobs):
        p = folder / f"img{i:05d}.{'jpg' if kind == 'jpeg' else 'png'}"
        p.write_bytes(blob)
        files.append(p)
    (folder / "draw.tmp").unlink(missing_ok=True)
    return [files[i % len(files)] for i in range(n)]


def decoder_only(files: list[Path], device: str, n: int = 64, repeats: int = 3) -> dict:
    """Images/s of the JPEG decoder alone on ``n`` files: torchvision's batched ``decode_jpeg`` on the device
    (bytes already in memory), and PIL on one CPU core: the ceilings the two extractor paths meet."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in files[:n]]
    out: dict = {"images": len(data)}
    if accel.is_cuda(device):
        decode_jpeg(data[:4], mode=ImageReadMode.GRAY, device=device)  # warm-up (decoder handle)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            decode_jpeg(data, mode=ImageReadMode.GRAY, device=device)
        sync(device)
        out["device_images_per_s"] = round(repeats * len(data) / (time.perf_counter() - t0), 1)
    m = min(len(data), 8)
    t0 = time.perf_counter()
    for p in files[:m]:
        Image.open(p).convert("L")  # convert decodes
    out["cpu_one_core_images_per_s"] = round(m / (time.perf_counter() - t0), 1)
    return out


def sync(device: str) -> None:
    if accel.is_cuda(device):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if accel.is_cuda(device):
        torch.cuda.reset_peak_memory_stats()


def peak_mb(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if accel.is_cuda(device) else None


def naive_loop(bb: backbones.Backbone, files: list[Path], device: str) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for p in files:
            x = bb.preprocess(Image.open(p).convert("RGB")).unsqueeze(0).to(device)
            bb.model.encode_image(x).cpu()
    sync(device)
    return len(files) / (time.perf_counter() - t0)


def forward(bb: backbones.Backbone, x: torch.Tensor, batch_size: int, precision: str, device: str,
            repeats: int = 1) -> tuple[float, torch.Tensor]:
    """images/s of the forward on tensors already on the device; embeddings of the first pass."""
    out = []
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode(), embed.autocast(device, precision):
        for r in range(repeats):
            for i in range(0, len(x), batch_size):
                f = bb.model.encode_image(x[i:i + batch_size])
                if r == 0:
                    out.append(F.normalize(f.float(), dim=-1))
    sync(device)
    return repeats * len(x) / (time.perf_counter() - t0), torch.cat(out).cpu()


def extract(bb, files: list[Path], out: Path, device: str, precision: str, batch_size, num_workers,
            decode: str, compile: bool = False) -> dict:
    table = pd.DataFrame({"image_id": [f"im{i:05d}" for i in range(len(files))], "image_path": list(map(str, files)),
                          "study_id": [f"s{i:05d}" for i in range(len(files))], "report": "x"})
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    res = embed.extract_embeddings(table, bb, out, modalities=["image"], batch_size=batch_size,
                                   num_workers=num_workers, precision=precision, device=device, progress=False,
                                   decode=decode, compile=compile)
    sync(device)
    seconds = time.perf_counter() - t0
    stamp = json.loads(res.stamp.read_text())
    return {"images_per_s": round(len(files) / seconds, 2), "seconds": round(seconds, 2), "decode": stamp["decode"],
            "batch_size_used": stamp["batch_size_used"]["image"], "oom_backoffs": stamp["oom_backoffs"]["image"],
            "skipped": len(res.skipped["image"]), "peak_gpu_mb": peak_mb(device), "emb": load_embeddings(res["image"]).emb}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--n-png", type=int)
    ap.add_argument("--n-jpeg", type=int)
    ap.add_argument("--n-jpeg-cpu", type=int, help="JPEGs of the CPU-decode run (default: one batch per worker)")
    ap.add_argument("--n-naive", type=int)
    ap.add_argument("--batch-size", type=embed._int_or_auto)
    ap.add_argument("--num-workers", type=embed._int_or_auto)
    ap.add_argument("--compile", action="store_true", help="also measure the extractor under torch.compile")
    ap.add_argument("--workdir", default=None, help="folder for the images (default: a temporary one)")
    args = ap.parse_args(argv)
    device = accel.require_device(embed.resolve_device(args.device))
    d = DEFAULTS["cuda" if accel.is_cuda(device) else "cpu"]
    n_png, n_jpeg, n_naive = (args.n_png or d["n_png"]), (args.n_jpeg or d["n_jpeg"]), (args.n_naive or d["n_naive"])
    batch_size = args.batch_size or d["batch_size"]
    num_workers = args.num_workers if args.num_workers is not None else d["num_workers"]
    precision = embed.resolve_precision(args.precision, device)
    if not accel.is_cuda(device):
        print("no GPU: measuring on CPU (device decode = torchvision decode_jpeg on CPU); GPU figures need a GPU",
              file=sys.stderr)
    bb = biomedclip_random(device)
    print(f"device {device} ({torch.cuda.get_device_name() if accel.is_cuda(device) else 'cpu'}), "
          f"{accel.available_cores()} cores, precision {args.precision} -> {precision}", file=sys.stderr)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp_str:
        tmp = Path(tmp_str)
        t0 = time.perf_counter()
        pngs, jpgs = make_images(tmp / "png", n_png, "png"), make_images(tmp / "jpg", n_jpeg, "jpeg", seed=1)
        mb_per_jpeg = float(np.mean([p.stat().st_size for p in jpgs[:UNIQUE_IMAGES]])) / 2**20
        print(f"made {n_png} PNGs and {n_jpeg} JPEGs ({mb_per_jpeg:.2f} MB each) in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)

        naive_ips = naive_loop(bb, pngs[:n_naive], device)
        print(f"naive        {naive_ips:9.1f} images/s", file=sys.stderr)

        dec = decoder_only(jpgs, device)
        print(f"decoder only {dec}", file=sys.stderr)

        x = torch.stack([bb.preprocess(Image.open(p).convert("RGB")) for p in pngs[:min(n_png, UNIQUE_IMAGES)]])
        x = x.repeat(-(-n_png // len(x)), 1, 1, 1)[:n_png].to(device)
        fwd_batch = embed.resolve_batch_size(batch_size, "image", bb, device, precision)
        forward(bb, x[:fwd_batch], fwd_batch, precision, device)  # warm-up (kernels, autotuning)
        reset_peak(device)
        fwd_ips, low = forward(bb, x, fwd_batch, precision, device, repeats=1 if not accel.is_cuda(device) else 3)
        fwd_peak = peak_mb(device)
        n_cos = min(len(x), 64)
        _, ref = forward(bb, x[:n_cos], fwd_batch, "fp32", device)
        cos_fp32 = float(torch.sum(ref * low[:n_cos], dim=1).min())
        print(f"forward      {fwd_ips:9.1f} images/s ({precision}, batch {fwd_batch}); min cosine vs fp32 {cos_fp32:.5f}",
              file=sys.stderr)
        del x

        ext = {}
        # png: what users get (on CUDA: decoded by CPU workers, resized on the GPU)
        workers = accel.loader_settings(device, num_workers)["num_workers"]
        n_cpu = args.n_jpeg_cpu or d["n_jpeg_cpu"] or max(1, workers) * fwd_batch
        uniq = jpgs[:min(n_jpeg, UNIQUE_IMAGES)]
        jpgs_cpu = [uniq[i % len(uniq)] for i in range(n_cpu)]  # the same files, in the same order
        runs = [("png", pngs, "auto", False), ("jpeg_cpu_decode", jpgs_cpu, "cpu", False),
                ("jpeg_device_decode", jpgs, "device", False)]
        if args.compile:  # the first run includes compiling; the second reuses the compiled graphs
            runs += [("jpeg_device_decode_compile_first", jpgs, "device", True),
                     ("jpeg_device_decode_compile_warm", jpgs, "device", True)]
        for name, files, decode, comp in runs:
            try:
                ext[name] = extract(bb, files, tmp / f"emb-{name}", device, precision, batch_size, num_workers,
                                    decode, comp)
            except Exception as exc:  # noqa: BLE001 - torch.compile failing here is a finding, not the end
                if not comp:
                    raise
                ext[name] = {"error": f"{type(exc).__name__}: {exc}"[:500], "images_per_s": None,
                             "batch_size_used": None, "decode": decode, "emb": None}
            e = ext[name]
            print(f"extractor {name:28s} " + (f"failed: {e['error']}" if "error" in e else
                  f"{e['images_per_s']:9.1f} images/s (batch {e['batch_size_used']}, decode {e['decode']})"),
                  file=sys.stderr)
        m = min(n_cpu, n_jpeg)  # both lists start with the same files in the same order
        cos_decode = float(np.min(np.sum(ext["jpeg_cpu_decode"]["emb"][:m] * ext["jpeg_device_decode"]["emb"][:m],
                                         axis=1)))
        for v in ext.values():
            v.pop("emb")
    gpu = accel.is_cuda(device)
    frac = ext["png"]["images_per_s"] / fwd_ips
    result = {
        "benchmark": "embed_throughput", "model": "BiomedCLIP architecture, random weights",
        "gpu": torch.cuda.get_device_name() if gpu else None,
        "note": None if gpu else "no GPU: CPU figures; the GPU targets are not measured here",
        "device": device, "cores": accel.available_cores(), "precision": precision,
        "torch": torch.__version__, "images": {"png": f"{n_png} x 512 px PNG (Open-I-like, synthetic)",
                                               "jpeg": f"{n_jpeg} x ~{MIMIC_HW[1]}x{MIMIC_HW[0]} px grey JPEG "
                                                       f"(MIMIC-like, synthetic), {mb_per_jpeg:.2f} MB each",
                                               "jpeg_cpu_decode": f"{n_cpu} of those JPEGs",
                                               "files": f"{UNIQUE_IMAGES} distinct files per kind, listed repeatedly"},
        "decoder_only": dec,
        "batch_size": batch_size, "forward_batch_size": fwd_batch, "num_workers": num_workers,
        "naive_images_per_s": round(naive_ips, 2), "forward_images_per_s": round(fwd_ips, 2),
        "forward_peak_gpu_mb": fwd_peak, "extractor": ext,
        "extractor_png_fraction_of_forward": round(frac, 3),
        "low_precision_vs_fp32_min_cosine": round(cos_fp32, 6),
        "device_vs_cpu_decode_min_cosine": round(cos_decode, 6),
        "seconds": round(time.perf_counter() - t_all, 1),
        "targets": {"extractor_png>=0.9*forward": frac >= 0.9,
                    "jpeg_device_decode>=2000/s": ext["jpeg_device_decode"]["images_per_s"] >= 2000 if gpu else None,
                    "cosine_vs_fp32>=0.995": cos_fp32 >= 0.995, "device_vs_cpu_decode_cosine>=0.995": cos_decode >= 0.995},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
