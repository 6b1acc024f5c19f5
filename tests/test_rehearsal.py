"""The several-machine set-up of docs/operations.md, rehearsed for real on one machine.

Two "machines" are two folders, each with its own PREFECT_HOME, outputs and processes (`make
ui`: a process worker on the faceflow-local pool; a `dask worker`). They share only what the docs
say they share: one Prefect server on PostgreSQL (machine A's `make ui` serves it), one folder
with the face store, the result storage and the registry, Redis for the cache's locks, and a
`dask scheduler`. Every service is secured as docs/operations.md says: the server requires an auth
string (FACEFLOW_AUTH_FILE, CSRF on), Redis a password, the Dask scheduler TLS certificates made
here; and the test checks that none of the three lets in a client without the credentials.

`make rehearsal` runs this test alone and prints its figures; with FACEFLOW_REHEARSAL_FIGURES
set to a file, the figures are also written there as JSON (`make bench` reads them, and sets
FACEFLOW_REHEARSAL_EPOCHS to time a sweep of bench/sweeps.py's length).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from services import Cluster, RedisServer, dask_tls_arguments, dask_tls_env, make_tls_files
from support import (
    REPO_ROOT, AlertReceiver, RunningUI, assert_no_process_left, client, faceflow, save_webhook_block_at, wait_for_state,
    wait_for_text, write_png,
)
from test_security_services import _client_context, _scheduler_answers, request
from ui_runs import wait_for_triggered_run

FIGURES_VARIABLE = "FACEFLOW_REHEARSAL_FIGURES"
EPOCHS_VARIABLE = "FACEFLOW_REHEARSAL_EPOCHS"
UPSTREAM = ("split_faces", "fit_pca", "build_dataloader")  # fetch reads the faces version on every run, by design


class Machine:
    """One "machine": its folder, PREFECT_HOME, outputs, and the settings it shares with the other."""

    def __init__(self, name: str, root: Path, shared: Path, data_file: Path, redis_url: str, secured: dict[str, str]) -> None:
        self.name = name
        self.folder = root / name
        self.home = self.folder / "prefect-home"
        self.outputs = self.folder / "outputs"
        self.home.mkdir(parents=True)
        self.settings = {
            "FACEFLOW_FACES_DIR": str(shared / "faces"),
            "FACEFLOW_MODELS_DIR": str(shared / "models"),
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(shared / "results"),
            "FACEFLOW_REDIS_URL": redis_url,
        } | secured
        self.data_file = data_file
        self.ui: RunningUI | None = None

    def start_ui(self, tag: str, **extra: str) -> RunningUI:
        self.ui = RunningUI(self.folder, tag, self.data_file, self.home, name="make-ui", **self.settings, **extra)
        return self.ui

    @property
    def env(self) -> dict[str, str]:
        assert self.ui is not None
        return self.ui.env | {"PREFECT_API_URL": self.ui.api_url}

    def start(self, arguments: list[str], log: str) -> subprocess.Popen:
        """A command on this machine, its output in a file of its folder (nobody reads a pipe while it runs)."""
        return subprocess.Popen(
            arguments, env=self.env, cwd=self.folder, stdin=subprocess.DEVNULL,
            stdout=(self.folder / f"{log}.out").open("wb"), stderr=(self.folder / f"{log}.err").open("wb"),
        )

    def finish(self, process: subprocess.Popen, log: str, timeout: float = 600) -> dict:
        """Wait for a command started with ``start``; its last stdout line as JSON."""
        assert process.wait(timeout=timeout) == 0, (self.folder / f"{log}.err").read_text()[-4000:]
        return json.loads((self.folder / f"{log}.out").read_text().splitlines()[-1])


def start_dask(tag: str, machines: list[Machine], folder: Path, tls: dict[str, Path]) -> tuple[str, list[subprocess.Popen]]:
    """A TLS `dask scheduler` (machine A's) and a 1-thread `dask worker` on each machine, once all are connected."""
    from distributed import Client

    from distributed.security import Security

    scheduler_file = folder / "scheduler.json"
    started = [subprocess.Popen(
        [sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--protocol", "tls",
         "--scheduler-file", str(scheduler_file), *dask_tls_arguments(tls, "scheduler")],
        env=machines[0].env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=(folder / "dask-scheduler.err").open("wb"),
    )]
    for machine in machines:
        started.append(subprocess.Popen(
            [sys.executable, "-m", "dask", "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
             "--nworkers", "1", "--host", "127.0.0.1", "--no-dashboard", "--name", machine.name,
             *dask_tls_arguments(tls, "worker")],
            env=machine.env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=(machine.folder / "dask-worker.err").open("wb"),
        ))
    wait_for_text(scheduler_file, "tls://", started[0], timeout=120)
    address = json.loads(scheduler_file.read_text())["address"]
    security = Security(tls_ca_file=str(tls["ca"]), tls_client_cert=str(tls["client-cert"]),
                        tls_client_key=str(tls["client-key"]), require_encryption=True)
    with Client(address, timeout=60, security=security) as dask_client:
        dask_client.wait_for_workers(len(machines), timeout=180)
    return address, started


def stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM (a background job's processes ignore SIGINT), then wait for each to exit."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        process.wait(timeout=60)


def sweep_spec(shared: Path) -> Path:
    """Two configurations; each trains FACEFLOW_REHEARSAL_EPOCHS epochs (300: enough to check; the bench times 2500)."""
    epochs = int(os.environ.get(EPOCHS_VARIABLE, "300"))
    spec = {
        "base": {"data": {"validation_fraction": 0.1}, "train": {"epochs": epochs, "hidden_units": 64, "members": 1},
                 "output_dir": str(shared / "sweep-outputs")},
        "grid": {"train.learning_rate": [0.003, 0.005]},
    }
    path = shared / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def task_runs(api_url: str, flow_run_id: str, name: str) -> list:
    """The task runs named ``name`` of one flow run."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName

    with client(api_url) as prefect:
        return prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                      task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=name)))


def reachable_without_credentials(api_url: str, redis_port: int, dask_address: str, tls: dict[str, Path]) -> list[str]:
    """Which of the three services lets in a client without its credentials (the secured set-up: none)."""
    from redis import Redis
    from redis.exceptions import AuthenticationError

    reachable = []
    if request(f"{api_url}/admin/version") != 401:
        reachable.append("Prefect API")
    try:
        with Redis(host="127.0.0.1", port=redis_port) as stranger:
            stranger.set("faceflow-planted-lock", "stall", nx=True)
        reachable.append("Redis")
    except AuthenticationError:
        pass
    if _scheduler_answers(dask_address, _client_context(tls["ca"])):  # trusts the CA, holds no certificate
        reachable.append("Dask scheduler")
    return reachable


def retrain_runs(api_url: str) -> list:
    """The retraining flow runs that ran (weekly-retrain's schedule also keeps next Mondays' runs Scheduled)."""
    with client(api_url) as prefect:
        flow_id = prefect.read_flow_by_name("faceflow-retrain").id
        return [run for run in prefect.read_flow_runs() if run.flow_id == flow_id and run.state.name != "Scheduled"]


def test_two_machines_share_one_server_store_registry_cache_and_cluster(tmp_path: Path, tag: str, data_file: Path, faces) -> None:
    from prefect.settings import PREFECT_API_AUTH_STRING, temporary_settings

    shared = tmp_path / "shared"
    shared.mkdir()
    secret = "faceflow:rehearsal-auth-string"
    auth_file = tmp_path / "prefect-auth"  # each machine's copy of the server's auth string
    auth_file.write_text(secret)
    auth_file.chmod(0o600)
    tls = make_tls_files(tmp_path / "tls")
    secured = {"FACEFLOW_AUTH_FILE": str(auth_file), **dask_tls_env(tls, "client")}
    settings = temporary_settings({PREFECT_API_AUTH_STRING: secret})  # this test's own Prefect client
    settings.__enter__()
    cluster, redis, receiver = Cluster(), RedisServer(env={"FACEFLOW_TEST_TAG": tag}, password="rehearsal-redis-password"), AlertReceiver()
    machines: list[Machine] = []
    dask: list[subprocess.Popen] = []
    figures: dict[str, float] = {}
    try:
        cluster.start()
        redis.start()
        a, b = (Machine(name, tmp_path, shared, data_file, redis.url, secured) for name in ("machine-a", "machine-b"))
        machines = [a, b]
        a.start_ui(tag, PREFECT_API_DATABASE_CONNECTION_URL=cluster.url)  # the server, on PostgreSQL
        # B's make ui deploys again (idempotent), adds its worker, and points the alerts at a webhook.
        block = save_webhook_block_at(a.ui.api_url, receiver.url, "rehearsal-alerts")
        b.start_ui(tag, PREFECT_API_URL=a.ui.api_url, FACEFLOW_ALERT_BLOCK=block)
        with client(a.ui.api_url) as prefect:
            workers = prefect.read_workers_for_work_pool("faceflow-local")
            assert len(workers) == 2 and {w.status for w in workers} == {"ONLINE"}, workers
            # Every run the pool's workers start sends the heartbeat the crash automation watches.
            template = prefect.read_work_pool("faceflow-local").base_job_template
            assert template["variables"]["properties"]["env"]["default"] == {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
        address, dask = start_dask(tag, machines, tmp_path, tls)
        # None of the three services lets in a client without its credentials.
        unsecured = reachable_without_credentials(a.ui.api_url, redis.port, address, tls)
        figures["services reachable without credentials"] = len(unsecured)
        assert unsecured == []

        # Two machines contend for one cache key at once (one Redis lock): the same light run on both;
        # one computes the training, the other waits on its lock and reads it Cached.
        light = ["--epochs", "150", "--hidden-units", "32", "--members", "1", "--validation-fraction", "0.15", "--json"]  # shares no step with the sweep
        both = [m.start(faceflow("run", *light, "--output-dir", str(m.outputs / "contended")), "contended") for m in machines]
        contended = [m.finish(process, "contended") for m, process in zip(machines, both)]
        trained = [task_runs(a.ui.api_url, run["flow_run_id"], "train_realnvp")[0] for run in contended]
        assert sorted(run.state.name for run in trained) == ["Cached", "Completed"], [run.state for run in trained]
        computed = next(run for run in trained if run.state.name == "Completed")
        waited = next(run for run in trained if run.state.name == "Cached")
        assert waited.created < computed.end_time  # it existed while the other computed: it waited on the lock

        # A sweep from A on the shared cluster: its shared upstream runs once.
        spec = sweep_spec(shared)
        began = time.monotonic()
        first = a.finish(a.start(faceflow("sweep", str(spec), "--dask-address", address, "--json"), "sweep"), "sweep")
        figures["first sweep seconds"] = time.monotonic() - began
        for task in UPSTREAM:
            assert first["executions"][task] == {"Completed": 1}, first["executions"]
        assert first["executions"]["train_realnvp"] == {"Completed": 2}
        # The same sweep from B: every step read from the shared cache, nothing computed again.
        began = time.monotonic()
        again = b.finish(b.start(faceflow("sweep", str(spec), "--dask-address", address, "--json"), "sweep"), "sweep")
        figures["repeated sweep seconds"] = time.monotonic() - began
        for task in (*UPSTREAM, "train_realnvp", "score_model"):
            assert set(again["executions"][task]) == {"Cached"}, again["executions"]
        assert [r["validation log p"] for r in again["rows"]] == [r["validation log p"] for r in first["rows"]]

        # Two retrainings at once, one per machine, and an ingest on B whose new version triggers
        # weekly-retrain on whichever worker takes it: all three promote into one registry.
        began = time.monotonic()
        retrainings = [m.start(faceflow("retrain", "--epochs", "60", "--members", "1", "--hidden-units", "64", "--output-dir", str(m.outputs), "--json"), "retrain")
                       for m in machines]
        new_people = b.folder / "new-people"
        for k in range(6):  # mirrored faces of person 0: images the store does not hold
            write_png(new_people / "mirror-00" / f"{k}.png", faces.images[k][:, ::-1])
        ingested = b.finish(b.start(faceflow("ingest", str(new_people), "--json"), "ingest"), "ingest")
        assert ingested["version"]["number"] == 2
        for machine, process in zip(machines, retrainings):
            machine.finish(process, "retrain")
        figures["two retrainings seconds"] = time.monotonic() - began
        triggered = wait_for_triggered_run(a.ui.api_url, "weekly-retrain", timeout=120)
        assert wait_for_state(a.ui.api_url, triggered, {"Completed"}, timeout=600) == "Completed"
        with client(a.ui.api_url) as prefect:
            card = next(artifact for artifact in prefect.read_latest_artifacts() if artifact.key == "faceflow-faces")
        # The dataset card of the triggered run: the version, who is new, and two figures (images
        # per person, the new faces).
        assert "Faces version 2" in card.data and "New people (1): mirror-00" in card.data
        assert card.data.count("data:image/png;base64,") == 2

        # A retraining that fails (its learning rate diverges) is alerted, naming its flow run.
        failing = a.start(faceflow("retrain", "--learning-rate", "1.0", "--epochs", "60", "--members", "1", "--output-dir", str(a.outputs),
                                   "--json"), "failing")
        assert failing.wait(timeout=300) == 1
        failed = [run for run in retrain_runs(a.ui.api_url) if run.state.name == "Failed"]
        assert len(failed) == 1
        posted, _ = receiver.wait_for(str(failed[0].id), "Failed", "training diverged",
                                      f"{a.ui.url}/runs/flow-run/{failed[0].id}", timeout=60)  # with its page in the UI
        figures["failed run -> alert seconds"] = posted - failed[0].state.timestamp.timestamp()
        receiver.wait_for("faceflow.champion.promoted", timeout=60)  # and the promotions were announced

        # Afterwards: one champion, named alike by the link, the Variable and the leaderboard, and
        # every challenger (each retrain flow run) has its row.
        runs = retrain_runs(a.ui.api_url)
        assert sorted(run.state.name for run in runs) == ["Completed"] * 3 + ["Failed"]
        rows = json.loads((shared / "models" / "leaderboard.json").read_text())
        assert len(rows) == 4, rows  # the failed challenger's too, with why
        assert ingested["version"]["id"] in {r["faces version"] for r in rows}  # the triggered one trained on it
        assert [r["promoted"] for r in rows].count(True) >= 1  # the first to finish promoted against no champion
        history = a.finish(a.start(faceflow("champion", "--history", "--json"), "history"), "history")
        assert len([c for c in history if c["current"]]) == 1
        checked = b.finish(b.start(faceflow("champion", "--check", "--json"), "check"), "check")
        assert checked == {"found": []}  # link, Variable and leaderboard agree, read from machine B
        assert not any(m.home.joinpath("prefect.db").exists() for m in machines)  # the server kept to PostgreSQL
        assert cluster.query(f"select state_name from flow_run where id = '{triggered}'") == "Completed"
        figures["repeated sweep ÷ first sweep"] = figures["repeated sweep seconds"] / figures["first sweep seconds"]
        figures["upstream executions in all"] = max(sum(first["executions"][t].values()) for t in UPSTREAM)
        # Counted apart from the assertions above: the retraining runs PostgreSQL holds, against the
        # leaderboard rows that name them.
        finished = set(cluster.query("select f.id from flow_run f join flow on f.flow_id = flow.id where flow.name = "
                                     "'faceflow-retrain' and f.state_name in ('Completed', 'Failed')").split())
        figures["lost leaderboard rows"] = len(finished - {r.get("flow run") for r in rows})
        assert len(finished) == 4 and figures["lost leaderboard rows"] == 0

        b.ui.ctrl_c()
        a.ui.ctrl_c()
        stop(dask)
    finally:
        for machine in machines:
            if machine.ui is not None and machine.ui.process.poll() is None:
                os.killpg(machine.ui.process.pid, signal.SIGTERM)
        stop(dask)
        redis.stop()
        cluster.stop()
        receiver.close()
        settings.__exit__(None, None, None)
    assert_no_process_left(tag)
    print(f"rehearsal figures: {json.dumps(figures)}")
    if os.environ.get(FIGURES_VARIABLE):
        Path(os.environ[FIGURES_VARIABLE]).write_text(json.dumps(figures, indent=1))
