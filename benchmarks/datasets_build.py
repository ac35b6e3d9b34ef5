"""Data-prep speed: NLM report parsing, study-table assembly, image verification, local download rate.

Run: ``.venv/bin/python benchmarks/datasets_build.py [--images 300] [--size 512]``. Uses only the
torchxrayvision copy of the NLM reports and files it generates in a temp folder; prints one JSON
object on its last line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

from cxrlib.datasets.download import fetch
from cxrlib.datasets.openi import (
    _label_studies,
    infer_nlm_views,
    nlm_candidates,
    read_nlm_reports,
    torchxrayvision_data,
)
from cxrlib.datasets.table import SkipLog, assemble
from cxrlib.images import verify_image


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=300, help="images to write and verify")
    ap.add_argument("--size", type=int, default=512, help="side of the verified PNGs")
    ap.add_argument("--download-mb", type=int, default=64)
    args = ap.parse_args()
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        skips = SkipLog()
        reports = read_nlm_reports(torchxrayvision_data("NLMCXR_reports.tgz"), skips)
        out["nlm_reports"] = len(reports)
        out["nlm_parse_s"] = round(time.perf_counter() - t, 3)

        t = time.perf_counter()
        views = infer_nlm_views([i for ids in reports["image_ids"] for i in ids])
        studies, images = nlm_candidates(reports, tmp, views)
        table = assemble(_label_studies(studies, "skip"), images, skips, source="bench", verify_images=False)
        out["table_rows"] = len(table)
        out["assemble_s"] = round(time.perf_counter() - t, 3)

        rng = np.random.default_rng(0)
        paths = []
        for k in range(args.images):
            p = tmp / f"img{k}.png"
            Image.fromarray(rng.integers(0, 256, (args.size, args.size), dtype=np.uint8)).save(p)
            paths.append(p)
        t = time.perf_counter()
        bad = sum(verify_image(p) is not None for p in paths)
        dt = time.perf_counter() - t
        out["verify_images_per_s"] = round(args.images / dt, 1)
        out["verify_image_size"] = args.size
        assert bad == 0

        blob = tmp / "srv" / "blob.bin"
        blob.parent.mkdir()
        blob.write_bytes(rng.integers(0, 256, args.download_mb << 20, dtype=np.uint8).tobytes())
        handler = partial(SimpleHTTPRequestHandler, directory=str(blob.parent))
        handler.log_message = lambda *a: None
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        try:
            t = time.perf_counter()
            fetch(f"http://127.0.0.1:{httpd.server_address[1]}/blob.bin", tmp / "dl.bin")
            out["local_download_mb_per_s"] = round(args.download_mb / (time.perf_counter() - t), 1)
        finally:
            httpd.shutdown()
            httpd.server_close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
