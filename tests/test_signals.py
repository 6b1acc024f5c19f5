"""SIGTERM and Ctrl-C unwind a faceflow command, but never from inside an import.

An exception raised inside Python's import machinery can leave its locks held, and every other
thread's next import then waits forever (commands/signals.py). A real process, a real signal.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT

PROGRAM = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{repo!r}, {modules!r}]
    from commands import signals
    signals.install()
    import slow_module  # prints "importing", waits for the signal to be put off, writes the marker
    print("imported", flush=True)
    time.sleep(60)  # the program's work: what the signal interrupts (the test ends it long before)
""")

SLOW_MODULE = textwrap.dedent("""
    import threading, time
    from pathlib import Path
    print("importing", flush=True)
    # Stay inside this import until the signal has reached faceflow's handler and been put off
    # (it arms a timer to take it again): a condition, not a guess at how long delivery takes.
    deadline = time.monotonic() + 30
    while not any(isinstance(t, threading.Timer) for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)  # poll interval of the bounded wait (30 s) for the handler's retry timer
    Path({marker!r}).write_text("the import finished")
""")


@pytest.mark.parametrize(("stop_signal", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, -signal.SIGINT)])
def test_a_signal_during_an_import_is_taken_once_the_import_is_done(
    tmp_path: Path, stop_signal: signal.Signals, exit_code: int
) -> None:
    marker = tmp_path / "imported.txt"
    (tmp_path / "slow_module.py").write_text(SLOW_MODULE.format(marker=str(marker)))
    program = PROGRAM.format(repo=str(REPO_ROOT), modules=str(tmp_path))
    process = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "importing"  # inside the import until the signal is put off
        process.send_signal(stop_signal)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == exit_code, stderr[-2000:]
    assert marker.exists()  # the import ran to its end before the signal was taken
    assert "slow_module" not in stderr  # nothing was raised inside it


def test_a_signal_outside_an_import_is_taken_at_once(tmp_path: Path) -> None:
    (tmp_path / "slow_module.py").write_text("print('importing', flush=True)\n")
    program = PROGRAM.format(repo=str(REPO_ROOT), modules=str(tmp_path))
    process = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert [process.stdout.readline().strip() for _ in range(2)] == ["importing", "imported"]
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 143
    assert time.monotonic() - sent < 5  # not held back (the program would sleep 60 s)


# A flow run's process (a worker's): Prefect's own handler is there; faceflow's flows wrap it.
FLOW_PROCESS = textwrap.dedent("""
    import signal, sys, time
    sys.path[:0] = [{repo!r}, {modules!r}]

    class Stopped(BaseException):
        pass

    def engines_handler(signum, frame):  # stands in for Prefect's: raises in the main thread
        raise Stopped(signum)

    signal.signal(signal.SIGTERM, engines_handler)
    from faceflow.interrupts import defer_during_imports
    defer_during_imports()
    try:
        import slow_module
        time.sleep(60)  # the flow's work: what the deferred signal interrupts once the import is done
    except Stopped:
        print("stopped by the engine's handler after the import", flush=True)
""")


def test_a_flow_run_process_takes_its_engines_signal_after_the_import(tmp_path: Path) -> None:
    """Raised inside matplotlib's class bodies, the engine's exception came out as a RuntimeError: the run ended Failed."""
    marker = tmp_path / "imported.txt"
    (tmp_path / "slow_module.py").write_text(SLOW_MODULE.format(marker=str(marker)))
    program = FLOW_PROCESS.format(repo=str(REPO_ROOT), modules=str(tmp_path))
    process = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "importing"
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert marker.exists() and "slow_module" not in stderr, stderr[-2000:]
    assert stdout.strip() == "stopped by the engine's handler after the import"
