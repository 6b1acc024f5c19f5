"""CPU thread limits for torch and BLAS, set for a block and restored after."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from threadpoolctl import threadpool_limits

# Read by torch's and the BLAS libraries' thread pools when they load.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@contextmanager
def limited_threads(count: int) -> Iterator[None]:
    """Use at most ``count`` threads in torch and BLAS inside the block.

    The models here are small: on a 2-core machine, spinning worker threads that compete
    with the Prefect server (or anything else) made training 100x slower in measurements.
    torch is often not loaded when the block starts (a step imports it when it computes, and
    a fully cached run never does), so the count also goes to the variables torch reads when
    it loads; a torch loaded inside the block keeps that count.
    """
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    os.environ.update({name: str(count) for name in THREAD_VARIABLES})
    torch = sys.modules.get("torch")
    previous = torch.get_num_threads() if torch is not None else None
    if torch is not None:
        torch.set_num_threads(count)
    try:
        with threadpool_limits(limits=count):
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if previous is not None:
            torch.set_num_threads(previous)
