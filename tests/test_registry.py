"""The registry: promotion as one transaction, killed at every step and repaired; concurrent promotions; rollback and history."""

from __future__ import annotations

import contextvars
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import reporting_server
from support import faceflow
from tasks.champion import CHAMPION_FILES, ChampionRecord, champion_path, read_champion
from tasks.registry import FAULT_VARIABLE, JOURNAL, STEPS, UNCHECKED, champions, check, current_folder, leaderboard, promote

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_folder(root: Path, name: str) -> Path:
    """A run folder with the files a promotion copies (their bytes do not matter to the registry)."""
    folder = root / "outputs" / f"run-{name}"
    folder.mkdir(parents=True)
    for file in CHAMPION_FILES:
        (folder / file).write_text(f"{name} {file}")
    return folder


def record(folder: Path, seed: int, validation: float) -> ChampionRecord:
    return ChampionRecord(run_folder=str(folder), flow_run_id=f"flow-run-{seed}", seed=seed, config_digest="d",
                          validation_log_prob=validation, heldout_log_prob=validation - 1, promoted_at=f"2026-11-30T10:00:{seed:02d}+00:00",
                          metrics={}, faces_version="v")


def row(folder: Path, seed: int) -> dict:
    return {"time": "2026-11-30T10:00:00+00:00", "challenger": f"test {seed}", "seed": seed, "promoted": True,
            "why": "test", "run folder": str(folder)}


def install(folder: Path, seed: int, validation: float, models: Path, alias) -> Path:
    """Promote the run in ``folder`` over whatever is current (as if judged against it just now)."""
    done = promote(folder, record(folder, seed, validation), row(folder, seed), models, alias,
                   judged_against=current_folder(models))
    assert done.folder is not None, done
    return done.folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, migrated_home: Path):
    with reporting_server(migrated_home, tmp_path_factory.mktemp("registry")) as running:
        yield running


@pytest.fixture
def alias(server):
    from tasks.steps import ChampionVariable

    variable = ChampionVariable()
    variable.set(None)
    return variable


def cli(*arguments: str, models: Path, api_url: str) -> subprocess.CompletedProcess:
    env = os.environ | {"FACEFLOW_MODELS_DIR": str(models), "PREFECT_API_URL": api_url}
    return subprocess.run(faceflow(*arguments), env=env, capture_output=True, text=True, timeout=300)


PROMOTE_AND_DIE = """
import json, sys
from pathlib import Path
from tasks.champion import ChampionRecord
from tasks.registry import current_folder, promote
from tasks.steps import ChampionVariable
folder, record, row, models = sys.argv[1:]
promote(Path(folder), ChampionRecord(**json.loads(record)), json.loads(row), Path(models), ChampionVariable(),
        judged_against=current_folder(Path(models)))
"""


@pytest.mark.parametrize("step", STEPS)
def test_a_promotion_killed_after_any_step_reads_consistently_and_check_repairs_it(
    step: str, tmp_path: Path, server, alias
) -> None:
    models = tmp_path / "models"
    first, second = run_folder(tmp_path, "a"), run_folder(tmp_path, "b")
    install(first, 1, -10.0, models, alias)
    env = os.environ | {FAULT_VARIABLE: step, "PYTHONPATH": str(REPO_ROOT), "PREFECT_API_URL": server.api_url}
    killed = subprocess.run([sys.executable, "-c", PROMOTE_AND_DIE, str(second), json.dumps(record(second, 2, -5.0).to_json()),
                             json.dumps(row(second, 2)), str(models)], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr  # SIGKILL, right after the step
    assert (models / JOURNAL).is_file()
    # Readers go through the link: the old champion or the new one, whole.
    assert read_champion(models).run_folder in (str(first), str(second))
    repaired = cli("champion", "--check", "--json", models=models, api_url=server.api_url)
    assert repaired.returncode == 0, repaired.stderr
    found = json.loads(repaired.stdout)["found"]
    assert any("was interrupted" in line for line in found), found
    assert check(models, alias, repair=False) == []  # consistent now
    finished = step != "journal"  # the folder was written whole: the promotion is finished, else undone
    current = read_champion(models)
    assert current.run_folder == str(second if finished else first)
    assert alias.get() == current.to_json()
    # Every row kept: an undone promotion's row stays, as not promoted.
    assert [(r["run folder"], r["promoted"]) for r in leaderboard(models)] == [(str(first), True), (str(second), finished)]
    assert not (models / JOURNAL).exists() and not list(models.glob(".*.partial"))


def test_concurrent_promotions_keep_every_row_and_one_champion(tmp_path: Path, alias) -> None:
    models = tmp_path / "models"
    folders = [run_folder(tmp_path, f"c{n}") for n in range(10)]
    # Each thread in a copy of this context: it carries the test server's API URL (Prefect's settings).
    threads = [threading.Thread(target=contextvars.copy_context().run,
                                args=(promote, f, record(f, n, -float(n)), row(f, n), models, alias),
                                kwargs={"judged_against": UNCHECKED})
               for n, f in enumerate(folders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r["seed"] for r in leaderboard(models)) == list(range(10))  # no row lost
    assert sum(c.current for c in champions(models)) == 1 and len(champions(models)) == 10
    assert check(models, alias, repair=False) == []  # link, Variable and leaderboard agree


def test_rollback_makes_the_previous_champion_current_and_history_lists_both(tmp_path: Path, server, alias) -> None:
    models = tmp_path / "models"
    first, second = run_folder(tmp_path, "a"), run_folder(tmp_path, "b")
    install(first, 1, -10.0, models, alias)
    install(second, 2, -5.0, models, alias)
    refused = cli("champion", "rollback", "--to", "nothing-like-it", models=models, api_url=server.api_url)
    assert refused.returncode == 2 and "--to 'nothing-like-it' names no champion" in refused.stderr
    rolled = cli("champion", "rollback", "--reason", "b draws blurry faces", "--json", models=models, api_url=server.api_url)
    assert rolled.returncode == 0, rolled.stderr
    assert json.loads(rolled.stdout)["run_folder"] == str(first) == read_champion(models).run_folder
    assert alias.get() == read_champion(models).to_json()
    last = leaderboard(models)[-1]
    assert last["challenger"].startswith("rollback by ") and "b draws blurry faces" in last["why"] and last["promoted"]
    history = cli("champion", "--history", "--json", models=models, api_url=server.api_url)
    listed = json.loads(history.stdout)
    assert [(c["run_folder"], c["current"]) for c in listed] == [(str(first), True), (str(second), False)]
    again = cli("champion", "rollback", "--to", "champion-a", models=models, api_url=server.api_url)
    assert again.returncode == 2 and "is the champion already" in again.stderr
    assert champion_path(models).is_symlink()


def test_the_rollback_deployments_flow_rolls_back_and_names_its_run(tmp_path: Path, server, alias, monkeypatch) -> None:
    from flows.rollback import faceflow_rollback

    models = tmp_path / "models"
    monkeypatch.setenv("FACEFLOW_MODELS_DIR", str(models))
    first, second = run_folder(tmp_path, "a"), run_folder(tmp_path, "b")
    install(first, 1, -10.0, models, alias)
    install(second, 2, -5.0, models, alias)
    done = faceflow_rollback(reason="from the UI", to="champion-a")
    assert done["run_folder"] == str(first) == read_champion(models).run_folder and alias.get() == read_champion(models).to_json()
    last = leaderboard(models)[-1]
    assert last["challenger"].startswith("rollback by deployment run ") and last["why"].endswith(": from the UI")
