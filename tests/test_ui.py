"""`make ui` as a user runs it: a real server, `prefect deploy`, a worker, a deployment run, Ctrl-C."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from uuid import UUID


from commands.server import SERVER_RECORD, free_port, is_healthy, local_server
from support import (
    RunningUI, assert_no_process_left, client, faceflow, listening_addresses, only_loopback, run_deployment,
    tagged_processes, wait_for_state, write_png,
)

QUICK_CONFIG = {"train": {"epochs": 3}, "sample": {"n_samples": 4}, "interpolate": {"steps": 3}}


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


def test_make_ui_serves_deployments_a_worker_and_runs_then_stops_on_ctrl_c(
    tmp_path: Path, tag: str, data_file: Path, prefect_home: Path, faces
) -> None:
    ui = RunningUI(tmp_path, tag, data_file, prefect_home, FACEFLOW_FACES_DIR=str(tmp_path / "faces"),
                   FACEFLOW_MODELS_DIR=str(tmp_path / "models"))
    assert is_healthy(ui.api_url)
    with client(ui.api_url) as prefect:
        assert sorted(d.name for d in prefect.read_deployments()) == ["forget", "ingest", "on-demand", "rollback", "sweep", "weekly-retrain"]
        assert [w.status for w in prefect.read_workers_for_work_pool("faceflow-local")] == ["ONLINE"]
    record = json.loads((ui.home / SERVER_RECORD).read_text())
    assert record["api_url"] == ui.api_url
    listening = listening_addresses(tag)  # the server and UI; the worker listens on nothing
    assert f"127.0.0.1:{ui.port}" in listening and only_loopback(listening), listening

    # A run through the API, as the UI's Run button makes one, executed by the worker.
    outputs = tmp_path / "outputs"
    flow_run_id = run_deployment(ui.api_url, "on-demand", {"config": QUICK_CONFIG | {"output_dir": str(outputs)}})
    assert wait_for_state(ui.api_url, flow_run_id, {"Completed"}, timeout=600) == "Completed"
    assert (next(outputs.glob("run-*")) / "report.md").is_file()

    # `faceflow run` in another terminal finds this server instead of starting its own.
    cli = subprocess.run(
        faceflow("run", "--json", "--epochs", "3", "--n-samples", "4", "--steps", "3", "--output-dir", str(outputs)),
        env=ui.env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    cli_run = json.loads(cli.stdout.splitlines()[-1])["flow_run_id"]
    assert f"127.0.0.1:{ui.port}/runs/flow-run/{cli_run}" in cli.stderr

    # `faceflow ingest` in another terminal: a new faces version, announced as an event, triggers
    # weekly-retrain through its deployment trigger (no direct call), which the worker starts.
    new_people = tmp_path / "new-people"
    for person in (0, 1):  # mirrored faces: new images, which the store does not hold
        for k in range(5):
            write_png(new_people / f"mirror-{person:02d}" / f"{k}.png", faces.images[person * 10 + k][:, ::-1])
    ingested = subprocess.run(faceflow("ingest", str(new_people), "--json"), env=ui.env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
    assert ingested.returncode == 0, ingested.stderr[-3000:]
    version = json.loads(ingested.stdout.splitlines()[-1])["version"]
    assert (version["number"], version["added"], version["people"]) == (2, 10, 42)
    triggered = wait_for_triggered_run(ui.api_url, "weekly-retrain", timeout=120)
    assert wait_for_state(ui.api_url, triggered, {"Completed"}, timeout=600) == "Completed"
    rows = json.loads((tmp_path / "models" / "leaderboard.json").read_text())
    # It trained on the new version (latest) and became the first champion.
    assert [(row["faces version"], row["promoted"]) for row in rows] == [(version["id"], True)]
    with client(ui.api_url) as prefect:
        card = next(artifact for artifact in prefect.read_latest_artifacts() if artifact.key == "faceflow-faces")
    # The dataset card: the version, who is new, and two figures (images per person, the new faces).
    assert "Faces version 2" in card.data and "New people (2): mirror-00, mirror-01" in card.data
    assert card.data.count("data:image/png;base64,") == 2

    # Ctrl-C while the worker runs a long flow: everything stops, and the run is recorded as ended.
    long_run = run_deployment(ui.api_url, "on-demand", {"config": {"train": {"epochs": 20000}, "output_dir": str(outputs)}})
    assert wait_for_state(ui.api_url, long_run, {"Running"}, timeout=300) == "Running"
    wait_for_a_running_task(ui.api_url, long_run, timeout=300)  # into the flow's tasks
    ui.ctrl_c()
    assert_no_process_left(tag)
    assert not (ui.home / SERVER_RECORD).exists()
    with local_server(ui.home, timeout=300) as server, client(server.api_url) as prefect:
        assert prefect.read_flow_run(long_run).state.name in {"Crashed", "Cancelled"}
        ingest_flow = prefect.read_flow_by_name("faceflow-ingest").id
        # The CLI ran the ingest flow on this server, so its dataset card is in the UI too.
        assert [run.state.name for run in prefect.read_flow_runs() if run.flow_id == ingest_flow] == ["Completed"]


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
    assert len([p for p in tagged_processes(tag) if "prefect" in " ".join(p.cmdline()) and "server" in p.cmdline()]) == 1
    ui.ctrl_c()
    assert_no_process_left(tag)
