"""Signals never taken in the middle of an import: in a `faceflow` command and in a flow run's process.

An exception raised while the main thread is inside Python's import machinery can leave one of
its locks held (``importlib._bootstrap`` takes the global import lock and module locks outside
any ``try``): every other thread's next import then waits forever, and Prefect's task runner
waits for those threads before the flow can end. Raised inside a class body, it also comes out
as another exception (``RuntimeError: Error calling __set_name__``, from matplotlib's), so a
flow run stopped by Ctrl-C was recorded as Failed instead of Crashed. So a signal that arrives
during an import is taken again once the import is done: a delay of the length of an import.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

RETRY_SECONDS = 0.05
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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


def deferring(handler: Any) -> Callable[[int, FrameType | None], Any]:
    """``handler`` (a function, or SIG_DFL) put off while the main thread imports."""

    def handle(signum: int, frame: FrameType | None) -> Any:
        if importing(frame):
            _take_again_later(signum)
            return None
        if callable(handler):
            return handler(signum, frame)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)  # the default action: die of the signal
        os.kill(os.getpid(), signum)
        return None

    handle.defers_imports = True  # type: ignore[attr-defined]
    return handle


def defer_during_imports() -> None:
    """Wrap this process's SIGINT and SIGTERM handlers (Prefect's, in a flow run's process) so neither fires mid-import.

    Only the main thread may set handlers; elsewhere, and for an ignored signal, nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in STOP_SIGNALS:
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN or current is None or getattr(current, "defers_imports", False):
            continue
        signal.signal(signum, deferring(current))
