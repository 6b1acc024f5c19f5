"""`make ui` as a user runs it: a real server, `prefect deploy`, a worker, a deployment run, Ctrl-C.

Stopping it while runs start, and its worker's restarts: test_ui_stop.py (a module of its own, so that
pytest-xdist runs the two side by side).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path


from commands.alerts import CHAMPION_CHANGED, CRASHED, FAILED, NAMES
from commands.server import SERVER_RECORD, free_port, is_healthy, local_server
from support import (
    AlertReceiver, RunningUI, assert_no_process_left, client, faceflow, listening_addresses,
    only_loopback, run_deployment, save_webhook_block, tagged_processes, wait_for_state, wait_for_text,
)
from ui_runs import (
    CRASHED_WINDOW, LONG_CONFIG, QUICK_CONFIG, RETRAIN_LONG, SILENCE_WINDOW, automations_by_name, crashed_after,
    kill_worker_and_its_flow_runs, set_up_alerts_again, state_time, wait_for_a_running_task, wait_for_sub_flow,
    wait_while_starting,
)


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
