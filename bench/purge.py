"""`faceflow forget --purge` at 40,000 faces with 20 run folders (issue 29's target: at most 30 s).

The store is the growth store of bench/store.py (versions of 400, 4,000 and 40,000 faces); the
person forgotten, an Olivetti person, is in all three, so the purge writes version 4 (39,990
faces) and deletes versions 1 to 3 and everything computed from them. The 20 run folders are 20
real runs of the pipeline on version 1 with a light model (one process, one server, seeds 0 to
19): each leaves its run folder, its cached task results and its artifacts on the server, all of
which the purge deletes. Then `faceflow forget PERSON --purge` runs as a user runs it, a fresh
process that starts its own server: its wall time is the figure. `faceflow forget --verify` after
it must find nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from bench.flow_runs import REPO_ROOT, run_and_watch
from bench.store import _growth_env, build_growth_store

PURGE_TARGET_SECONDS = 30.0
RUN_FOLDERS = 20
PERSON = "olivetti-05"

RUNS_SCRIPT = """
import json, sys
from pathlib import Path
from commands.runner import run_pipeline
from commands.server import local_server
from faceflow.config import FaceflowConfig

home, outputs, runs = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
with local_server(home, timeout=600) as server:
    for seed in range(runs):
        run_pipeline(FaceflowConfig.model_validate({
            "seed": seed, "output_dir": outputs, "data": {"faces_version": "1"},
            "train": {"epochs": 20, "members": 1, "hidden_units": 16, "num_layers": 2},
            "baselines": {"gmm_max_components": 2}}), server.api_url)  # raises if the run failed
"""


def purge_timing(scratch: Path, data_file: Path, migrated: Path) -> dict[str, object]:
    """Build the 40,000-face store, make RUN_FOLDERS runs, then time `faceflow forget --purge` and check `--verify`."""
    store_root, home, outputs = scratch / "purge-faces", scratch / "purge-home", scratch / "purge-outputs"
    built = build_growth_store(store_root, data_file)
    shutil.copytree(migrated, home)
    env = _growth_env(home, store_root, scratch / "purge-models", data_file)
    made = subprocess.run([sys.executable, "-c", RUNS_SCRIPT, str(home), str(outputs), str(RUN_FOLDERS)],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    if made.returncode != 0:
        raise RuntimeError(f"the runs before the purge failed ({made.returncode}):\n{made.stderr[-3000:]}")
    folders = len(list(outputs.glob("run-*")))
    forget = [sys.executable, "-m", "commands.cli", "forget", PERSON, "--json", "--outputs", str(outputs)]
    wall, peak, stdout = run_and_watch([*forget, "--purge"], env, scratch)
    done = json.loads(stdout.strip().splitlines()[-1])
    verified = subprocess.run([*forget, "--verify"], env=env, cwd=scratch, capture_output=True, text=True)
    return {"seconds": wall, "peak_rss_bytes": peak, "run_folders_before": folders, "faces": built["versions"][3]["images"],
            "purged": done["purged"], "verify_exit_code": verified.returncode, "verify_output": verified.stdout[-2000:]}
