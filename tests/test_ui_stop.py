"""Stopping `make ui` while runs start, and its worker's restarts: no process left, every run accounted for."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from commands.server import SERVER_RECORD, local_server
from commands.ui import MAX_WORKER_RESTARTS, RESTART_WINDOW_SECONDS
from support import (
    RunningUI, assert_no_process_left, client, flow_run_processes, run_deployment, wait_for_state, wait_for_text,
)
from ui_runs import QUICK_CONFIG, RETRAIN_LONG, wait_for_a_running_task, wait_for_sub_flow, wait_while_starting, workers


@pytest.mark.parametrize(("moment", "signum"), [
    ("pending", signal.SIGTERM),     # the worker has taken the run; its process may not exist yet
    ("importing", signal.SIGTERM),   # the run's process imports its flow: no state of its own yet
    ("importing", signal.SIGINT),
    ("first task", signal.SIGINT),   # a retraining inside its pipeline sub-flow's first task
], ids=["pending-sigterm", "importing-sigterm", "importing-ctrl-c", "first-task-ctrl-c"])
def test_stopping_make_ui_while_a_run_starts_leaves_no_process_and_the_run_crashed(
    tmp_path: Path, tag: str, data_file: Path, prefect_home: Path, moment: str, signum: int
) -> None:
    ui = RunningUI(tmp_path, tag, data_file, prefect_home, FACEFLOW_FACES_DIR=str(tmp_path / "faces"),
                   FACEFLOW_MODELS_DIR=str(tmp_path / "models"))
    runs = []
    if moment == "first task":
        runs.append(run_deployment(ui.api_url, "weekly-retrain", RETRAIN_LONG, flow="faceflow-retrain"))
        runs.append(wait_for_sub_flow(ui.api_url, runs[0], timeout=300).id)
        wait_for_a_running_task(ui.api_url, runs[1], timeout=300)
    else:
        runs.append(run_deployment(ui.api_url, "on-demand", {"config": QUICK_CONFIG}))
        print("stopped while the run was", wait_while_starting(ui.api_url, tag, runs[0], moment == "importing", timeout=300))
    ui.stop(signum)
    assert_no_process_left(tag)
    with local_server(ui.home, timeout=300) as server, client(server.api_url) as prefect:
        states = {run: prefect.read_flow_run(run).state for run in runs}
    assert {run: state.name for run, state in states.items()} == {run: "Crashed" for run in runs}, \
        {run: (state.name, state.message) for run, state in states.items()}


def test_an_orphaned_run_is_left_to_finish_and_the_sixth_worker_exit_stops_make_ui(
    tmp_path: Path, tag: str, data_file: Path, prefect_home: Path
) -> None:
    ui = RunningUI(tmp_path, tag, data_file, prefect_home)
    outputs = tmp_path / "outputs"
    run = run_deployment(ui.api_url, "on-demand", {"config": QUICK_CONFIG | {"output_dir": str(outputs)}})
    wait_for_a_running_task(ui.api_url, run, timeout=300)
    [worker] = workers(tag)
    faceflow_ui = worker.parent()
    [run_process] = [p for p in flow_run_processes(tag, run) if p.ppid() == worker.pid]
    worker.kill()  # the worker alone: its flow run survives it
    wait_for_text(ui.output, "(restart 1,", ui.process, timeout=60)
    assert run_process.ppid() == faceflow_ui.pid  # adopted by faceflow ui (a child subreaper), not by init
    ended = wait_for_state(ui.api_url, run, {"Completed"}, timeout=600)  # left to finish
    with client(ui.api_url) as prefect:
        assert ended == "Completed", prefect.read_flow_run(run).state.message
    assert (next(outputs.glob("run-*")) / "report.md").is_file()
    deadline = time.monotonic() + 60  # the run's process exits (flushing its logs), then faceflow ui reaps it
    while psutil.pid_exists(run_process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)  # poll interval of the bounded wait for faceflow ui to reap it (each second)
    if psutil.pid_exists(run_process.pid):
        raise AssertionError(f"the finished orphan is still there, {run_process.status()}")

    # Exits 2 to 6 within the window: five restarts in all, then make ui gives up and stops everything.
    killed = {worker.pid}
    for exits in range(2, MAX_WORKER_RESTARTS + 2):
        deadline = time.monotonic() + 60
        while not (fresh := [p for p in workers(tag) if p.pid not in killed]) and time.monotonic() < deadline:
            time.sleep(0.2)  # poll interval of the bounded wait for the restarted worker's process
        [worker] = fresh
        worker.kill()
        killed.add(worker.pid)
        if exits <= MAX_WORKER_RESTARTS:
            wait_for_text(ui.output, f"(restart {exits},", ui.process, timeout=60)
    assert ui.process.wait(timeout=120) != 0
    output = ui.output.read_text()
    assert (f"faceflow ui failed: the Prefect worker exited unexpectedly with code -9, after {MAX_WORKER_RESTARTS} "
            f"restarts within {RESTART_WINDOW_SECONDS / 60:g} minutes: giving up") in output, output[-3000:]
    assert f"(restart {MAX_WORKER_RESTARTS + 1}," not in output
    assert_no_process_left(tag)
    assert not (ui.home / SERVER_RECORD).exists()
