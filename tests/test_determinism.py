"""The offline profile's CPU pins: which profiles set them, and that a pinned run repeats bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cxrlib import determinism

CODE = r"""
import hashlib, torch
from cxrlib import determinism
enabled = determinism.enable_from_env()  # as the extractor and every node start
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(4))
x, y = torch.randn(16, 3, 12, 12), torch.randint(0, 4, (16,))
m(x)
opt = torch.optim.AdamW(m.parameters(), 1e-2)
for _ in range(3):
    loss = torch.nn.functional.cross_entropy(m(x), y); opt.zero_grad(); loss.backward(); opt.step()
from threadpoolctl import threadpool_info
d = determinism.describe()
blas = sorted({i.get("architecture") for i in threadpool_info() if i.get("internal_api") == "openblas"})
print(hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in m.parameters())).hexdigest(),
      torch.get_num_threads(), torch.backends.cpu.get_cpu_capability(), d["mkl_branch"],
      ",".join(d["numpy_simd"]) or "-", ",".join(blas) or "-", enabled, torch.are_deterministic_algorithms_enabled())
"""

#: numpy's dispatch targets at or below AVX2 (numpy 2.4's X86_V2 / X86_V3 groups and numpy 1.x's names)
NUMPY_UP_TO_AVX2 = {"X86_V2", "X86_V3", "SSE", "SSE2", "SSE3", "SSSE3", "SSE41", "SSE42", "POPCNT", "AVX", "F16C",
                    "FMA3", "AVX2", "FMA4", "XOP"}


def test_offline_profile_is_pinned_others_are_not():
    pins = determinism.profile_env("offline")
    assert pins["OMP_NUM_THREADS"] == str(determinism.THREADS) and pins["ATEN_CPU_CAPABILITY"] == "avx2"
    assert pins["MKL_CBWR"] == "COMPATIBLE" and pins["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    assert pins["NPY_DISABLE_CPU_FEATURES"] == determinism.NUMPY_ABOVE_AVX2
    assert determinism.profile_env("smoke") == {} and determinism.profile_env("paper") == {}


def test_the_dag_make_text_exports_the_pins_of_a_deterministic_profile(workdir):
    """make reads the pins from the DAG's make text (one ``export`` line each) and passes them to every node."""
    from cxrlib import dag

    def exported(profile: str) -> dict[str, str]:
        text = dag.make_text(dag.plan(profile, [], environ={}))
        return dict(ln.removeprefix("export ").split(" := ", 1) for ln in text.splitlines() if ln.startswith("export "))

    assert exported("offline") == determinism.env() and exported("smoke") == {}


@pytest.fixture(scope="module")
def pinned_runs() -> list[list[str]]:
    """:data:`CODE` twice, each in a fresh process under the pins make exports."""
    env = {**{k: v for k, v in os.environ.items() if k not in determinism.env()}, **determinism.env()}
    return [subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True)
            .stdout.split() for _ in range(2)]


def test_pinned_run_repeats_and_uses_the_pinned_kernels(pinned_runs):
    runs = pinned_runs
    assert runs[0] == runs[1]
    _, threads, aten, mkl, numpy_simd, openblas, *_ = runs[0]
    assert threads == str(determinism.THREADS) and aten in ("AVX2", "DEFAULT")  # DEFAULT: a CPU without AVX2
    # MKL honours MKL_CBWR=AVX2 on Intel CPUs only (AMD: its AUTO branch, which dispatches by CPU);
    # COMPATIBLE is the branch it runs alike everywhere, read back from MKL itself
    assert mkl == "COMPATIBLE"
    assert set(numpy_simd.split(",")) - {"-"} <= NUMPY_UP_TO_AVX2, numpy_simd
    if determinism.cpu_has("avx2", "fma"):
        assert openblas == "Haswell"


def test_numpy_cap_names_every_dispatch_target_above_avx2():
    """The synthetic radiographs call numpy's exp / cos, whose code numpy picks by CPU (an AVX-512 CPU and an
    AVX2 one rendered other pixels). Every target this numpy can dispatch to above AVX2 must be capped."""
    targets = determinism.numpy_dispatch_targets()
    capped = set(determinism.PINNED_ENV["NPY_DISABLE_CPU_FEATURES"].split(","))
    assert targets and set(targets) - NUMPY_UP_TO_AVX2 <= capped, targets
    assert " " not in determinism.PINNED_ENV["NPY_DISABLE_CPU_FEATURES"]  # make exports NAME=value words


def test_rendering_follows_numpys_dispatch_so_the_cap_matters():
    """The reason for the cap, shown on this CPU: one radiograph (found by trying a few) rendered with numpy's
    AVX2 code and with its baseline (SSE) code differs; under the pins every AVX2-or-better CPU runs the former."""
    if not determinism.cpu_has("avx2", "fma"):
        pytest.skip("a CPU without AVX2 has no second numpy code path to compare")
    code = ("import hashlib, numpy as np; from cxrlib.datasets.synthetic import render_radiograph; "
            "im = render_radiograph({'cardiomegaly', 'effusion'}, 'lateral', 256, 3); "
            "print(hashlib.sha1(np.asarray(im).tobytes()).hexdigest())")
    base = {k: v for k, v in os.environ.items() if k not in determinism.env()}
    got = {cap: subprocess.run([sys.executable, "-c", code], env={**base, "NPY_DISABLE_CPU_FEATURES": cap},
                               capture_output=True, text=True, check=True).stdout for cap in
           (determinism.PINNED_ENV["NPY_DISABLE_CPU_FEATURES"], "X86_V3,AVX2,FMA3")}
    assert len(set(got.values())) == 2, got


