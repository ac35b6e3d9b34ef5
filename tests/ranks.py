"""Forked CPU ranks with torchrun's environment, for the tests of code that runs under ``torchrun``.

A rank forked from the test process inherits its imports (torch, cxrlib, the backbones' libraries): a
spawned interpreter per rank would import them all again. Each rank gets the variables torchrun sets
(gloo rendezvous over ``env://`` on a free local port) and one torch thread."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any


def _rank_main(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    import torch

    torch.set_num_threads(1)  # forked: no OpenMP parallel region after the fork
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    fn(*args)


def fork_ranks(fn: Callable[..., Any], *args: Any, nproc: int = 2) -> None:
    """Run ``fn(*args)`` on ``nproc`` forked ranks; a rank's exception is raised here."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(nproc, port, fn, args), nprocs=nproc, join=True, start_method="fork")
