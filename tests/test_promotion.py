"""Promotions under concurrency and failure: judged against the champion they replace, read whole, no history lost.

Every interleaving here is forced, not hoped for: a process stops at a named test-only pause
(``FACEFLOW_PAUSE_DIR``, tasks/champion.py:pause_point) until the test lets it go on, and a
process the registry makes wait is seen waiting in the kernel's lock table (/proc/locks).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from commands.server import local_server, stop_server
from conftest import copy_home, reporting_server
from support import faceflow
from tasks.champion import LEADERBOARD, PAUSE_AT_VARIABLE, PAUSE_VARIABLE, RECORD
from tasks.registry import (
    FAULT_VARIABLE, JOURNAL, LOCK, champions, check, current_folder, leaderboard, promote,
)
from test_registry import record, row, run_folder

REPO_ROOT = Path(__file__).resolve().parent.parent
# A challenger trained in seconds: orchestration is under test here, not quality.
LIGHT = ("--epochs", "3", "--members", "1", "--hidden-units", "16", "--num-layers", "1", "--n-samples", "4",
         "--gmm-max-components", "2", "--no-parallel")
WAIT = 240.0  # seconds a step of a subprocess may take on a busy 2-core machine


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, migrated_home: Path):
    with reporting_server(migrated_home, tmp_path_factory.mktemp("promotion")) as running:
        yield running


@pytest.fixture
def alias(server):
    from tasks.steps import ChampionVariable

    variable = ChampionVariable()
    variable.set(None)
    return variable


def wait_until(condition, what: str, *processes: subprocess.Popen, timeout: float = WAIT):
    """Poll ``condition`` until it holds (returns its value); fail naming ``what`` if a process ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        for process in processes:
            if process.poll() is not None:
                raise AssertionError(f"process {process.pid} exited with {process.returncode} before {what}: "
                                     f"{_tail(process)}")
        time.sleep(0.05)  # poll interval of this bounded wait; a process that exits ends it early
    raise AssertionError(f"timed out waiting for {what}")


def _tail(process: subprocess.Popen) -> str:
    log = getattr(process, "log", None)
    return log.read_text()[-3000:] if log and log.is_file() else ""


_SPAWNED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_process_left():
    """Whatever a test spawned and left (a failed test's paused process) is killed with it."""
    yield
    while _SPAWNED:
        process = _SPAWNED.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


def spawn(command: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """A process whose stdout goes to ``<log>.out`` and stderr to ``log``."""
    with open(log.with_suffix(".out"), "w") as out, open(log, "w") as err:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True, cwd=cwd)
    process.log, process.out = log, log.with_suffix(".out")  # type: ignore[attr-defined]
    _SPAWNED.append(process)
    return process


def reached(pauses: Path, name: str, process: subprocess.Popen) -> bool:
    return (pauses / f"{name}.{process.pid}.reached").is_file()


def release(pauses: Path, name: str, process: subprocess.Popen) -> None:
    """Let ``process`` go on from pause ``name``, and wait until it has taken the go (so the pause can be counted again).

    The process removes its "reached" before the "go": a "reached" seen after that is its next arrival.
    """
    go = pauses / f"{name}.{process.pid}.go"
    go.touch()
    wait_until(lambda: not go.exists() or process.poll() is not None, f"{process.pid} to go on from {name}")


def waiting_on_lock(process: subprocess.Popen, lock_file: Path) -> bool:
    """Whether ``process`` is blocked in flock on ``lock_file``: a "->" (waiter) line of /proc/locks with its pid and inode."""
    inode = str(os.stat(lock_file).st_ino)
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and str(process.pid) in fields and any(f.rsplit(":", 1)[-1] == inode for f in fields if ":" in f):
            return True
    return False


