"""CPU thread limits for torch and BLAS, set for a block and restored after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from threadpoolctl import threadpool_limits


@contextmanager
def limited_threads(count: int) -> Iterator[None]:
    """Use at most ``count`` threads in torch and BLAS inside the block.

    The models here are small: on a 2-core machine, spinning worker threads that compete
    with the Prefect server (or anything else) made training 100x slower in measurements.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        with threadpool_limits(limits=count):
            yield
    finally:
        torch.set_num_threads(previous)
