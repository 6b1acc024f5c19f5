"""Whole-flow timings: a cold run in a fresh process, then cached re-runs in one process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil

from commands.server import free_port, local_server

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


def cli_env(home: Path, data_file: Path) -> dict[str, str]:
    """A faceflow command's environment: its own PREFECT_HOME, the data file, no telemetry, no outside server."""
    env = os.environ | {"PREFECT_HOME": str(home), "FACEFLOW_DATA_FILE": str(data_file),
                        "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    return env


def cold_run(workdir: Path, data_file: Path) -> dict:
    """`faceflow run` with defaults in a fresh process; with an empty ``workdir``, nothing is cached.

    Whether Prefect's database already exists in PREFECT_HOME is the caller's choice: a first
    use on a machine also pays for creating and migrating it. Run again in the same ``workdir``
    it is an identical re-run as a new process: every task cached, the server started again.
    """
    command = [sys.executable, "-m", "commands.cli", "run", "--json", "--output-dir", str(workdir / "outputs")]
    wall, peak, stdout = run_and_watch(command, cli_env(workdir / "prefect", data_file), workdir)
    summary = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_seconds": wall, "peak_rss_bytes": peak, "tasks": summary["tasks"], "metrics": summary["metrics"]}


def reruns_beside_ui(workdir: Path, data_file: Path, repeats: int) -> list[dict]:
    """Identical re-runs as new processes while `faceflow ui` (what `make ui` runs) serves their PREFECT_HOME."""
    log = workdir / "ui.log"
    with log.open("wb") as output:
        ui = subprocess.Popen(
            [sys.executable, "-m", "commands.cli", "ui", "--port", str(free_port())], env=cli_env(workdir / "prefect", data_file),
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 600
        while "faceflow UI:" not in log.read_text(errors="replace"):
            if ui.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"faceflow ui did not come up:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        return [cold_run(workdir, data_file) for _ in range(repeats)]
    finally:
        os.killpg(ui.pid, signal.SIGINT)
        ui.wait(timeout=120)


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
from commands.runner import run_pipeline
# The same config as the cold `faceflow run`, whose --data-file came from FACEFLOW_DATA_FILE.
config = FaceflowConfig.model_validate({"output_dir": sys.argv[1], "data": {"data_file": os.environ["FACEFLOW_DATA_FILE"]}})
timings = {}
for name, variant in (("identical", config),
                      ("downstream_only", config.model_copy(update={"sample": config.sample.model_copy(update={"n_samples": 12})}))):
    started = time.perf_counter()
    summary = run_pipeline(variant, os.environ["PREFECT_API_URL"])
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


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Live processes carrying ``tag`` in their environment: whatever a command started inherits it."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("FACEFLOW_BENCH_TAG") == tag and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _end_after_training_starts(stop: Callable[[subprocess.Popen], None]) -> Callable[[subprocess.Popen, Path], None]:
    def end(process: subprocess.Popen, stderr: Path) -> None:
        deadline = time.monotonic() + 300
        while "train_realnvp" not in stderr.read_text(errors="replace") and process.poll() is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        stop(process)
    return end


ENDINGS: dict[str, tuple[list[str], Callable[[subprocess.Popen, Path], None] | None]] = {
    # kind -> (arguments, how the run is ended; None: it ends by itself)
    "success": (["--epochs", "3", "--n-samples", "4", "--steps", "3"], None),
    "bad input": (["--epochs", "0"], None),
    "SIGTERM": (["--epochs", "20000"], _end_after_training_starts(lambda p: p.send_signal(signal.SIGTERM))),
    "SIGINT": (["--epochs", "20000"], _end_after_training_starts(lambda p: os.killpg(p.pid, signal.SIGINT))),
}


def orphans_after_runs(workdir: Path, data_file: Path, rounds: int = 5) -> dict:
    """`faceflow run` ended each way in ``ENDINGS``, ``rounds`` times each; processes of any of them left after 30 s."""
    tag = uuid.uuid4().hex
    env = cli_env(workdir / "prefect", data_file) | {"FACEFLOW_BENCH_TAG": tag}
    exit_codes: dict[str, list[int]] = {kind: [] for kind in ENDINGS}
    for _ in range(rounds):
        for kind, (arguments, end) in ENDINGS.items():
            stderr = workdir / "stderr.txt"
            with stderr.open("wb") as output:
                process = subprocess.Popen(
                    [sys.executable, "-m", "commands.cli", "run", "--output-dir", str(workdir / "outputs"), *arguments],
                    env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=output, start_new_session=True,
                )
            if end is not None:
                end(process, stderr)
            exit_codes[kind].append(process.wait(timeout=600))
    deadline = time.monotonic() + 30
    while (left := tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for process in left:
        process.kill()
    return {"runs": rounds * len(ENDINGS), "orphans": len(left), "exit_codes": exit_codes,
            "left": [" ".join(p.cmdline())[:200] for p in left]}