def test_describe_reports_the_pins(monkeypatch):
    # MKL reads MKL_CBWR once, when first used: reading its branch here first keeps the pins set below from
    # becoming this worker's branch (which changed the last bit of later tests' matmuls in this process)
    import torch  # noqa: F401  (mkl_branch reads torch's MKL)

    branch = determinism.mkl_branch()
    for k, v in determinism.env().items():
        monkeypatch.setenv(k, v)
    assert determinism.describe()["pinned"] is True
    monkeypatch.delenv("MKL_CBWR")
    assert determinism.describe()["pinned"] is False
    assert determinism.mkl_branch() == branch


SETUP = r"""
import json, os, sys
from cxrlib import interactive
ns = {"profile": sys.argv[1]}
interactive.setup(sys.argv[2], ns)
before = "torch" in sys.modules
import torch
print(json.dumps({"torch_before": before, "deterministic": torch.are_deterministic_algorithms_enabled(),
                  "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
                  "threads": torch.get_num_threads(), "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}))
"""


def _setup_in_fresh_process(profile: str, node: str, make: bool, tmp_path) -> dict:
    import json

    env = {k: v for k, v in os.environ.items()
           if k not in determinism.env() and k not in ("CXR_MAKE_NODE", "CXR_PROFILE", "OMP_NUM_THREADS")}
    env.update(CXR_WORKDIR=str(tmp_path), OMP_NUM_THREADS="1", **({"CXR_MAKE_NODE": node} if make else {}))
    out = subprocess.run([sys.executable, "-c", SETUP, profile, node], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_node_setup_switches_on_deterministic_algorithms_for_the_offline_profile(tmp_path):
    """Every notebook's setup (under make and by hand): the offline profile gets deterministic algorithms,
    strict, with its thread count and cuBLAS's workspace setting, once torch is imported (setup itself
    imports no torch: a node without torch pays nothing); other profiles are left as torch starts."""
    for make in (True, False):
        got = _setup_in_fresh_process("offline", "02_train", make, tmp_path)
        assert got["torch_before"] is False
        assert got["deterministic"] is True and got["warn_only"] is determinism.WARN_ONLY is False
        assert got["threads"] == determinism.THREADS and got["cublas"] == determinism.PINNED_ENV["CUBLAS_WORKSPACE_CONFIG"]
    got = _setup_in_fresh_process("smoke", "02_train", True, tmp_path)
    assert got["deterministic"] is False and got["threads"] == 1


def test_extractor_applies_the_flag_make_exports(pinned_runs):
    """Under make's pins (the runs above) ``enable_from_env`` switches deterministic algorithms on; without them
    it leaves torch as it starts."""
    assert pinned_runs[0][-2:] == ["True", "True"]
    code = "from cxrlib import determinism; import torch; r = determinism.enable_from_env(); " \
           "print(r, torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())"
    base = {k: v for k, v in os.environ.items() if k not in determinism.env()}
    off = subprocess.run([sys.executable, "-c", code], env={**base, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, check=True).stdout.split()
    assert off == ["False", "False", "1"]


def test_torch_public_switch_still_does_only_what_apply_does():
    """:func:`determinism.use_deterministic_algorithms` replays torch's function without its inductor import:
    that holds only while torch's function sets inductor's config and the ATen flag and nothing else."""
    import ast
    import inspect
    import textwrap

    import torch

    fn = ast.parse(textwrap.dedent(inspect.getsource(torch.use_deterministic_algorithms))).body[0]
    body = [ast.unparse(n) for n in fn.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    assert body == ["import torch._inductor.config as inductor_config", "inductor_config.deterministic = mode",
                    "_C._set_deterministic_algorithms(mode, warn_only=warn_only)"], body


_SWITCH = """
import sys, torch
from cxrlib import determinism
assert not torch.are_deterministic_algorithms_enabled()
for warn_only in (False, True):
    determinism.use_deterministic_algorithms(torch, warn_only=warn_only)
    print(torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
          "torch._inductor" in sys.modules)
import torch._inductor.config as cfg
print(cfg.deterministic)
"""


def test_switch_sets_the_flag_now_and_inductor_config_on_import():
    """Strict, then warn-only, in one process (each call sets both flags anew); inductor's config, imported
    after them, has the deterministic switch on."""
    out = subprocess.run([sys.executable, "-c", _SWITCH], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False", "False", "True", "True", "False", "True"], out.stdout


def test_make_passes_the_pins_to_every_recipe_of_a_deterministic_profile(tmp_path):
    """What a node's recipe sees under ``make dag`` (a ``+`` recipe runs even under ``make -n``)."""
    from conftest import run_make

    names = sorted(determinism.env())
    probe = "probe: ; +@" + "; ".join(f'echo "{n}=$${{{n}:-unset}}"' for n in names)

    def seen(profile: str) -> dict[str, str]:
        out = run_make(["-n", "dag", "probe", f"PROFILE={profile}", f"--eval={probe}"], tmp_path / profile).stdout
        return dict(ln.split("=", 1) for ln in out.splitlines() if ln.split("=", 1)[0] in names)

    assert seen("offline") == determinism.env()
    assert set(seen("smoke").values()) <= {"unset"} | {os.environ.get(n) for n in names}
