"""`make ui` as a user runs it: a real server, `prefect deploy`, a worker, a deployment run, Ctrl-C."""

from __future__ import annotations

import datetime
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
from support import (
    LIGHT_OPTIONS, AlertReceiver, RunningUI, light_config, assert_no_process_left, client, faceflow, listening_addresses, only_loopback, run_deployment,
    save_webhook_block, tagged_processes, wait_for_state, wait_for_text,
)

QUICK_CONFIG = light_config({"train": {"epochs": 3}, "sample": {"n_samples": 4}, "interpolate": {"steps": 3}})


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


def kill_worker_and_its_flow_runs(tag: str) -> int:
    """SIGKILL the worker and the flow run processes it started, as a machine losing them would; the worker's pid."""
    worker = next(p for p in tagged_processes(tag) if p.cmdline()[2:5] == ["prefect", "worker", "start"])
    doomed = [*worker.children(recursive=True), worker]
    for process in doomed:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(doomed, timeout=30)
    return worker.pid


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

    # The worker is SIGKILLed with the retraining it runs: the UI stays up and starts another worker,
    # which takes the next runs; the dead run is marked Crashed (its heartbeats stopped) and alerted
    # below, once the runs in between have taken the minute that takes. (An ingest whose version
    # triggers weekly-retrain, and its alert of a promotion: tests/test_rehearsal.py.)
    killed_run = run_deployment(ui.api_url, "weekly-retrain", {"config": {"train": {"epochs": 20000},
                                                                          "data": {"validation_fraction": 0.1}}},
                                flow="faceflow-retrain")
    assert wait_for_state(ui.api_url, killed_run, {"Running"}, timeout=300) == "Running"
    wait_for_a_running_task(ui.api_url, killed_run, timeout=300)  # past its first heartbeat, into its tasks
    kill_worker_and_its_flow_runs(tag)
    killed_at = time.time()
    wait_for_text(ui.output, "started worker faceflow-", ui.process, timeout=60)
    assert is_healthy(ui.api_url)
    # A run through the API, as the UI's Run button makes one, executed by the new worker.
    outputs = tmp_path / "outputs"
    flow_run_id = run_deployment(ui.api_url, "on-demand", {"config": QUICK_CONFIG | {"output_dir": str(outputs)}})
    assert wait_for_state(ui.api_url, flow_run_id, {"Completed"}, timeout=600) == "Completed"
    assert (next(outputs.glob("run-*")) / "report.md").is_file()

    # `faceflow run` in another terminal finds this server instead of starting its own.
    cli = subprocess.run(
        faceflow("run", "--json", "--epochs", "3", "--n-samples", "4", "--steps", "3", *LIGHT_OPTIONS, "--output-dir", str(outputs)),
        env=ui.env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    cli_run = json.loads(cli.stdout.splitlines()[-1])["flow_run_id"]
    assert f"127.0.0.1:{ui.port}/runs/flow-run/{cli_run}" in cli.stderr

    # Ctrl-C while the (new) worker runs a long flow: everything stops, and the run is recorded as ended.
    long_run = run_deployment(ui.api_url, "on-demand", {"config": {"train": {"epochs": 20000}, "output_dir": str(outputs)}})
    assert wait_for_state(ui.api_url, long_run, {"Running"}, timeout=300) == "Running"
    wait_for_a_running_task(ui.api_url, long_run, timeout=300)  # into the flow's tasks
    assert wait_for_state(ui.api_url, killed_run, {"Crashed"}, timeout=180) == "Crashed"
    crashed_at = state_time(ui.api_url, killed_run)
    posted, body = receiver.wait_for(str(killed_run), "Crashed", timeout=60)
    assert "no heartbeat" in body
    print(f"killed run Crashed {crashed_at - killed_at:.1f} s after the kill, alerted {posted - crashed_at:.1f} s later")
    ui.ctrl_c()
    assert_no_process_left(tag)
    assert not (ui.home / SERVER_RECORD).exists()
    receiver.close()
    with local_server(ui.home, timeout=300) as server, client(server.api_url) as prefect:
        assert prefect.read_flow_run(long_run).state.name in {"Crashed", "Cancelled"}


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
    assert len([p for p in tagged_processes(tag) if "prefect" in " ".join(p.cmdline()) and "server" in p.cmdline()]) == 1
    ui.ctrl_c()
    assert_no_process_left(tag)
