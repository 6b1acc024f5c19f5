"""Sweep timings: 4 configurations on a 2-worker LocalCluster against the same 4 one after another in-process.

Each variant runs in a fresh process with its own copy of a migrated PREFECT_HOME (nothing
cached), against a server it starts; the cached variant repeats the Dask sweep in its home.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.flow_runs import REPO_ROOT, cli_env

SPEC = {
    "base": {"data": {"validation_fraction": 0.1}, "train": {"epochs": 2500}},
    "grid": {"train.learning_rate": [0.003, 0.005], "train.num_layers": [3, 4]},
}

SWEEP_SCRIPT = """
import json, sys, time
from pathlib import Path
from prefect.task_runners import ThreadPoolTaskRunner
from commands.runner import recorded_at
from commands.server import local_server
from faceflow.sweeps import SweepSpec
from flows.sweep import faces_sweep, sweep_task_runner

home, mode, spec = Path(sys.argv[1]), sys.argv[2], SweepSpec.model_validate(json.loads(sys.argv[3]))
# Logs and events flushed before the server stops: an exit that retries a stopped server takes a minute.
with local_server(home, timeout=600) as server, recorded_at(server.api_url):
    runner = sweep_task_runner(workers=2) if mode == "dask" else ThreadPoolTaskRunner(max_workers=1)
    started = time.perf_counter()
    result = faces_sweep.with_options(task_runner=runner)(spec=spec)
    seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "executions": result.executions, "rows": result.rows}, default=str))
"""


def _sweep(home: Path, mode: str, data_file: Path, outputs: Path) -> dict:
    spec = SPEC | {"base": SPEC["base"] | {"output_dir": str(outputs)}}
    env = cli_env(home, data_file)
    started = time.perf_counter()
    finished = subprocess.run(
        [sys.executable, "-c", SWEEP_SCRIPT, str(home), mode, json.dumps(spec)], env=env, cwd=REPO_ROOT,
        capture_output=True, text=True, check=True,
    )
    return json.loads(finished.stdout.strip().splitlines()[-1]) | {"wall_seconds": time.perf_counter() - started}


def sweep_timings(migrated_home: Path, scratch: Path, data_file: Path) -> dict:
    """Flow seconds of: the 4 configurations one after another, on 2 Dask workers, and that Dask sweep again."""
    homes = {mode: scratch / f"sweep-{mode}" for mode in ("sequential", "dask")}
    for home in homes.values():
        shutil.copytree(migrated_home, home)
    sequential = _sweep(homes["sequential"], "sequential", data_file, scratch / "outputs-sequential")
    dask = _sweep(homes["dask"], "dask", data_file, scratch / "outputs-dask")
    repeated = _sweep(homes["dask"], "dask", data_file, scratch / "outputs-dask")
    return {"sequential": sequential, "dask": dask, "repeated": repeated,
            "load_average": os.getloadavg()}
