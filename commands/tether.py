"""Run a command that the kernel stops when the process that started it dies.

``python -m commands.tether PARENT_PID COMMAND...`` asks Linux to send this process SIGTERM
when its parent dies (``PR_SET_PDEATHSIG``), checks that the parent is still ``PARENT_PID``
(it may have died before the request), restores the default action of SIGINT and SIGTERM,
then replaces itself with ``COMMAND``. The request
survives the exec, so a Prefect server or worker started this way cannot outlive a
``faceflow`` command even when that command is killed with SIGKILL and runs no cleanup.
Elsewhere than Linux the command simply runs; the caller's own cleanup still stops it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def tie_to_parent(parent_pid: int) -> None:
    """Have the kernel send SIGTERM when the parent exits; exit now if it already has."""
    if sys.platform.startswith("linux"):
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        sys.exit(0)


def become_subreaper() -> None:
    """Adopt this process's orphaned descendants (Linux), so a supervisor can still find and stop them."""
    if sys.platform.startswith("linux"):
        _prctl(PR_SET_CHILD_SUBREAPER, 1)


def main(arguments: list[str]) -> None:
    parent_pid, command = int(arguments[0]), arguments[1:]
    tie_to_parent(parent_pid)
    # A shell starts background jobs with SIGINT ignored, and an ignored signal survives exec:
    # the child must answer the signals its supervisor stops it with.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.SIG_DFL)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
