"""SIGTERM and Ctrl-C unwind a faceflow command, but never from inside an import.

An exception raised inside Python's import machinery can leave its locks held, and every other
thread's next import then waits forever (commands/signals.py). A real process, a real signal.
"""

from __future__ import annotations

import os
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


# A flow run's process as a worker starts it (`python -m prefect.engine`, the flow from its entrypoint):
# Prefect's own SIGTERM handler and Python's SIGINT one are there, and the flow wraps them as faceflow's
# flows do. The import the signal lands in runs a class body whose __set_name__ waits (as matplotlib's
# class bodies run code): an exception raised there comes out as a RuntimeError, and the run Failed.
FLOW_FILE = textwrap.dedent("""
    import time
    from prefect import flow
    from faceflow.interrupts import defer_during_imports

    @flow(name="signal-during-import")
    def signal_during_import() -> None:
        defer_during_imports()  # the first line of faceflow's flows
        import slow_class_module
        time.sleep(120)  # the flow's work: what the deferred signal interrupts once the import is done
""")

SLOW_CLASS_MODULE = textwrap.dedent("""
    import threading, time
    from pathlib import Path

    class WaitsForTheSignal:
        def __set_name__(self, owner, name):
            print("importing", flush=True)
            # Inside the import until the signal has reached faceflow's wrapper and been put off
            # (it arms a timer to take it again): a condition, not a guess at how long delivery takes.
            deadline = time.monotonic() + 30
            while not any(isinstance(t, threading.Timer) for t in threading.enumerate()) and time.monotonic() < deadline:
                time.sleep(0.01)  # poll interval of the bounded wait (30 s) for the handler's retry timer
            Path({marker!r}).write_text("the import finished")

    class Plotted:
        attribute = WaitsForTheSignal()
""")


@pytest.fixture(scope="module")
def api_url(tmp_path_factory: pytest.TempPathFactory, migrated_home: Path) -> str:
    from commands.server import local_server
    from conftest import copy_home

    with local_server(copy_home(migrated_home, tmp_path_factory.mktemp("signals") / "home"), timeout=300) as server:
        yield server.api_url


# Exit statuses are Prefect's: after recording the crash, its SIGTERM handler lets the process die of the
# signal; a KeyboardInterrupt whose outcome the engine recorded ends `python -m prefect.engine` with 0.
@pytest.mark.parametrize(("stop_signal", "exit_code"), [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 0)])
def test_a_flow_run_signalled_during_an_import_ends_crashed_through_prefects_own_handling(
    tmp_path: Path, api_url: str, stop_signal: signal.Signals, exit_code: int
) -> None:
    """The real path: Prefect's engine runs the flow in its own process, the signal is Prefect's (or Python's) to take."""
    from prefect.flows import load_flow_from_entrypoint

    from support import client, wait_for_state

    marker = tmp_path / "imported.txt"
    (tmp_path / "signal_flow.py").write_text(FLOW_FILE)
    (tmp_path / "slow_class_module.py").write_text(SLOW_CLASS_MODULE.format(marker=str(marker)))
    entrypoint = f"{tmp_path / 'signal_flow.py'}:signal_during_import"
    with client(api_url) as prefect:
        flow_run_id = prefect.create_flow_run(load_flow_from_entrypoint(entrypoint)).id
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT__FLOW_RUN_ID": str(flow_run_id),
           "PREFECT__FLOW_ENTRYPOINT": entrypoint, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(tmp_path)])}
    process = subprocess.Popen([sys.executable, "-m", "prefect.engine"], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "importing"  # inside the class body, inside the import
        process.send_signal(stop_signal)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert marker.exists(), stderr[-3000:]  # the import ran to its end before the signal was taken
    assert "__set_name__" not in stderr, stderr[-3000:]  # nothing was raised inside it
    assert wait_for_state(api_url, flow_run_id, {"Crashed"}, timeout=60) == "Crashed", stderr[-3000:]
    assert process.returncode == exit_code, stderr[-3000:]
