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

from support import assert_no_process_left, faceflow, tagged_env, tagged_processes

# Two that train (long enough to be killed mid-way) and one that diverges.
GOOD_RATES = [0.003, 0.005]
DIVERGING_RATE = 1.0


def spec_file(folder: Path, outputs: Path, rates: list[float]) -> Path:
    spec = {
        "base": {"data": {"validation_per_person": 1}, "train": {"epochs": 600, "hidden_units": 64}, "output_dir": str(outputs)},
        "grid": {"train.learning_rate": rates},
    }
    path = folder / f"sweep-{len(rates)}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def dask_workers(tag: str) -> list[psutil.Process]:
    """The LocalCluster's worker processes (spawned by multiprocessing), among this test's processes."""
    return [p for p in tagged_processes(tag) if "multiprocessing" in " ".join(p.cmdline())]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, migrated_home: Path) -> Path:
    from conftest import copy_home

    return copy_home(migrated_home, tmp_path_factory.mktemp("sweep") / "home")


def test_a_sweep_ranks_shares_upstream_and_survives_a_killed_worker_and_a_diverging_configuration(
    home: Path, tmp_path: Path, data_file: Path, tag: str
) -> None:
    env = tagged_env(tag, home, FACEFLOW_DATA_FILE=str(data_file))
    stderr = tmp_path / "stderr.txt"
    sweep = subprocess.Popen(
        faceflow("sweep", str(spec_file(tmp_path, home.parent / "outputs", [*GOOD_RATES, DIVERGING_RATE])), "--workers", "2", "--json"),
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr.open("wb"),
    )
    deadline = time.monotonic() + 300
    while len(dask_workers(tag)) < 2 or "train_realnvp" not in stderr.read_text(errors="replace"):
        assert sweep.poll() is None and time.monotonic() < deadline, stderr.read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(2.0)  # into the trainings
    dask_workers(tag)[0].send_signal(signal.SIGKILL)
    stdout, _ = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, stderr.read_text()[-3000:]
    result = json.loads(stdout.decode().splitlines()[-1])
    rows = result["rows"]
    assert [row["rank"] for row in rows] == [1, 2, 3]
    scored = [row for row in rows if row["validation log p"] is not None]
    assert len(scored) == 2 and scored[0]["validation log p"] >= scored[1]["validation log p"]  # validation ranks
    assert rows[-1]["values"] == f"train.learning_rate={DIVERGING_RATE}" and "diverged" in rows[-1]["error"]
    assert "learning_rate" in rows[-1]["error"]
    for task in ("fetch_faces", "split_faces", "fit_pca", "build_dataloader"):  # the shared upstream, once
        assert result["executions"][task] == {"Completed": 1}, (task, result["executions"])
    assert result["executions"]["score_model"] == {"Completed": 2}
    assert_no_process_left(tag)


def test_a_repeated_sweep_is_served_from_the_cache_without_a_cluster(home: Path, tmp_path: Path, data_file: Path, tag: str) -> None:
    """The same good configurations again: every step Cached, read where the flow runs, no Dask worker started."""
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
        task: {"Cached"} for task in ("fetch_faces", "split_faces", "fit_pca", "build_dataloader", "train_realnvp", "score_model")
    }
    assert started_workers == 0
    assert_no_process_left(tag)


def test_a_bad_sweep_spec_is_refused_naming_the_field(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({"grid": {"train.learning_rat": [0.1]}}))
    refused = subprocess.run(faceflow("sweep", str(spec)), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "train.learning_rat" in refused.stderr and "not fields of the config tree" in refused.stderr
