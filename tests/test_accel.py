"""GPU decision logic with CUDA availability faked: device checks, builds, precision, loaders, OOM back-off."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from cxrlib import accel, embed, runtime


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA 12.4 torch that sees one GPU (bf16-capable unless a test says otherwise)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torchvision.version, "cuda", 12040, raising=False)
    return monkeypatch


def test_cuda_without_cuda_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(accel.DeviceError) as err:
        accel.require_device("cuda")
    msg = str(err.value)
    assert "\n" not in msg and "DEVICE=cuda" in msg and "CPU-only" in msg and "DEVICE=cpu" in msg
    monkeypatch.setattr(torch.version, "cuda", "12.4")  # a CUDA build on a machine without a GPU
    with pytest.raises(accel.DeviceError, match="no GPU or driver"):
        accel.require_device("cuda:0")
    assert accel.require_device("auto") == "cpu"
    assert accel.require_device("cpu") == "cpu"
    with pytest.raises(accel.DeviceError, match="unknown device"):
        accel.require_device("tpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(accel.DeviceError, match="no MPS"):
        accel.require_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert accel.require_device("mps") == "mps"


def test_cuda_with_cuda_passes_and_checks_the_index(fake_cuda):
    assert accel.require_device("auto") == "cuda"
    assert accel.require_device("cuda") == "cuda"
    assert accel.require_device("cuda:0") == "cuda:0"
    with pytest.raises(accel.DeviceError, match="1 GPU"):
        accel.require_device("cuda:1")


def test_mismatched_cuda_builds_are_named(fake_cuda):
    assert accel.cuda_build_problem() is None
    fake_cuda.setattr(torchvision.version, "cuda", 11080)
    with pytest.raises(accel.DeviceError) as err:
        accel.require_device("cuda")
    assert "CUDA 12.4" in str(err.value) and "CUDA 11.8" in str(err.value) and "torchvision" in str(err.value)
    fake_cuda.setattr(torchvision.version, "cuda", None)
    assert "CPU build" in accel.cuda_build_problem()
    fake_cuda.setattr(torch.version, "cuda", None)  # a CPU torch: nothing to mismatch
    assert accel.cuda_build_problem() is None


def test_cuda_version_strings():
    assert accel._cuda_version_str(12040) == "12.4"
    assert accel._cuda_version_str("13000") == "13.0"
    assert accel._cuda_version_str("12.1") == "12.1"
    assert accel._cuda_version_str(None) is None


def test_precision_by_device(fake_cuda):
    assert embed.resolve_precision("auto", "cuda") == "bf16"
    fake_cuda.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100 / T4
    assert embed.resolve_precision("auto", "cuda:0") == "fp16"
    assert embed.resolve_precision("fp32", "cuda") == "fp32"
    fake_cuda.setattr(runtime, "cpu_has_native_bf16", lambda: False)  # the one definition
    assert embed.resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(ValueError, match="fp16"):
        embed.resolve_precision("fp16", "cpu")


def test_loader_settings_from_cores():
    assert accel.default_num_workers(16) == 15
    assert accel.default_num_workers(1) == 0
    assert accel.default_num_workers(64) == accel.MAX_WORKERS
    s = accel.loader_settings("cuda", "auto", cores=16)
    assert s == {"num_workers": 15, "prefetch_factor": accel.PREFETCH_FACTOR, "pin_memory": True,
                 "persistent_workers": False}
    s = accel.loader_settings("cpu", 0)
    assert s["num_workers"] == 0 and s["prefetch_factor"] is None and not s["pin_memory"]
    with pytest.raises(ValueError):
        accel.loader_settings("cpu", -1)


def test_cudnn_benchmark_only_for_convolutions_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    mlp = torch.nn.Sequential(torch.nn.Linear(3, 4))
    assert accel.configure_backends(cnn, "cpu") == {"cudnn_benchmark": False}
    assert accel.configure_backends(mlp, "cuda") == {"cudnn_benchmark": False}
    assert torch.backends.cudnn.benchmark is False
    assert accel.configure_backends(cnn, "cuda:0") == {"cudnn_benchmark": True}
    assert torch.backends.cudnn.benchmark is True


def test_maybe_compile():
    fn = lambda x: x * 2  # noqa: E731
    assert accel.maybe_compile(fn, False) is fn
    compiled = accel.maybe_compile(fn, True, backend="eager")
    assert compiled is not fn and torch.equal(compiled(torch.ones(3)), torch.full((3,), 2.0))


# ---- out-of-memory back-off -----------------------------------------------------------------------

class FakeForward:
    """A forward that raises torch's OOM error above ``cap`` items and records every batch it ran."""

    def __init__(self, cap: int, error=None):
        self.cap, self.calls, self.error = cap, [], error

    def __call__(self, x):
        if len(x) > self.cap:
            raise self.error or torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(x)} GiB")
        self.calls.append(len(x))
        return x * 10


