"""What the `make ui` tests (test_ui.py, test_ui_stop.py) share: light run configs, the crash windows, and waits on runs."""

from __future__ import annotations

import os
import signal
import time
from uuid import UUID

import psutil

from support import client, flow_run_processes, flow_run_story, sub_flow_runs, tagged_processes

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
