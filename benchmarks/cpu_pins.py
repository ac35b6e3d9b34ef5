"""What the offline profile's CPU pins (cxrlib.determinism) cost and change: a few training steps per setting.

    .venv/bin/python benchmarks/cpu_pins.py [--model resnet10t] [--steps 5] [--repeats 2]

Each setting runs in a fresh process (the pins act when torch starts): the default (this CPU's widest
kernels, all threads), 1 thread, the pinned AVX2 kernels, the pinned set as make exports it, and 2
spinning vs sleeping OpenMP threads. Reports seconds and a hash of the trained weights: equal hashes mean
bit-identical results. Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from cxrlib import determinism

STEP = r"""
import hashlib, time, torch, timm
torch.manual_seed(0)
m = timm.create_model({model!r}, num_classes=16)
x, y = torch.randn(64, 3, 64, 64), torch.randint(0, 16, (64,))
opt = torch.optim.AdamW(m.parameters(), 1e-3)
t = time.perf_counter()
for _ in range({steps}):
    loss = torch.nn.functional.cross_entropy(m(x), y); opt.zero_grad(); loss.backward(); opt.step()
dt = time.perf_counter() - t
h = hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in m.parameters())).hexdigest()[:12]
print(dt, h, torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())
"""

SETTINGS = {
    "default": {},
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "AVX2 kernels, 1 thread": {**determinism.PINNED_ENV, "OMP_NUM_THREADS": "1"},
    "2 threads spinning": {"OMP_NUM_THREADS": "2"},
    "2 threads sleeping": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    "make demo pins": determinism.env(),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet10t")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    code = STEP.format(model=args.model, steps=args.steps)
    clean = {k: v for k, v in os.environ.items() if k not in determinism.env()}
    rows = []
    for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits every setting
        for name, extra in SETTINGS.items():
            out = subprocess.run([sys.executable, "-c", code], env={**clean, **extra}, capture_output=True,
                                 text=True, check=True).stdout.split()
            rows.append({"setting": name, "seconds": round(float(out[0]), 2), "weights_hash": out[1],
                         "cpu_capability": out[2], "threads": int(out[3])})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"benchmark": "cpu_pins", "model": args.model, "steps": args.steps,
                      "loadavg": os.getloadavg(), "runs": rows}))


if __name__ == "__main__":
    main()
