"""The build lock with real processes: a second build waits or says one is running, a crash releases it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cxrlib import lock

PY = sys.executable


def _env(workdir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (lock.TOKEN_ENV, "MAKEFLAGS")}
    return {**env, "CXR_WORKDIR": str(workdir), **extra}


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def _holding(workdir: Path, started: Path, release: Path) -> subprocess.Popen:
    """A 'build' that holds the smoke profile's lock until ``release`` exists."""
    body = (f"import pathlib, time; pathlib.Path({str(started)!r}).touch()\n"
            f"while not pathlib.Path({str(release)!r}).exists(): time.sleep(0.05)")
    return subprocess.Popen([PY, "-m", "cxrlib.lock", "run", "--profile", "smoke", "--", PY, "-c", body],
                            env=_env(workdir), stderr=subprocess.PIPE, text=True)


def _makevars(workdir: Path) -> subprocess.CompletedProcess:
    """The Makefile's parse-time step, as make runs it."""
    return subprocess.run([PY, "-m", "cxrlib.dag", "makevars", "--locked", "--profile", "smoke"], env=_env(workdir),
                          capture_output=True, text=True, timeout=120)


def _run(workdir: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "cxrlib.lock", *args], env=_env(workdir, **env), capture_output=True,
                          text=True, timeout=120)


def test_second_build_is_refused_then_waits_and_runs_after_the_first(workdir, tmp_path):
    started, release, second = tmp_path / "started", tmp_path / "release", tmp_path / "second-ran"
    first = _holding(workdir, started, release)
    try:
        _wait_for(started)
        busy = _run(workdir, "run", "--profile", "smoke", "--no-wait", "--", PY, "-c", "print('ran')")
        assert busy.returncode == lock.BUSY and "ran" not in busy.stdout
        assert f"pid {first.pid}" in busy.stderr and "a build is running" in busy.stderr
        # a dry run (make -n puts `n` in MAKEFLAGS) does not wait either
        dry = _run(workdir, "run", "--profile", "smoke", "--", PY, "-c", "print('ran')", MAKEFLAGS="n")
        assert dry.returncode == lock.BUSY
        # the Makefile's parse-time step: a make error naming the build, and no parameter file written
        inc = _makevars(workdir)
        assert inc.returncode == 0, inc.stderr
        assert Path(inc.stdout.strip()).read_text().startswith(f"$(error error: a build is running in {workdir}")
        assert f"pid {first.pid}" in Path(inc.stdout.strip()).read_text()
        assert not (workdir / "build" / "smoke" / "params").exists() and not (workdir / "build" / "smoke" / "dag.mk").exists()
        # another profile is not locked
        other = _run(workdir, "run", "--profile", "offline", "--no-wait", "--", PY, "-c", "print('ran')")
        assert other.returncode == 0 and "ran" in other.stdout
        # a waiting build starts only once the first ends
        waiter = subprocess.Popen([PY, "-m", "cxrlib.lock", "run", "--profile", "smoke", "--", PY, "-c",
                                   f"import pathlib; pathlib.Path({str(second)!r}).touch()"],
                                  env=_env(workdir), stderr=subprocess.PIPE, text=True)
        time.sleep(2.0)
        assert waiter.poll() is None and not second.exists()
        release.touch()
        assert first.wait(60) == 0
        assert waiter.wait(60) == 0 and second.exists()
        assert "waiting" in waiter.stderr.read()
    finally:
        release.touch()
        first.kill()


def test_a_killed_build_releases_the_lock(workdir, tmp_path):
    started, release = tmp_path / "started", tmp_path / "release"
    first = _holding(workdir, started, release)
    try:
        _wait_for(started)
        assert _run(workdir, "status", "--profile", "smoke").returncode == lock.BUSY
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)
        assert _run(workdir, "status", "--profile", "smoke").returncode == 0
        after = _run(workdir, "run", "--profile", "smoke", "--no-wait", "--", PY, "-c", "print('ran')")
        assert after.returncode == 0 and "ran" in after.stdout
    finally:
        release.touch()


def test_the_build_itself_passes_through_its_own_lock(workdir):
    """A nested call inside the locked build runs (the exit code passes through), and so does make's
    parse-time step inside it."""
    inner = f"{PY} -m cxrlib.lock run --profile smoke --no-wait -- {PY} -c 'print(\"X := 1\"); raise SystemExit(3)'"
    step = f"{PY} -m cxrlib.dag makevars --locked --profile smoke"
    out = _run(workdir, "run", "--profile", "smoke", "--no-wait", "--", "bash", "-c", f"{inner}; echo code=$?; {step}")
    assert out.returncode == 0, out.stderr
    assert "X := 1" in out.stdout and "code=3" in out.stdout
    assert out.stdout.split()[-1] == str(workdir / "build" / "smoke" / "dag.mk")


def test_makevars_step_holds_the_lock_while_it_writes(workdir, monkeypatch):
    """``makevars --locked`` writes the make text holding the lock (a second build is refused meanwhile) and
    releases it when done."""
    from cxrlib import dag

    seen = []

    def write(profile, assignments=()):
        seen.append(lock._is_held(lock.lock_path(profile)))
        try:
            with lock.build_lock(lock.lock_path(profile), wait=False):
                seen.append("acquired")
        except lock.BuildRunning as exc:
            seen.append(str(exc))
        return Path("written.mk")

    monkeypatch.delenv(lock.TOKEN_ENV, raising=False)
    monkeypatch.setattr(dag, "write_make_text", write)
    assert dag.main(["makevars", "--locked", "--profile", "smoke"]) == 0
    assert seen[0] is True and "a build is running" in seen[1] and str(os.getpid()) in seen[1]
    assert not lock._is_held(lock.lock_path("smoke"))
    assert dag.main(["makevars", "--profile", "smoke"]) == 0 and seen[2] is False  # unlocked without --locked


@pytest.mark.parametrize("flags,expected", [("n", True), ("rn", True), ("", False), ("-j2", False),
                                            ("r -- PROFILE=smoke", False), ("kn --jobserver-auth=3,4", True)])
def test_dry_run_detection(monkeypatch, flags, expected):
    monkeypatch.setenv("MAKEFLAGS", flags)
    assert lock.dry_run() is expected
