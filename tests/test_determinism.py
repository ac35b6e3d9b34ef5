"""The offline profile's CPU pins: which profiles set them, and that a pinned run repeats bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys

from cxrlib import determinism

CODE = r"""
import hashlib, torch
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(4))
x, y = torch.randn(16, 3, 12, 12), torch.randint(0, 4, (16,))
m(x)
opt = torch.optim.AdamW(m.parameters(), 1e-2)
for _ in range(3):
    loss = torch.nn.functional.cross_entropy(m(x), y); opt.zero_grad(); loss.backward(); opt.step()
print(hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in m.parameters())).hexdigest(),
      torch.get_num_threads(), torch.backends.cpu.get_cpu_capability())
"""


def test_offline_profile_is_pinned_others_are_not():
    pins = determinism.profile_env("offline")
    assert pins["OMP_NUM_THREADS"] == str(determinism.THREADS) and pins["ATEN_CPU_CAPABILITY"] == "avx2"
    assert pins["MKL_CBWR"] and pins["ONEDNN_MAX_CPU_ISA"]
    assert determinism.profile_env("smoke") == {} and determinism.profile_env("paper") == {}


def test_cli_prints_one_line_of_assignments(capsys):
    assert determinism.main(["env", "--profile", "offline"]) == 0
    out = capsys.readouterr().out.strip()
    assert "\n" not in out and dict(kv.split("=", 1) for kv in out.split()) == determinism.env()


def test_pinned_run_repeats_and_uses_the_pinned_kernels():
    env = {**{k: v for k, v in os.environ.items() if k not in determinism.env()}, **determinism.env()}
    runs = [subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True)
            .stdout.split() for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0][1] == str(determinism.THREADS) and runs[0][2] in ("AVX2", "DEFAULT")  # DEFAULT: a CPU without AVX2


def test_describe_reports_the_pins(monkeypatch):
    for k, v in determinism.env().items():
        monkeypatch.setenv(k, v)
    assert determinism.describe()["pinned"] is True
    monkeypatch.delenv("MKL_CBWR")
    assert determinism.describe()["pinned"] is False
