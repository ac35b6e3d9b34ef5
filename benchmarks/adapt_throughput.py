"""Throughput of backbone adaptation (notebook 00): data pipeline, train step, report encoding.

    .venv/bin/python benchmarks/adapt_throughput.py [--backbone offline] [--batch-sizes 32 64] [--source-size 512]

Measures, on this machine: images/s of the streamed pipeline (PNG decode + radiograph augmentation)
for several DataLoader worker counts; images/s of one optimisation step (forward + backward + AdamW
of the image tower, locked text) in fp32 and bf16 autocast; reports/s of the locked-text cache.
Use the figures to pick epochs / batch size / precision for a time budget. Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

from cxrlib import adapt as A  # noqa: E402
from cxrlib.backbones import load_backbone  # noqa: E402
from cxrlib.losses import MultiTaskLoss  # noqa: E402


def _images(folder: Path, n: int, size: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 60, (size, size), dtype=np.uint8))
        d = ImageDraw.Draw(img)
        d.ellipse([size * 0.15, size * 0.2, size * 0.45, size * 0.85], fill=int(rng.integers(90, 140)))
        d.ellipse([size * 0.55, size * 0.2, size * 0.85, size * 0.85], fill=int(rng.integers(90, 140)))
        path = folder / f"b{i}.png"
        img.filter(ImageFilter.GaussianBlur(3)).save(path)
        out.append(str(path))
    return out


def pipeline_rate(paths: list[str], tf, batch_size: int, workers: int) -> float:
    ds = A.ImageReportDataset(paths, tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers,
                                         collate_fn=A.collate_skipping, shuffle=True)
    t0, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["index"])
    return n / (time.perf_counter() - t0)


def step_rate(backbone, batch_size: int, precision: str, steps: int, size: int) -> float:
    model = backbone.model
    A.set_trainable(model, lock_text=True)
    net = A.AdaptModel(model, backbone.embed_dim, text_is_features=True).train()
    loss_fn = MultiTaskLoss({"bce": 0, "supcon": 0, "clip": 1})
    opt = torch.optim.AdamW(A.param_groups(net, 0.05), lr=1e-4)
    x = torch.randn(batch_size, 3, size, size)
    txt = torch.nn.functional.normalize(torch.randn(batch_size, backbone.embed_dim), dim=-1)
    labels = torch.randint(0, 2, (batch_size,))

    def one():
        with A._autocast("cpu", precision):
            out = net(x, txt)
        loss = loss_fn(out, labels)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    one()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    return steps * batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="offline")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--source-size", type=int, default=512, help="side of the generated PNGs")
    ap.add_argument("--n-images", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    torch.manual_seed(0)
    bk = load_backbone(args.backbone)
    icfg = A.image_config(bk.model, bk.preprocess)
    tf = A.train_transform(icfg["size"], icfg["mean"], icfg["std"])
    out = {"backbone": args.backbone, "image_size": icfg["size"], "source_size": args.source_size,
           "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        paths = _images(Path(tmp), args.n_images, args.source_size)
        for w in args.workers:
            out[f"pipeline_img_per_s_workers{w}"] = round(pipeline_rate(paths, tf, 32, w), 1)
    for bs in args.batch_sizes:
        for precision in ("fp32", "bf16"):
            out[f"step_img_per_s_bs{bs}_{precision}"] = round(step_rate(bk, bs, precision, args.steps, icfg["size"]), 1)
    reports = [f"heart size normal, lungs clear, case {i}. no effusion or pneumothorax." for i in range(256)]
    t0 = time.perf_counter()
    A.encode_texts(bk.model, bk.tokenizer, reports, 64, "cpu", progress=False)
    out["text_reports_per_s"] = round(len(reports) / (time.perf_counter() - t0), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
