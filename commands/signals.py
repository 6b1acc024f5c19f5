"""How a `faceflow` command answers SIGTERM and Ctrl-C: it unwinds, but never in the middle of an import.

SIGTERM raises SystemExit(143) and SIGINT KeyboardInterrupt, in the main thread, so every
``with`` and ``finally`` runs: the flow run is marked Crashed and the server the command
started is stopped. The default actions would kill the process without either.

An exception raised while the main thread is inside Python's import machinery can leave one
of its locks held: ``importlib._bootstrap`` takes the global import lock and module locks
outside any ``try``. Every other thread's next import then waits forever, and Prefect's task
runner waits for those threads before the flow can end: a `faceflow run` sent SIGTERM while
its training imported torch, as the new-people models' thread imported scipy, hung for good
(`make bench`, 2026-11-25). So a signal that arrives during an import is taken again once the
import is done: a delay of the length of an import, a second at most here.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

RETRY_SECONDS = 0.05


def importing(frame: FrameType | None) -> bool:
    """Whether ``frame`` or any frame below it runs Python's import machinery."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _take_again_later(signum: int) -> None:
    timer = threading.Timer(RETRY_SECONDS, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()


def stop(signum: int, frame: FrameType | None) -> None:
    """The handler: unwind the main thread, unless it is importing (then later)."""
    if importing(frame):
        _take_again_later(signum)
        return
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def install() -> None:
    """SIGTERM and SIGINT unwind the command; an ignored SIGINT (a background job's) stays ignored."""
    signal.signal(signal.SIGTERM, stop)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, stop)


def answer_ctrl_c_again() -> None:
    """Undo a background job's ignored SIGINT for this process and every process it starts.

    A shell starts a background job (``make test &``, nohup) with SIGINT ignored, and an
    ignored signal is inherited through exec: whatever a test or the bench starts and then
    stops with Ctrl-C would shrug it off. A handled signal is reset to its default on exec.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
