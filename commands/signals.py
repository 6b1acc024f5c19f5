"""How a `faceflow` command answers SIGTERM and Ctrl-C: it unwinds, but never in the middle of an import.

SIGTERM raises SystemExit(143) and SIGINT KeyboardInterrupt, in the main thread, so every
``with`` and ``finally`` runs: the flow run is marked Crashed and the server the command
started is stopped. The default actions would kill the process without either. A signal that
arrives during an import is taken again once the import is done (faceflow.interrupts): a
`faceflow run` sent SIGTERM while its training imported torch, as the new-people models' thread
imported scipy, hung for good (`make bench`, 2026-11-25).
"""

from __future__ import annotations

import signal
from types import FrameType

from faceflow.interrupts import deferring


def _unwind(signum: int, frame: FrameType | None) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


stop = deferring(_unwind)  # the handler: unwind the main thread, unless it is importing (then later)


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
