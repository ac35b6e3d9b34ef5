"""One build of a profile at a time: a lock on ``build/<profile>/`` held for the whole ``make paper|demo|smoke``.

The lock is ``fcntl.flock`` on ``build/<profile>/.build.lock``, held by a wrapper process around the build
(``python -m cxrlib.lock run --profile P -- make dag ...``). The kernel releases it when that process ends,
however it ends, so a crashed or killed build never leaves a stale lock. The lock file records who holds it
(pid, start time, command) for the message a second build prints.

A second ``make`` on the same profile waits for the first (``--no-wait``, and any dry run ``make -n``, says
a build is running and exits instead). The make DAG writes its parameter files at parse time; that step
(``python -m cxrlib.dag makevars --locked``) holds the lock too, in its own process and without waiting
(:func:`make_include`), so neither ``make -n`` nor a second build ever rewrites the parameter files of a
running build. The wrapper's children inherit ``CXR_BUILD_LOCK`` (a token also written into the lock file),
so the build's own nested ``make`` calls pass straight through.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cxrlib import paths

LOCK_NAME = ".build.lock"
TOKEN_ENV = "CXR_BUILD_LOCK"
BUSY = 75  # EX_TEMPFAIL: a build of this profile is running


class BuildRunning(RuntimeError):
    """Another process holds the build lock; ``holder`` says who."""

    def __init__(self, lock_path: Path, holder: dict[str, Any]):
        self.lock_path, self.holder = lock_path, holder
        since = time.strftime("%H:%M:%S", time.localtime(holder.get("started", 0))) if holder else "?"
        super().__init__(f"a build is running in {lock_path.parent} (pid {holder.get('pid', '?')}, since {since}: "
                         f"{holder.get('command', '?')}); wait for it to finish")


def lock_path(profile: str) -> Path:
    return paths.build_dir() / profile / LOCK_NAME


def holder(path: Path) -> dict[str, Any]:
    """What the lock file says about its holder ({} when empty or unreadable)."""
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _is_held(path: Path) -> bool:
    """True when some process holds the lock (probed with a non-blocking shared attempt)."""
    if not path.is_file():
        return False
    with open(path) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def inherited(path: Path) -> bool:
    """True when this process runs inside the build that holds ``path`` (its token is in our environment)."""
    token = os.environ.get(TOKEN_ENV, "")
    return bool(token) and holder(path).get("token") == token and _is_held(path)


@contextlib.contextmanager
def build_lock(path: Path, wait: bool = True, command: str = "", poll: float = 0.5,
               on_wait=None) -> Iterator[str]:
    """Hold the exclusive lock at ``path`` for the block; yields the token children should inherit.

    ``wait=False``: raise :class:`BuildRunning` at once when another process holds it; else wait (calling
    ``on_wait(holder)`` once).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    raise BuildRunning(path, holder(path)) from None
                if not told and on_wait is not None:
                    on_wait(holder(path))
                told = True
                time.sleep(poll)
        token = uuid.uuid4().hex
        info = json.dumps({"pid": os.getpid(), "started": time.time(), "command": command, "token": token})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        try:
            yield token
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def dry_run() -> bool:
    """True inside ``make -n`` (make puts ``n`` in the single-letter word of MAKEFLAGS)."""
    flags = os.environ.get("MAKEFLAGS", "").split()
    return bool(flags) and not flags[0].startswith("-") and "=" not in flags[0] and "n" in flags[0]


def run(profile: str, cmd: list[str], wait: bool = True) -> int:
    """Run ``cmd`` holding ``profile``'s build lock (or directly, inside the build that holds it)."""
    path = lock_path(profile)
    if inherited(path):
        return subprocess.call(cmd)

    def tell(h: dict[str, Any]) -> None:
        print(f"{BuildRunning(path, h)}: waiting…", file=sys.stderr, flush=True)

    try:
        with build_lock(path, wait=wait, command=" ".join(cmd), on_wait=tell) as token:
            child = subprocess.Popen(cmd, env={**os.environ, TOKEN_ENV: token})
            forward = lambda sig, _frame: child.send_signal(sig)  # noqa: E731
            old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
            try:
                return child.wait()
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
    except BuildRunning as exc:
        print(f"error: {exc}", file=sys.stderr)
        return BUSY


def make_include(profile: str, write: Callable[[], Path]) -> Path:
    """The file the Makefile includes at parse time: ``write()``'s, called holding ``profile``'s build lock (or
    inside the build that holds it); while another build runs, a make file holding one ``$(error ...)`` that
    names it, and ``write`` is not called (it would rewrite the running build's parameter files)."""
    path = lock_path(profile)
    if inherited(path):
        return write()
    try:
        with build_lock(path, wait=False, command=" ".join(sys.argv)):
            return write()
    except BuildRunning as exc:
        return _error_file(profile, f"{exc}; its parameter files are left as they are")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxrlib.lock")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a command holding build/<profile>/'s lock")
    r.add_argument("--profile", required=True)
    r.add_argument("--no-wait", action="store_true", help="exit with a message when a build is running")
    r.add_argument("command", nargs=argparse.REMAINDER)
    s = sub.add_parser("status", help="say whether a build of the profile is running")
    s.add_argument("--profile", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "status":
        path = lock_path(args.profile)
        if _is_held(path):
            print(BuildRunning(path, holder(path)))
            return BUSY
        print(f"no build of {args.profile!r} is running")
        return 0
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command to run after --")
    return run(args.profile, cmd, wait=not (args.no_wait or dry_run()))


def _error_file(profile: str, message: str) -> Path:
    """A make file holding one ``$(error ...)`` line (what the Makefile includes when a build is running)."""
    from cxrlib.io import atomic_path

    path = paths.build_dir() / f"busy-{profile}.mk"
    with atomic_path(path) as tmp:
        tmp.write_text("$(error error: " + message.replace("$", "$$") + ")\n")
    return path


if __name__ == "__main__":
    sys.exit(main())
