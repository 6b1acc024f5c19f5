"""`make ui` as a user runs it: a real server, `prefect deploy`, a worker, a deployment run, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from uuid import UUID

import psutil

from commands.alerts import CHAMPION_CHANGED, CRASHED, FAILED, NAMES
from commands.server import SERVER_RECORD, free_port, is_healthy, local_server
import pytest

from commands.ui import MAX_WORKER_RESTARTS, RESTART_WINDOW_SECONDS
from support import (
    AlertReceiver, RunningUI, assert_no_process_left, client, faceflow, flow_run_processes, listening_addresses,
    flow_run_story, only_loopback, run_deployment, save_webhook_block, sub_flow_runs, tagged_processes, wait_for_state, wait_for_text,
)

# Orchestration is under test, not quality: one narrow flow (faceflow/config.py).
LIGHT_TRAIN = {"members": 1, "hidden_units": 16}
QUICK_CONFIG = {"train": LIGHT_TRAIN | {"epochs": 3}, "sample": {"n_samples": 4}, "interpolate": {"steps": 3}}
LONG_CONFIG = {"train": LIGHT_TRAIN | {"epochs": 20000}, "sample": {"n_samples": 4}, "interpolate": {"steps": 3}}
RETRAIN_LONG = {"config": LONG_CONFIG | {"data": {"validation_fraction": 0.1}}}
# docs/operations.md: a run whose process died is Crashed 60-105 s after its death (three 30 s
# heartbeat intervals after its last heartbeat or state change, plus the server's evaluation);
# one that died still starting (Pending, Submitting), 90-105 s after its last state change.
CRASHED_WINDOW = (60.0, 105.0)
SILENCE_WINDOW = (90.0, 105.0)
PENDING_TYPE = {"Pending", "Submitting"}


def wait_for_a_running_task(api_url: str, flow_run_id: UUID, timeout: float) -> None:
    """Until the server records a task run of ``flow_run_id`` as Running: the flow is inside its tasks."""
    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterState, TaskRunFilterStateName,
    )

    in_run = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    running = TaskRunFilter(state=TaskRunFilterState(name=TaskRunFilterStateName(any_=["Running"])))
    deadline = time.monotonic() + timeout
    with client(api_url) as prefect:
        while time.monotonic() < deadline:
            if prefect.read_task_runs(flow_run_filter=in_run, task_run_filter=running, limit=1):
                return
            time.sleep(0.5)  # poll interval of the bounded wait for a Running task run
    raise AssertionError(f"no task run of flow run {flow_run_id} was Running within {timeout} s")


def automations_by_name(api_url: str) -> dict[str, list]:
    with client(api_url) as prefect:
        found: dict[str, list] = {}
        for automation in prefect.read_automations():
            found.setdefault(automation.name, []).append(automation)
        return found


def set_up_alerts_again(api_url: str, block: str | None) -> None:
    """`faceflow ui`'s automation set-up, run once more against its server (as a second `make ui` would)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from commands.alerts import notification_block
    from commands.ui import set_up_alerts

    saved = os.environ.pop("FACEFLOW_ALERT_BLOCK", None)
    try:
        if block:
            os.environ["FACEFLOW_ALERT_BLOCK"] = block
        with temporary_settings({PREFECT_API_URL: api_url}):
            set_up_alerts(notification_block(), api_url.removesuffix("/api"))
    finally:
        os.environ.pop("FACEFLOW_ALERT_BLOCK", None)
        if saved is not None:
            os.environ["FACEFLOW_ALERT_BLOCK"] = saved


def state_time(api_url: str, flow_run_id: UUID) -> float:
    """When the flow run entered its current state, as time.time() reads."""
    with client(api_url) as prefect:
        return prefect.read_flow_run(flow_run_id).state.timestamp.timestamp()


def workers(tag: str) -> list[psutil.Process]:
    """The live `prefect worker start` processes carrying ``tag``."""
    return tagged_processes(tag, lambda command: command[2:5] == ["prefect", "worker", "start"])


def kill_worker_and_its_flow_runs(tag: str) -> int:
    """SIGKILL the worker and the flow run processes it started, as a machine losing them would; the worker's pid."""
    [worker] = workers(tag)
    doomed = [*worker.children(recursive=True), worker]
    for process in doomed:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(doomed, timeout=30)
    return worker.pid


