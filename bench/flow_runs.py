"""Whole-flow timings: a cold run in a fresh process, then cached re-runs in one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from faceflow.server import local_server

REPO_ROOT = Path(__file__).resolve().parent.parent


def _tree_rss(process: psutil.Process) -> int:
    """Resident memory of a process and all its descendants (the temporary server included)."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_and_watch(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, int, str]:
    """(wall seconds, peak resident bytes of the process tree, stdout)."""
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    watched, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            peak = max(peak, _tree_rss(watched))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    stdout = child.stdout.read()
    wall = time.perf_counter() - started
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit code {child.returncode}")
    return wall, peak, stdout


def prepare_database(home: Path) -> None:
    """Create and migrate a Prefect database in ``home`` by starting and stopping a server once."""
    home.mkdir(parents=True, exist_ok=True)
    with local_server(home, timeout=300):
        pass


def cold_run(workdir: Path, data_file: Path) -> dict:
    """`faceflow run` with defaults: empty result storage, a fresh process, the temporary server's start.

    Whether Prefect's database already exists in PREFECT_HOME is the caller's choice: a first
    use on a machine also pays for creating and migrating it.
    """
    env = os.environ | {"PREFECT_HOME": str(workdir / "prefect"), "FACEFLOW_DATA_FILE": str(data_file),
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "faceflow.cli", "run", "--json", "--output-dir", str(workdir / "outputs")]
    wall, peak, stdout = run_and_watch(command, env, workdir)
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_seconds": wall, "peak_rss_bytes": peak, "tasks": summary["tasks"], "metrics": summary["metrics"]}


def first_use_cold_run(data_file: Path) -> dict:
    """A cold run in a new PREFECT_HOME: the run also creates and migrates Prefect's database."""
    with tempfile.TemporaryDirectory(prefix="faceflow-bench-") as first_use:
        return cold_run(Path(first_use), data_file)


def existing_database_cold_run(migrated_home: Path, workdir: Path, data_file: Path) -> dict:
    """A cold run in ``workdir`` with a copy of an already migrated PREFECT_HOME and empty result storage.

    A copy, not the home itself: result storage lives in PREFECT_HOME, and a shared one would
    hand a second cold run the first one's cached results.
    """
    shutil.copytree(migrated_home, workdir / "prefect")
    return cold_run(workdir, data_file)


RERUN_SCRIPT = """
import json, os, sys, time
from pathlib import Path
from faceflow.config import FaceflowConfig
from faceflow.runner import run_pipeline
# The same config as the cold `faceflow run`, whose --data-file came from FACEFLOW_DATA_FILE.
config = FaceflowConfig.model_validate({"output_dir": sys.argv[1], "data": {"data_file": os.environ["FACEFLOW_DATA_FILE"]}})
timings = {}
for name, variant in (("identical", config),
                      ("downstream_only", config.model_copy(update={"sample": config.sample.model_copy(update={"n_samples": 12})}))):
    started = time.perf_counter()
    summary = run_pipeline(variant)
    timings[name] = {"wall_seconds": time.perf_counter() - started, "tasks": summary["tasks"]}
print(json.dumps(timings))
"""


def cached_reruns(workdir: Path, data_file: Path) -> dict:
    """In one process against one running server: identical re-run, then a downstream-only change."""
    home = workdir / "prefect"  # the cold run's database and result storage: no second database to migrate
    with local_server(home, timeout=300) as running:
        api_url = running.api_url
        env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_API_URL": api_url,
                            "FACEFLOW_DATA_FILE": str(data_file)}
        result = subprocess.run(
            [sys.executable, "-c", RERUN_SCRIPT, str(workdir / "outputs")], env=env, cwd=workdir,
            capture_output=True, text=True, check=True,
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def lab_script(data_file: Path) -> dict:
    """The lab's plain script in a fresh process: wall time from launch to exit."""
    env = os.environ | {"FACEFLOW_DATA_FILE": str(data_file), "PYTHONPATH": str(REPO_ROOT)}
    wall, peak, stdout = run_and_watch([sys.executable, "-m", "bench.lab_script"], env, REPO_ROOT)
    return json.loads(stdout.strip().splitlines()[-1]) | {"wall_seconds": wall, "peak_rss_bytes": peak}
