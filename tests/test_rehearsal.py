"""The several-machine set-up of docs/operations.md, rehearsed for real on one machine.

Two "machines" are two folders, each with its own PREFECT_HOME, outputs and processes (`make
ui`: a process worker on the faceflow-local pool; a `dask worker`). They share only what the docs
say they share: one Prefect server on PostgreSQL (machine A's `make ui` serves it), one folder
with the face store, the result storage and the registry, Redis for the cache's locks, and a
`dask scheduler`.

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

from services import Cluster, RedisServer
from support import (
    REPO_ROOT, AlertReceiver, RunningUI, assert_no_process_left, client, faceflow, save_webhook_block_at, wait_for_state,
    wait_for_text, write_png,
)
from test_ui import wait_for_triggered_run

FIGURES_VARIABLE = "FACEFLOW_REHEARSAL_FIGURES"
EPOCHS_VARIABLE = "FACEFLOW_REHEARSAL_EPOCHS"
UPSTREAM = ("split_faces", "fit_pca", "build_dataloader")  # fetch reads the faces version on every run, by design


class Machine:
    """One "machine": its folder, PREFECT_HOME, outputs, and the settings it shares with the other."""

    def __init__(self, name: str, root: Path, shared: Path, data_file: Path, redis_url: str) -> None:
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
        }
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


def start_dask(tag: str, machines: list[Machine], folder: Path) -> tuple[str, list[subprocess.Popen]]:
    """A `dask scheduler` (machine A's) and a 1-thread `dask worker` on each machine, once all are connected."""
    from distributed import Client

    scheduler_file = folder / "scheduler.json"
    started = [subprocess.Popen(
        [sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
         "--scheduler-file", str(scheduler_file)],
        env=machines[0].env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=(folder / "dask-scheduler.err").open("wb"),
    )]
    for machine in machines:
        started.append(subprocess.Popen(
            [sys.executable, "-m", "dask", "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
             "--nworkers", "1", "--host", "127.0.0.1", "--no-dashboard", "--name", machine.name],
            env=machine.env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=(machine.folder / "dask-worker.err").open("wb"),
        ))
    wait_for_text(scheduler_file, "tcp://", started[0], timeout=120)
    address = json.loads(scheduler_file.read_text())["address"]
    with Client(address, timeout=60) as dask_client:
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
        "base": {"data": {"validation_fraction": 0.1}, "train": {"epochs": epochs, "hidden_units": 64},
                 "output_dir": str(shared / "sweep-outputs")},
        "grid": {"train.learning_rate": [0.003, 0.005]},
    }
    path = shared / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def locks_taken(url: str) -> int:
    """How many times Redis was asked to set a key (a lock is a SET with NX and an expiry)."""
    import redis

    with redis.Redis.from_url(url) as connection:
        return int(connection.info("commandstats").get("cmdstat_set", {}).get("calls", 0))


def retrain_runs(api_url: str) -> list:
    """The retraining flow runs that ran (weekly-retrain's schedule also keeps next Mondays' runs Scheduled)."""
    with client(api_url) as prefect:
        flow_id = prefect.read_flow_by_name("faceflow-retrain").id
        return [run for run in prefect.read_flow_runs() if run.flow_id == flow_id and run.state.name != "Scheduled"]


def test_two_machines_share_one_server_store_registry_cache_and_cluster(tmp_path: Path, tag: str, data_file: Path, faces) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    cluster, redis, receiver = Cluster(), RedisServer(env={"FACEFLOW_TEST_TAG": tag}), AlertReceiver()
    machines: list[Machine] = []
    dask: list[subprocess.Popen] = []
    figures: dict[str, float] = {}
    try:
        cluster.start()
        redis.start()
        a, b = (Machine(name, tmp_path, shared, data_file, redis.url) for name in ("machine-a", "machine-b"))
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
        address, dask = start_dask(tag, machines, tmp_path)

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
        retrainings = [m.start(faceflow("retrain", "--epochs", "60", "--output-dir", str(m.outputs), "--json"), "retrain")
                       for m in machines]
        new_people = b.folder / "new-people"
        for k in range(6):  # mirrored faces of person 0: images the store does not hold
            write_png(new_people / "mirror-00" / f"{k}.png", faces.images[k][:, ::-1])
        ingested = b.finish(b.start(faceflow("ingest", str(new_people), "--json"), "ingest"), "ingest")
        assert ingested["version"]["number"] == 2
        for machine, process in zip(machines, retrainings):
            machine.finish(process, "retrain")
        triggered = wait_for_triggered_run(a.ui.api_url, "weekly-retrain", timeout=120)
        assert wait_for_state(a.ui.api_url, triggered, {"Completed"}, timeout=600) == "Completed"
        with client(a.ui.api_url) as prefect:
            card = next(artifact for artifact in prefect.read_latest_artifacts() if artifact.key == "faceflow-faces")
        # The dataset card of the triggered run: the version, who is new, and two figures (images
        # per person, the new faces).
        assert "Faces version 2" in card.data and "New people (1): mirror-00" in card.data
        assert card.data.count("data:image/png;base64,") == 2

        # A retraining that fails (its learning rate diverges) is alerted, naming its flow run.
        failing = a.start(faceflow("retrain", "--learning-rate", "1.0", "--epochs", "60", "--output-dir", str(a.outputs),
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
        assert locks_taken(redis.url) > 0  # the cache's locks went through Redis
        assert not any(m.home.joinpath("prefect.db").exists() for m in machines)  # the server kept to PostgreSQL
        assert cluster.query(f"select state_name from flow_run where id = '{triggered}'") == "Completed"
        figures["repeated sweep ÷ first sweep"] = figures["repeated sweep seconds"] / figures["first sweep seconds"]
        figures["upstream executions in all"] = max(sum(first["executions"][t].values()) for t in UPSTREAM)
        figures["lost leaderboard rows"] = len(runs) - len(rows)

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
    assert_no_process_left(tag)
    print(f"rehearsal figures: {json.dumps(figures)}")
    if os.environ.get(FIGURES_VARIABLE):
        Path(os.environ[FIGURES_VARIABLE]).write_text(json.dumps(figures, indent=1))