def wait_for_sub_flow(api_url: str, parent: UUID, timeout: float):
    """The sub-flow run of ``parent`` (the retraining's pipeline), once the server has it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := sub_flow_runs(api_url, parent):
            return found[0]
        with client(api_url) as prefect:
            state = prefect.read_flow_run(parent).state
        if state is not None and state.is_final():  # ended without one: no use waiting
            break
        time.sleep(0.5)  # poll interval of the bounded wait for the sub-flow
    raise AssertionError(f"flow run {parent} started no sub-flow (waited up to {timeout} s): {flow_run_story(api_url, parent)}")


def wait_while_starting(api_url: str, tag: str, flow_run_id: UUID, with_process: bool, timeout: float) -> str:
    """Until the worker has taken ``flow_run_id`` (Pending or Submitting) and, ``with_process``, its process runs.

    Polled often: the run stays that way only while its process imports. Returns the state's name.
    """
    deadline = time.monotonic() + timeout
    with client(api_url) as prefect:
        while time.monotonic() < deadline:
            state = prefect.read_flow_run(flow_run_id).state
            if state is not None and state.name in PENDING_TYPE and (not with_process or flow_run_processes(tag, flow_run_id)):
                return state.name
            assert state is None or state.type.value in {"SCHEDULED", "PENDING"}, f"the run got past its start: {state.name}"
            time.sleep(0.05)  # poll interval of the bounded wait: the phase lasts seconds
    raise AssertionError(f"flow run {flow_run_id} was not starting within {timeout} s")


def crashed_after(api_url: str, flow_run_id: UUID, since: float) -> tuple[float, str]:
    """Seconds from ``since`` to the run's entering Crashed (which it must be in), and the state's message."""
    with client(api_url) as prefect:
        state = prefect.read_flow_run(flow_run_id).state
    assert state.name == "Crashed", f"flow run {flow_run_id} is {state.name}, not Crashed: {state.message}"
    return state.timestamp.timestamp() - since, state.message or ""


def test_make_ui_serves_deployments_a_worker_and_runs_then_stops_on_ctrl_c(
    tmp_path: Path, tag: str, data_file: Path, prefect_home: Path
) -> None:
    receiver = AlertReceiver()
    block = save_webhook_block(prefect_home, receiver.url, "faceflow-test-alerts")
    ui = RunningUI(tmp_path, tag, data_file, prefect_home, FACEFLOW_FACES_DIR=str(tmp_path / "faces"),
                   FACEFLOW_MODELS_DIR=str(tmp_path / "models"), FACEFLOW_ALERT_BLOCK=block)
    assert is_healthy(ui.api_url)
    with client(ui.api_url) as prefect:
        assert sorted(d.name for d in prefect.read_deployments()) == ["forget", "ingest", "on-demand", "rollback", "sweep", "weekly-retrain"]
        assert [w.status for w in prefect.read_workers_for_work_pool("faceflow-local")] == ["ONLINE"]
    # The three alert automations, enabled; set up a second time, still one of each name.
    set_up_alerts_again(ui.api_url, block)
    automations = automations_by_name(ui.api_url)
    assert {name: [a.enabled for a in automations[name]] for name in NAMES} == {name: [True] for name in NAMES}
    set_up_alerts_again(ui.api_url, None)  # another machine's make ui without the variable silences nothing
    automations = automations_by_name(ui.api_url)
    assert {name: [a.enabled for a in automations[name]] for name in NAMES} == {name: [True] for name in NAMES}
    assert "alerts go nowhere" not in ui.output.read_text()
    record = json.loads((ui.home / SERVER_RECORD).read_text())
    assert record["api_url"] == ui.api_url
    listening = listening_addresses(tag)  # the server and UI; the worker listens on nothing
    assert f"127.0.0.1:{ui.port}" in listening and only_loopback(listening), listening

    # The worker is SIGKILLed with the retraining it runs, inside its pipeline sub-flow: the UI stays
    # up and starts another worker, which takes the next runs; the dead run and its sub-flow are
    # marked Crashed (their heartbeats stopped) and alerted below, once the runs in between have
    # taken the minute and a half that takes. (An ingest whose version triggers weekly-retrain, and
    # its alert of a promotion: tests/test_rehearsal.py.)
    killed_run = run_deployment(ui.api_url, "weekly-retrain", RETRAIN_LONG, flow="faceflow-retrain")
    sub_flow = wait_for_sub_flow(ui.api_url, killed_run, timeout=300).id
    wait_for_a_running_task(ui.api_url, sub_flow, timeout=300)  # past its first heartbeat, into the sub-flow's tasks
    kill_worker_and_its_flow_runs(tag)
    killed_at = time.time()
    wait_for_text(ui.output, "(restart 1,", ui.process, timeout=60)
    assert is_healthy(ui.api_url)
    # A run killed while it still starts (its process importing its flow, before its first heartbeat):
    # the worker goes with it, so nothing but the automation can mark it.
    starting_run = run_deployment(ui.api_url, "on-demand", {"config": QUICK_CONFIG})
    wait_while_starting(ui.api_url, tag, starting_run, with_process=True, timeout=300)
    kill_worker_and_its_flow_runs(tag)
    starting_killed_at = time.time()
    starting_since = state_time(ui.api_url, starting_run)  # its last state change: Submitting (or Pending)
    wait_for_text(ui.output, "(restart 2,", ui.process, timeout=60)
    # A run through the API, as the UI's Run button makes one, executed by the new worker.
    outputs = tmp_path / "outputs"
    flow_run_id = run_deployment(ui.api_url, "on-demand", {"config": QUICK_CONFIG | {"output_dir": str(outputs)}})
    assert wait_for_state(ui.api_url, flow_run_id, {"Completed"}, timeout=600) == "Completed"
    assert (next(outputs.glob("run-*")) / "report.md").is_file()

    # `faceflow run` in another terminal finds this server instead of starting its own.
    cli = subprocess.run(
        faceflow("run", "--json", "--members", "1", "--hidden-units", "16", "--epochs", "3", "--n-samples", "4",
                 "--steps", "3", "--output-dir", str(outputs)),
        env=ui.env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    cli_run = json.loads(cli.stdout.splitlines()[-1])["flow_run_id"]
    assert f"127.0.0.1:{ui.port}/runs/flow-run/{cli_run}" in cli.stderr

    # Ctrl-C while the (new) worker runs a long flow: everything stops, and the run is recorded as ended.
    long_run = run_deployment(ui.api_url, "on-demand", {"config": LONG_CONFIG | {"output_dir": str(outputs)}})
    assert wait_for_state(ui.api_url, long_run, {"Running"}, timeout=300) == "Running"
    wait_for_a_running_task(ui.api_url, long_run, timeout=300)  # into the flow's tasks
    # The killed retraining and its sub-flow: Crashed, only Crashed, within the documented window.
    for run in (killed_run, sub_flow):
        assert wait_for_state(ui.api_url, run, {"Crashed"}, timeout=180) == "Crashed"
    took = {}
    for name, run in (("retraining", killed_run), ("its sub-flow", sub_flow)):
        took[name], message = crashed_after(ui.api_url, run, killed_at)
        assert "no heartbeat or state change for 90 s" in message
    # The run killed while starting: Crashed three intervals after its last state change.
    assert wait_for_state(ui.api_url, starting_run, {"Crashed"}, timeout=180) == "Crashed"
    took["starting run, since its last state"], message = crashed_after(ui.api_url, starting_run, starting_since)
    assert "no heartbeat or state change for 90 s" in message
    starting_after_kill = crashed_after(ui.api_url, starting_run, starting_killed_at)[0]
    posted, body = receiver.wait_for(str(killed_run), "Crashed", timeout=60)
    assert "no heartbeat" in body
    print(f"Crashed after the kill: {took}; the starting run {starting_after_kill:.1f} s after its kill; "
          f"alerted {posted - state_time(ui.api_url, killed_run):.1f} s after")
    assert all(CRASHED_WINDOW[0] <= took[name] <= CRASHED_WINDOW[1] for name in ("retraining", "its sub-flow")), took
    assert SILENCE_WINDOW[0] <= took["starting run, since its last state"] <= SILENCE_WINDOW[1], took
    assert starting_after_kill <= CRASHED_WINDOW[1], starting_after_kill
    ui.ctrl_c()
    assert_no_process_left(tag)
    assert not (ui.home / SERVER_RECORD).exists()
    receiver.close()
    with local_server(ui.home, timeout=300) as server, client(server.api_url) as prefect:
        assert prefect.read_flow_run(long_run).state.name == "Crashed"


def wait_for_triggered_run(api_url: str, deployment: str, timeout: float) -> UUID:
    """The first flow run of ``deployment`` that an automation (a deployment trigger) created, once it exists."""
    deadline = time.monotonic() + timeout
    with client(api_url) as prefect:
        deployment_id = prefect.read_deployment_by_name(f"faceflow-retrain/{deployment}").id
        while time.monotonic() < deadline:
            for run in prefect.read_flow_runs():
                if run.deployment_id == deployment_id and run.created_by and run.created_by.type == "AUTOMATION":
                    return run.id
            time.sleep(0.5)  # poll interval of the bounded wait for the automation's flow run
    raise AssertionError(f"no run of {deployment} was created by its trigger within {timeout} s")


def test_a_second_make_ui_for_the_same_home_is_refused(tmp_path: Path, tag: str, data_file: Path, prefect_home: Path) -> None:
    ui = RunningUI(tmp_path, tag, data_file, prefect_home)
    second = subprocess.run(
        faceflow("ui", "--port", str(free_port())), env=ui.env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert second.returncode == 1 and f"already runs a server for PREFECT_HOME={ui.home}" in second.stderr
    # Without FACEFLOW_ALERT_BLOCK the notification automations exist, disabled, saying how to enable them.
    assert "alerts go nowhere until FACEFLOW_ALERT_BLOCK" in ui.output.read_text()
    automations = automations_by_name(ui.api_url)
    assert {name: [a.enabled for a in automations[name]] for name in NAMES} == {FAILED: [False], CHAMPION_CHANGED: [False],
                                                                                CRASHED: [True]}
    assert "FACEFLOW_ALERT_BLOCK" in automations[FAILED][0].description
    # A block that does not exist: refused, naming the variable, before the UI is up.
    missing = subprocess.run(
        faceflow("ui", "--port", str(free_port())), cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env=ui.env | {"PREFECT_API_URL": ui.api_url, "FACEFLOW_ALERT_BLOCK": "custom-webhook/no-such-block"},
    )
    assert missing.returncode == 1, missing.stderr[-3000:]
    assert "FACEFLOW_ALERT_BLOCK=custom-webhook/no-such-block" in missing.stderr and "faceflow UI:" not in missing.stdout
    assert len(tagged_processes(tag, lambda command: "prefect" in " ".join(command) and "server" in command)) == 1
    ui.ctrl_c()
    assert_no_process_left(tag)


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
