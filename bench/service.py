"""faceflow as a service on several machines: the rehearsal's figures, and the registry under ten concurrent promotions.

The several-machine figures come from the rehearsal itself (tests/test_rehearsal.py: PostgreSQL,
Redis, a Dask scheduler, two "machines" with their own `make ui` and `dask worker`), run as
`pytest` in a child process, which writes them to a file (FACEFLOW_REHEARSAL_FIGURES). The
leaderboard figure is ten processes promoting into one registry at once.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMOTIONS = 10
SWEEP_EPOCHS = 2500  # as bench/sweeps.py's sweep: the repeated sweep is timed against trainings of a real sweep's length
REPEATED_SWEEP_TARGET = 0.15
ALERT_TARGET_SECONDS = 30.0


class _NoAlias:
    """The registry's alias, unset: ten processes race on the folder, link and leaderboard, not on a server."""

    def get(self) -> None:
        return None

    def set(self, record: dict[str, Any] | None) -> None:
        pass


def _promote(folder: str, models: str, seed: int) -> None:
    from tasks.champion import ChampionRecord
    from tasks.registry import UNCHECKED, promote

    record = ChampionRecord(run_folder=folder, flow_run_id=f"bench-{seed}", seed=seed, config_digest="bench",
                            validation_log_prob=-float(seed), heldout_log_prob=-float(seed), promoted_at=f"{seed:04d}",
                            metrics={}, faces_version="bench")
    row = {"challenger": f"bench {seed}", "seed": seed, "promoted": True, "why": "bench", "run folder": folder}
    promote(Path(folder), record, row, Path(models), _NoAlias(), judged_against=UNCHECKED)  # a race, not a judging


def concurrent_promotions(scratch: Path) -> dict[str, Any]:
    """Ten processes, started together, each promoting its own run folder: rows kept, champions current."""
    from tasks.champion import CHAMPION_FILES
    from tasks.registry import champions, leaderboard

    models = scratch / "models"
    folders = []
    for n in range(PROMOTIONS):
        folder = scratch / "outputs" / f"run-bench{n}"
        folder.mkdir(parents=True)
        for name in CHAMPION_FILES:
            (folder / name).write_text(f"{n} {name}")
        folders.append(folder)
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_promote, args=(str(f), str(models), n)) for n, f in enumerate(folders)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    rows = leaderboard(models)
    return {"promotions": PROMOTIONS, "exit codes": [p.exitcode for p in processes], "rows": len(rows),
            "lost rows": PROMOTIONS - len({r["seed"] for r in rows}), "current champions": sum(c.current for c in champions(models))}


def rehearsal(scratch: Path) -> dict[str, Any]:
    """tests/test_rehearsal.py in a child pytest; its figures, as it wrote them."""
    figures = scratch / "rehearsal.json"
    env = os.environ | {"FACEFLOW_REHEARSAL_FIGURES": str(figures), "FACEFLOW_REHEARSAL_EPOCHS": str(SWEEP_EPOCHS)}
    done = subprocess.run([sys.executable, "-m", "pytest", "tests/test_rehearsal.py", "-p", "no:randomly", "-q"],
                          cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the rehearsal failed:\n{done.stdout[-4000:]}")
    return json.loads(figures.read_text())


def service_benchmarks(scratch: Path) -> dict[str, Any]:
    print("service: the several-machine rehearsal (PostgreSQL, Redis, Dask, two make ui) ...", flush=True)
    rehearsed = rehearsal(scratch)
    print(f"service: {PROMOTIONS} concurrent promotions ...", flush=True)
    promotions = concurrent_promotions(scratch)
    targets = [
        {"figure": "repeated sweep from the second machine / first sweep", "value": rehearsed["repeated sweep ÷ first sweep"],
         "target": f"<= {REPEATED_SWEEP_TARGET}", "met": rehearsed["repeated sweep ÷ first sweep"] <= REPEATED_SWEEP_TARGET},
        {"figure": "executions of each upstream step (split, PCA, dataloader) across both machines in one sweep",
         "value": rehearsed["upstream executions in all"], "target": "1", "met": rehearsed["upstream executions in all"] == 1},
        {"figure": f"lost leaderboard rows over {PROMOTIONS} concurrent promotions (processes)", "value": promotions["lost rows"],
         "target": "0", "met": promotions["lost rows"] == 0 and promotions["current champions"] == 1},
        {"figure": "lost leaderboard rows in the rehearsal (3 retrainings on 2 machines)",
         "value": rehearsed["lost leaderboard rows"], "target": "0", "met": rehearsed["lost leaderboard rows"] == 0},
    ]
    if "failed run -> alert seconds" in rehearsed:
        seconds = rehearsed["failed run -> alert seconds"]
        targets.append({"figure": "failed run -> notification received (s)", "value": seconds,
                        "target": f"<= {ALERT_TARGET_SECONDS:g}", "met": seconds <= ALERT_TARGET_SECONDS})
    return {"service_targets": targets, "service_rehearsal": rehearsed, "service_promotions": promotions}