@pytest.mark.parametrize("cap,start", [(5, 16), (1, 8), (7, 7), (100, 16), (3, 64)])
def test_backoff_never_loses_or_duplicates(cap, start, capsys):
    x = torch.arange(37)
    fwd, lim = FakeForward(cap), accel.BatchLimiter(start)
    out = accel.run_in_batches(fwd, x, lim)
    assert torch.equal(out, x * 10)  # every item once, in order
    assert sum(fwd.calls) == len(x) and max(fwd.calls) <= cap
    assert lim.size <= cap and (lim.backoffs > 0) == (start > cap)
    if start > cap:  # the back-off is reported, with the size it continues at
        assert f"continuing with batches of {lim.size}" in capsys.readouterr().err
    # the next call starts at the size that fitted: no further back-off
    before = lim.backoffs
    again = accel.run_in_batches(fwd, torch.arange(20), lim)
    assert torch.equal(again, torch.arange(20) * 10) and lim.backoffs == before


def test_backoff_on_lists_arrays_and_cublas_errors():
    def upper(texts):
        if len(texts) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return [t.upper() for t in texts]

    items = [f"t{i}" for i in range(11)]
    assert accel.run_in_batches(upper, items, accel.BatchLimiter(8)) == [t.upper() for t in items]
    arr = np.arange(10.0)
    err = RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)")
    out = accel.run_in_batches(FakeForward(4, err), arr, accel.BatchLimiter(10))
    np.testing.assert_array_equal(out, arr * 10)


def test_backoff_reraises_other_errors_and_oom_at_one():
    with pytest.raises(ValueError, match="boom"):
        accel.run_in_batches(lambda x: (_ for _ in ()).throw(ValueError("boom")), torch.arange(4), accel.BatchLimiter(2))
    with pytest.raises(accel.DeviceError, match="batch of 1"):
        accel.run_in_batches(FakeForward(0), torch.arange(4), accel.BatchLimiter(2))


@pytest.mark.parametrize("cap,start,limit,expect", [(300, 32, 1024, 256), (5000, 32, 1024, 1024),
                                                    (20, 32, 1024, 16), (1, 32, 1024, 1), (40, 32, 48, 32),
                                                    (100, 32, 48, 48)])
def test_find_batch_size(cap, start, limit, expect):
    tried = []

    def probe(n):
        tried.append(n)
        if n > cap:
            raise torch.OutOfMemoryError("out of memory")

    assert accel.find_batch_size(probe, start=start, limit=limit) == expect
    assert max(tried) <= limit


def test_find_batch_size_oom_at_one():
    with pytest.raises(accel.DeviceError):
        accel.find_batch_size(lambda n: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")), start=4)


def test_fits_on_device(fake_cuda):
    assert accel.fits_on_device(10**15, "cpu")
    fake_cuda.setattr(torch.cuda, "mem_get_info", lambda *a: (8 * 2**30, 80 * 2**30))
    assert accel.fits_on_device(3 * 2**30, "cuda")
    assert not accel.fits_on_device(5 * 2**30, "cuda")
    assert accel.fits_on_device(5 * 2**30, "cuda", fraction=0.9)


def test_jpeg_completeness():
    data = bytes(torchvision.io.encode_jpeg(torch.zeros(1, 8, 8, dtype=torch.uint8)))
    assert accel.is_complete_jpeg(data) and accel.is_complete_jpeg(data + b"\x00\x00")
    assert not accel.is_complete_jpeg(data[:-10])
    assert not accel.is_complete_jpeg(b"\x89PNG\r\n\x1a\n" + data[3:])
    assert not accel.is_complete_jpeg(b"")


def _sgd_step(precision: str, loss_factor: float = 1.0):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = accel.grad_scaler(precision, "cpu")
    loss = (w * torch.arange(4.0)).sum() * loss_factor
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return w.detach(), scaler


def test_grad_scaler_is_a_pass_through_unless_fp16():
    ref, _ = _sgd_step("fp32")
    torch.testing.assert_close(ref, torch.ones(4) - 0.1 * torch.arange(4.0))  # plain SGD by hand
    for precision in ("fp32", "bf16"):
        w, scaler = _sgd_step(precision)
        assert not scaler.is_enabled() and torch.equal(w, ref)


def test_grad_scaler_fp16_unscales_and_skips_overflowing_steps():
    w, scaler = _sgd_step("fp16")
    assert scaler.is_enabled()
    torch.testing.assert_close(w, torch.ones(4) - 0.1 * torch.arange(4.0))  # gradients unscaled before the step
    start = scaler.get_scale()
    w, scaler = _sgd_step("fp16", loss_factor=float("inf"))  # overflow: the step is skipped, the scale lowered
    assert torch.equal(w, torch.ones(4)) and scaler.get_scale() < start


def test_device_decode_waits_for_queued_work_before_nvjpeg(monkeypatch):
    """nvjpeg writes on its own stream: the current stream is synchronised before each GPU decode."""
    events = []

    class FakeStream:
        def synchronize(self):
            events.append("sync")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(accel, "_decode", lambda data, device: events.append("decode") or
                        [torch.zeros(1, 8, 8, dtype=torch.uint8) for _ in data])
    pre = accel.DevicePreprocess(size=(4, 4), mean=(0.5,) * 3, std=(0.5,) * 3)
    batch = accel.EncodedBatch([0], [torch.zeros(10, dtype=torch.uint8)], [], None, 1)
    monkeypatch.setattr(accel.DevicePreprocess, "batch", lambda self, imgs: torch.zeros(len(imgs), 3, 4, 4))
    accel.decode_on_device(batch, [0], pre, "cuda", lambda i: (None, "x"))
    assert events == ["sync", "decode"]
    events.clear()
    accel.decode_on_device(batch, [0], pre, "cpu", lambda i: (None, "x"))
    assert events == ["decode"]
