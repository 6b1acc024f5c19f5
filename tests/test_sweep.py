"""`faceflow sweep` on a real 2-worker Dask LocalCluster against a real Prefect server: ranking, sharing, faults."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from support import (
    assert_no_process_left, faceflow, kill_tagged, light_config, listening_addresses, new_tag, only_loopback, tagged_env, tagged_processes,
)

# Two that train (long enough to be killed mid-way) and one that diverges.
GOOD_RATES = [0.003, 0.005]
DIVERGING_RATE = 1.0


def spec_file(folder: Path, outputs: Path, rates: list[float]) -> Path:
    spec = {
        "base": light_config({"data": {"validation_fraction": 0.1}, "train": {"epochs": 600}, "output_dir": str(outputs)}),
        "grid": {"train.learning_rate": rates},
    }
    path = folder / f"sweep-{len(rates)}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def dask_workers(tag: str) -> list[psutil.Process]:
    """The LocalCluster's worker processes (spawned by multiprocessing), among this test's processes."""
    return tagged_processes(tag, lambda command: "multiprocessing" in " ".join(command))


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, migrated_home: Path) -> Path:
    from conftest import copy_home

    return copy_home(migrated_home, tmp_path_factory.mktemp("sweep") / "home")


@pytest.fixture(scope="module")
def killed_sweep(home: Path, tmp_path_factory: pytest.TempPathFactory, data_file: Path) -> dict:
    """A sweep of two good configurations and a diverging one, one of its 2 Dask workers SIGKILLed mid-training.

    Module-scoped: the repeated sweep below is served from the cache this sweep fills.
    """
    folder, tag = tmp_path_factory.mktemp("killed-sweep"), new_tag()
    # A checkpoint every 0.2 s of training: its file on disk says a training is under way.
    env = tagged_env(tag, home, FACEFLOW_DATA_FILE=str(data_file), FACEFLOW_CHECKPOINT_SECONDS="0.2")
    stderr = folder / "stderr.txt"
    try:
        sweep = subprocess.Popen(
            faceflow("sweep", str(spec_file(folder, home.parent / "outputs", [*GOOD_RATES, DIVERGING_RATE])), "--workers", "2", "--json"),
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr.open("wb"),
        )
        deadline = time.monotonic() + 300
        while len(dask_workers(tag)) < 2 or not any((home / "checkpoints").glob("train_realnvp-*.pt")):
            assert sweep.poll() is None and time.monotonic() < deadline, stderr.read_text()[-3000:]
            time.sleep(0.1)  # poll interval of the bounded wait (300 s) for both workers and a checkpoint file
        listening = listening_addresses(tag)  # the server, the Dask scheduler, its workers and dashboard
        dask_workers(tag)[0].send_signal(signal.SIGKILL)  # mid-training
        stdout, _ = sweep.communicate(timeout=600)
        assert sweep.returncode == 0, stderr.read_text()[-3000:]
        assert_no_process_left(tag)
    finally:
        kill_tagged(tag)
    return json.loads(stdout.decode().splitlines()[-1]) | {"listening": listening}


def test_a_sweep_ranks_shares_upstream_and_survives_a_killed_worker_and_a_diverging_configuration(killed_sweep: dict) -> None:
    rows = killed_sweep["rows"]
    assert [row["rank"] for row in rows] == [1, 2, 3]
    scored = [row for row in rows if row["validation log p"] is not None]
    assert len(scored) == 2 and scored[0]["validation log p"] >= scored[1]["validation log p"]  # validation ranks
    assert rows[-1]["values"] == f"train.learning_rate={DIVERGING_RATE}" and "diverged" in rows[-1]["error"]
    assert "learning_rate" in rows[-1]["error"]
    for task in ("fetch_faces", "split_faces", "fit_pca", "build_dataloader"):  # the shared upstream, once
        assert killed_sweep["executions"][task] == {"Completed": 1}, (task, killed_sweep["executions"])
    assert killed_sweep["executions"]["score_model"] == {"Completed": 2}


def test_a_sweep_listens_on_loopback_only(killed_sweep: dict) -> None:
    assert len(killed_sweep["listening"]) >= 4 and only_loopback(killed_sweep["listening"]), killed_sweep["listening"]


def test_a_repeated_sweep_is_served_from_the_cache_without_a_cluster(
    home: Path, killed_sweep: dict, tmp_path: Path, data_file: Path, tag: str
) -> None:
    """The killed sweep's good configurations again: every step Cached, read where the flow runs, no Dask worker started."""
    env = tagged_env(tag, home, FACEFLOW_DATA_FILE=str(data_file))
    stderr = tmp_path / "stderr.txt"  # a file, not a pipe: nobody reads while the sweep runs, and a full pipe blocks it
    with stderr.open("wb") as output:
        sweep = subprocess.Popen(
            faceflow("sweep", str(spec_file(tmp_path, home.parent / "outputs", GOOD_RATES)), "--workers", "2", "--json"),
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=output,
        )
    started_workers = 0
    while sweep.poll() is None:
        started_workers = max(started_workers, len(dask_workers(tag)))
        time.sleep(0.1)
    stdout, _ = sweep.communicate(timeout=60)
    assert sweep.returncode == 0, stderr.read_text()[-3000:]
    result = json.loads(stdout.decode().splitlines()[-1])
    assert {task: set(states) for task, states in result["executions"].items()} == {
        task: {"Cached"} for task in ("split_faces", "fit_pca", "build_dataloader", "train_realnvp", "score_model")
    } | {"fetch_faces": {"Completed"}}  # the faces version is read on every run, never from the cache
    assert started_workers == 0
    assert_no_process_left(tag)


def test_a_bad_sweep_spec_is_refused_naming_the_field(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({"grid": {"train.learning_rat": [0.1]}}))
    refused = subprocess.run(faceflow("sweep", str(spec)), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "train.learning_rat" in refused.stderr and "not fields of the config tree" in refused.stderr