def start(script: str, *arguments: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    return spawn([sys.executable, "-c", script, *arguments], env, log)


def finished(process: subprocess.Popen) -> dict:
    """The JSON the process printed last on stdout, once it has exited with status 0."""
    assert process.wait(timeout=WAIT) == 0, _tail(process)
    return json.loads(process.out.read_text().strip().splitlines()[-1])


PROMOTE = """
import json, sys
from pathlib import Path
from tasks.champion import ChampionRecord
from tasks.registry import UNCHECKED, promote
from tasks.steps import ChampionVariable
folder, record, row, models, judged_against = sys.argv[1:]
done = promote(Path(folder), ChampionRecord(**json.loads(record)), json.loads(row), Path(models), ChampionVariable(),
               judged_against=json.loads(judged_against))
print(json.dumps({"folder": done.folder and done.folder.name, "moved_to": done.moved_to}))
"""

APPEND = """
import json, sys
from pathlib import Path
from tasks.champion import append_leaderboard
append_leaderboard(Path(sys.argv[1]), json.loads(sys.argv[2]))
print(json.dumps({"rows": len(json.loads((Path(sys.argv[1]) / "leaderboard.json").read_text()))}))
"""


def promoting(folder: Path, seed: int, models: Path, judged_against: str | None, env: dict, log: Path) -> subprocess.Popen:
    return start(PROMOTE, str(folder), json.dumps(record(folder, seed, -float(seed)).to_json()), json.dumps(row(folder, seed)),
                 str(models), json.dumps(judged_against), env=env, log=log)


def pausing_env(server, pauses: Path, at: str, **extra: str) -> dict[str, str]:
    """An environment that stops its processes at the pauses named in ``at`` (comma-separated)."""
    pauses.mkdir(exist_ok=True)
    return os.environ | {"PYTHONPATH": str(REPO_ROOT), "PREFECT_API_URL": server.api_url, PAUSE_VARIABLE: str(pauses),
                         PAUSE_AT_VARIABLE: at} | extra


def install(folder: Path, seed: int, models: Path, alias) -> str:
    done = promote(folder, record(folder, seed, -float(seed)), row(folder, seed), models, alias,
                   judged_against=current_folder(models))
    assert done.folder is not None
    return done.folder.name


# -- compare and swap ----------------------------------------------------------------------------------------------


def test_seeds_differ_for_retrainings_scheduled_in_the_same_second() -> None:
    import datetime

    from flows.retrain import seed_for

    scheduled = datetime.datetime(2026, 12, 6, 3, 0, tzinfo=datetime.timezone.utc)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    assert seed_for(scheduled, first) != seed_for(scheduled, second)
    assert seed_for(scheduled, first) == seed_for(scheduled, first)  # a retried flow run keeps its seed
    assert all(0 <= seed_for(scheduled, str(uuid.uuid4())) < 2**31 for _ in range(50))


def test_a_promotion_judged_against_a_replaced_champion_changes_nothing(tmp_path: Path, alias) -> None:
    models = tmp_path / "models"
    champion = install(run_folder(tmp_path, "x"), 1, models, alias)
    a, b = run_folder(tmp_path, "a"), run_folder(tmp_path, "b")
    # Both challengers were judged against the same champion; b is promoted first.
    b_done = promote(b, record(b, 3, -3.0), row(b, 3), models, alias, judged_against=champion)
    a_done = promote(a, record(a, 2, -2.0), row(a, 2), models, alias, judged_against=champion)
    assert b_done.folder is not None and a_done.folder is None and a_done.moved_to == b_done.folder.name
    assert current_folder(models) == b_done.folder.name and alias.get()["run_folder"] == str(b)
    assert [r["run folder"] for r in leaderboard(models)] == [str(tmp_path / "outputs" / "run-x"), str(b)]  # nothing of a's
    assert len(champions(models)) == 2


def test_the_registry_lock_holds_a_second_promotion_until_the_first_has_swapped(tmp_path: Path, server, alias) -> None:
    """The check and the swap are one step: a second promotion judged against the same champion waits, then sees it moved."""
    models, pauses = tmp_path / "models", tmp_path / "pauses"
    champion = install(run_folder(tmp_path, "x"), 1, models, alias)
    env = pausing_env(server, pauses, "promotion-checked")
    first = promoting(run_folder(tmp_path, "a"), 2, models, champion, env, tmp_path / "a.log")
    wait_until(lambda: reached(pauses, "promotion-checked", first), "the first promotion checked the champion", first)
    second = promoting(run_folder(tmp_path, "b"), 3, models, champion, env, tmp_path / "b.log")
    # Held by the lock, or (were there no lock) through the check as well: either is seen, never a guess.
    wait_until(lambda: waiting_on_lock(second, models / LOCK) or reached(pauses, "promotion-checked", second),
               "the second promotion to wait on the lock or pass the check", second)
    release(pauses, "promotion-checked", first)
    if reached(pauses, "promotion-checked", second):
        release(pauses, "promotion-checked", second)
    a_done, b_done = finished(first), finished(second)
    assert a_done["folder"] and b_done == {"folder": None, "moved_to": a_done["folder"]}, (a_done, b_done)
    assert current_folder(models) == a_done["folder"] and len(champions(models)) == 2
    assert check(models, alias, repair=False) == []


def test_a_promotion_and_a_rejected_challengers_row_at_once_keep_both_rows(tmp_path: Path, server, alias) -> None:
    """Leaderboard writes read, add and replace under a lock: the second reads after the first wrote, no row lost."""
    models, pauses = tmp_path / "models", tmp_path / "pauses"
    install(run_folder(tmp_path, "x"), 1, models, alias)
    env = pausing_env(server, pauses, "leaderboard-read")
    promotion = promoting(run_folder(tmp_path, "a"), 2, models, current_folder(models), env, tmp_path / "a.log")
    wait_until(lambda: reached(pauses, "leaderboard-read", promotion), "the promotion read the leaderboard", promotion)
    rejected = {"challenger": "rejected", "seed": 9, "promoted": False, "why": "not better", "run folder": "elsewhere"}
    writer = start(APPEND, str(models), json.dumps(rejected), env=env, log=tmp_path / "writer.log")
    wait_until(lambda: waiting_on_lock(writer, models / f"{LEADERBOARD}.lock") or reached(pauses, "leaderboard-read", writer),
               "the rejected challenger's writer to wait on the lock or read the leaderboard", writer)
    release(pauses, "leaderboard-read", promotion)
    wait_until(lambda: reached(pauses, "leaderboard-read", writer), "the writer read the leaderboard", writer)
    release(pauses, "leaderboard-read", writer)
    finished(promotion), finished(writer)
    seeds = [r["seed"] for r in json.loads((models / LEADERBOARD).read_text())]  # the file itself, counted here
    assert sorted(seeds) == [1, 2, 9], seeds


# -- a retraining judged again when the champion moved (real flow runs, light models) --------------------------------


@pytest.fixture(scope="module")
def two_retrainings(tmp_path_factory: pytest.TempPathFactory, server, data_file: Path) -> dict:
    """Two `faceflow retrain`s at once on an empty registry: both judged (no champion yet), then one promoted first."""
    root = tmp_path_factory.mktemp("two-retrainings")
    models, pauses = root / "models", root / "pauses"
    env = pausing_env(server, pauses, "judged", FACEFLOW_MODELS_DIR=str(models), FACEFLOW_DATA_FILE=str(data_file))
    processes = []
    for name in ("first", "second"):
        processes.append(spawn(faceflow("retrain", *LIGHT, "--output-dir", str(root / "outputs"), "--json"), env,
                               root / f"{name}.log", cwd=root))
    first, second = processes
    try:
        wait_until(lambda: reached(pauses, "judged", first) and reached(pauses, "judged", second),
                   "both retrainings judged their challenger", first, second)
        assert leaderboard(models) == [] and current_folder(models) is None  # both judged against no champion
        release(pauses, "judged", first)
        first_result = finished(first)
        first_folder = current_folder(models)
        release(pauses, "judged", second)
        judgings = 1
        while second.poll() is None:  # each time it judged again and would promote, let it go on
            if reached(pauses, "judged", second):
                judgings += 1
                release(pauses, "judged", second)
            time.sleep(0.05)  # poll interval: the loop ends when the second process exits (bounded by its own timeout)
        return {"models": models, "first": first_result, "second": finished(second), "first_folder": first_folder,
                "judgings": judgings, "root": root}
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
            _SPAWNED.remove(process)


def test_a_retraining_whose_champion_moved_is_judged_again_never_promoted_unjudged(two_retrainings: dict) -> None:
    first, second = two_retrainings["first"], two_retrainings["second"]
    assert first["promoted"] and first["reason"] == "first champion"
    row = second["challenger"]
    # Judged against the champion the first retraining installed, with a figure for it: never "first champion".
    assert row["judged against"] == two_retrainings["first_folder"], row
    assert isinstance(row["champion pixels"], float) and row["faces judged"] > 0 and second["reason"] != "first champion"
    assert two_retrainings["judgings"] == 1 + second["promoted"]  # a promotion after the second judging passed its pause
    rows = leaderboard(two_retrainings["models"])
    assert [(r["seed"], r["promoted"]) for r in rows] == [(first["challenger"]["seed"], True),
                                                          (row["seed"], second["promoted"])]
    assert first["challenger"]["seed"] != row["seed"]


def test_a_challenger_whose_champion_changes_at_every_judging_is_recorded_superseded(
    tmp_path: Path, server, alias, data_file: Path
) -> None:
    """Another promotion lands between each of the JUDGINGS judgings and its swap: never promoted, its row says why."""
    import dataclasses

    from flows.retrain import JUDGINGS
    from tasks.data import open_faces
    from tasks.store import FaceStore

    models, store_root, pauses = tmp_path / "models", tmp_path / "faces", tmp_path / "pauses"
    first = open_faces(data_file, "latest", store_root)
    # Champions fitted on the first version hold a person since forgotten: stale, so each is replaced
    # unscored (no model needed in the planted folders) and the challenger wants to promote every time.
    FaceStore(store_root).forget(first.people[-1])
    env = pausing_env(server, pauses, "judged", FACEFLOW_MODELS_DIR=str(models), FACEFLOW_FACES_DIR=str(store_root),
                      FACEFLOW_DATA_FILE=str(data_file))
    retrain = spawn(faceflow("retrain", *LIGHT, "--output-dir", str(tmp_path / "outputs"), "--json"), env,
                    tmp_path / "retrain.log", cwd=tmp_path)
    planted = []
    for judging in range(1, JUDGINGS + 1):
        wait_until(lambda: reached(pauses, "judged", retrain), f"the retraining's judging {judging}", retrain)
        folder = run_folder(tmp_path, f"planted-{judging}")
        done = promote(folder, dataclasses.replace(record(folder, judging, -float(judging)), faces_version=first.version),
                       row(folder, judging), models, alias, judged_against=current_folder(models))
        planted.append(done.folder.name)
        release(pauses, "judged", retrain)
    result = finished(retrain)
    reason = f"superseded: the champion changed {JUDGINGS} times while this challenger was judged; not promoted"
    assert not result["promoted"] and result["reason"] == reason, result
    assert current_folder(models) == planted[-1]
    last = leaderboard(models)[-1]
    assert (last["seed"], last["promoted"], last["why"]) == (result["challenger"]["seed"], False, reason)


# -- one read, one champion ---------------------------------------------------------------------------------------


def _pca_log_p(folder: Path, pixels: np.ndarray) -> np.ndarray:
    """log p of PCA coordinates under the champion files in ``folder``, computed here from the folder's files alone."""
    import torch

    from tasks.model import load_checkpoint
    from tasks.pca import read_estimator

    model, _ = load_checkpoint(folder / "model.pt")
    coords = read_estimator((folder / "pca.npz").read_bytes(), str(folder / "pca.npz")).transform(pixels).astype(np.float32)
    with torch.no_grad():
        return model.log_prob(torch.from_numpy(coords)).double().numpy()


def test_a_promotion_between_a_readers_two_reads_leaves_it_one_champion_whole(
    two_retrainings: dict, tmp_path: Path, server, alias, faces,
) -> None:
    models, pauses = tmp_path / "models", tmp_path / "pauses"
    one, other = (Path(r["run folder"]) for r in leaderboard(two_retrainings["models"]))
    first = promote(one, record(one, 1, -1.0), row(one, 1), models, alias, judged_against=None).folder
    pixels = faces.images[:5].reshape(5, -1).astype(np.float64)
    expected, otherwise = _pca_log_p(one, pixels), _pca_log_p(other, pixels)
    assert not np.allclose(expected, otherwise)  # the two champions tell apart (their flows; the PCA may be shared)
    np.save(tmp_path / "faces.npy", pixels)
    env = pausing_env(server, pauses, "champion-read", FACEFLOW_MODELS_DIR=str(models))
    reader = spawn(faceflow("score", str(tmp_path / "faces.npy"), "--json"), env, tmp_path / "score.log", cwd=tmp_path)
    wait_until(lambda: reached(pauses, "champion-read", reader), "the reader read the champion's PCA", reader)
    second = promote(other, record(other, 2, -2.0), row(other, 2), models, alias, judged_against=first.name).folder
    assert current_folder(models) == second.name
    release(pauses, "champion-read", reader)
    scored = finished(reader)
    assert scored["champion"] == first.name
    np.testing.assert_allclose(scored["log_prob"], expected, rtol=1e-5)


# -- no lost history -----------------------------------------------------------------------------------------------


def test_a_variable_that_cannot_be_set_loses_no_row_and_check_finishes_the_promotion(
    tmp_path: Path, migrated_home: Path,
) -> None:
    """The server stops mid-transaction: the promotion fails naming the journal; --check, with a server again, keeps every row."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.steps import ChampionVariable

    home, models, pauses = copy_home(migrated_home, tmp_path / "home"), tmp_path / "models", tmp_path / "pauses"
    a, b = run_folder(tmp_path, "a"), run_folder(tmp_path, "b")
    with local_server(home, timeout=300) as running:
        with temporary_settings({PREFECT_API_URL: running.api_url}):
            first = install(a, 1, models, ChampionVariable())
        env = pausing_env(running, pauses, "promotion-checked", PREFECT_CLIENT_MAX_RETRIES="0")
        promotion = promoting(b, 2, models, first, env, tmp_path / "b.log")
        wait_until(lambda: reached(pauses, "promotion-checked", promotion), "the promotion's check", promotion)
        stop_server(running)  # the server goes away mid-transaction
        release(pauses, "promotion-checked", promotion)
        assert promotion.wait(timeout=WAIT) != 0
        failure = _tail(promotion)
        assert "stopped part way" in failure and JOURNAL in failure and "faceflow champion --check" in failure, failure
    # Before any repair: the link names the new champion, and its row is on the leaderboard already.
    assert Path(leaderboard(models)[-1]["run folder"]) == b and (models / JOURNAL).is_file()
    assert current_folder(models) != first
    with local_server(home, timeout=300) as again:
        env = os.environ | {"FACEFLOW_MODELS_DIR": str(models), "PREFECT_API_URL": again.api_url}
        repaired = subprocess.run(faceflow("champion", "--check", "--json"), env=env, capture_output=True, text=True,
                                  timeout=WAIT)
        assert repaired.returncode == 0, repaired.stderr
        assert any("was interrupted: finished" in line for line in json.loads(repaired.stdout)["found"])
        with temporary_settings({PREFECT_API_URL: again.api_url}):
            variable = ChampionVariable()
            assert variable.get()["run_folder"] == str(b)
            assert check(models, variable, repair=False) == []
    assert [(r["run folder"], r["promoted"]) for r in leaderboard(models)] == [(str(a), True), (str(b), True)]
    assert {c.record.run_folder for c in champions(models)} == {str(a), str(b)}


KILLED = """
import json, sys
from pathlib import Path
from tasks.champion import ChampionRecord
from tasks.registry import current_folder, promote
from tasks.steps import ChampionVariable
folder, record, row, models = sys.argv[1:]
promote(Path(folder), ChampionRecord(**json.loads(record)), json.loads(row), Path(models), ChampionVariable(),
        judged_against=current_folder(Path(models)))
"""


def _killed_after(step: str, folder: Path, seed: int, models: Path, server) -> None:
    env = os.environ | {FAULT_VARIABLE: step, "PYTHONPATH": str(REPO_ROOT), "PREFECT_API_URL": server.api_url}
    killed = subprocess.run([sys.executable, "-c", KILLED, str(folder), json.dumps(record(folder, seed, -float(seed)).to_json()),
                             json.dumps(row(folder, seed)), str(models)], env=env, capture_output=True, text=True, timeout=WAIT)
    assert killed.returncode == -9, killed.stderr


def test_the_next_promotion_finishes_an_interrupted_one_first(tmp_path: Path, server, alias) -> None:
    """A promotion killed after swapping the link, before its row: the next promotion (no --check between) records it."""
    models = tmp_path / "models"
    a, b, c = run_folder(tmp_path, "a"), run_folder(tmp_path, "b"), run_folder(tmp_path, "c")
    install(a, 1, models, alias)
    _killed_after("link", b, 2, models, server)
    assert [r["seed"] for r in leaderboard(models)] == [1]  # b's row not written yet
    install(c, 3, models, alias)
    assert [(r["seed"], r["promoted"]) for r in leaderboard(models)] == [(1, True), (2, True), (3, True)]
    assert [c.record.seed for c in champions(models)] == [1, 2, 3] and not (models / JOURNAL).exists()
    assert check(models, alias, repair=False) == []


def test_the_same_run_promoted_twice_and_killed_keeps_both_folders(tmp_path: Path, server, alias) -> None:
    """No promotion replaces a folder: the same run promoted again gets a folder of its own, killed or not."""
    models = tmp_path / "models"
    a, b = run_folder(tmp_path, "a"), run_folder(tmp_path, "b")
    install(a, 1, models, alias)
    install(b, 2, models, alias)
    _killed_after("folder", a, 1, models, server)  # a again, as the same seed: the name it had before
    assert check(models, alias) != []
    history = champions(models)
    assert sorted(c.record.run_folder for c in history) == [str(a), str(a), str(b)] and len({c.folder for c in history}) == 3
    assert all((models / c.folder / "model.pt").is_file() for c in history)
    assert [(r["seed"], r["promoted"]) for r in leaderboard(models)] == [(1, True), (2, True), (1, True)]


def test_check_returns_a_folder_set_aside_by_an_earlier_same_name_promotion_to_history(tmp_path: Path, alias) -> None:
    """Earlier code renamed a champion aside (``.<name>.old-<hex>``) before renaming the new one in; killed between."""
    models = tmp_path / "models"
    a = run_folder(tmp_path, "a")
    name = install(a, 1, models, alias)
    aside = models / f".{name}.old-{uuid.uuid4().hex}"
    os.replace(models / name, aside)  # killed between the two renames: the champion's folder is only aside
    staging = models / f".{name}.{uuid.uuid4().hex[:8]}.partial"
    shutil.copytree(aside, staging)
    again = record(a, 1, -1.0).to_json() | {"promoted_at": "2026-12-01T00:00:00+00:00"}
    (staging / RECORD).write_text(json.dumps(again))
    (models / JOURNAL).write_text(json.dumps({"kind": "promotion", "folder": name, "record": again,
                                              "row": row(a, 1) | {"transaction": uuid.uuid4().hex}}))
    found = check(models, alias)
    assert any(f"{aside.name}: a champion folder set aside" in line for line in found), found
    assert current_folder(models) == name and [c.folder for c in champions(models)] == [name]
    assert check(models, alias, repair=False) == [] and not list(models.glob(".*.partial")) and not list(models.glob(".*.old-*"))
    assert [(r["seed"], r["promoted"]) for r in leaderboard(models)] == [(1, True), (1, False)]  # every row kept


def test_check_keeps_a_set_aside_folder_whose_name_is_taken(tmp_path: Path, alias) -> None:
    models = tmp_path / "models"
    name = install(run_folder(tmp_path, "a"), 1, models, alias)
    aside = models / f".{name}.old-{uuid.uuid4().hex}"
    shutil.copytree(models / name, aside)  # killed after both renames, before the old folder was deleted
    found = check(models, alias)
    assert any("back in history as" in line for line in found), found
    assert len(champions(models)) == 2 and current_folder(models) == name and not aside.exists()


# -- rollback ------------------------------------------------------------------------------------------------------


def test_a_rollback_to_a_stale_champion_is_refused_and_a_rollback_is_announced(
    tmp_path: Path, server, alias, data_file: Path, monkeypatch,
) -> None:
    """Champions fitted on a version holding a forgotten person may not come back; a rollback sends its event."""
    import dataclasses

    import httpx

    from flows.rollback import faceflow_rollback
    from tasks.champion import ChampionError
    from tasks.data import open_faces
    from tasks.store import FaceStore

    models, store_root = tmp_path / "models", tmp_path / "faces"
    monkeypatch.setenv("FACEFLOW_MODELS_DIR", str(models))
    monkeypatch.setenv("FACEFLOW_FACES_DIR", str(store_root))
    first = open_faces(data_file, "latest", store_root)

    def install_on(name: str, seed: int, version: str) -> str:
        folder = run_folder(tmp_path, name)
        done = promote(folder, dataclasses.replace(record(folder, seed, -float(seed)), faces_version=version),
                       row(folder, seed), models, alias, judged_against=current_folder(models))
        return done.folder.name

    stale = install_on("a", 1, first.version)
    second = FaceStore(store_root).forget(first.people[0]).version.id
    kept = install_on("c", 3, second)
    install_on("d", 4, second)
    with pytest.raises(ChampionError, match=f"{stale} may not be used again: fitted on faces version"):
        faceflow_rollback(reason="back to the old one", to=stale)
    assert current_folder(models) != stale
    done = faceflow_rollback(reason="d draws blurry faces", to=kept)
    assert done["folder"] == kept == current_folder(models)

    def announced():
        answer = httpx.post(f"{server.api_url}/events/filter", json={
            "filter": {"event": {"name": ["faceflow.champion.rolled-back"]}, "resource": {"id": [f"faceflow.champion.{kept}"]}},
        }, timeout=10)
        answer.raise_for_status()
        return answer.json()["events"]

    events = wait_until(announced, "the rollback's event on the server")
    assert events[0]["payload"]["why"].endswith("d draws blurry faces") and events[0]["payload"]["folder"] == kept
