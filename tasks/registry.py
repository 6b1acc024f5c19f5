"""The registry in ``models/``: the champion, every earlier champion, the leaderboard, changed one transaction at a time.

A promotion (or a rollback) changes four things: the champion's folder, the ``champion`` link,
the alias (the Prefect Variable ``faceflow-champion``, which the caller passes in as ``Alias``)
and the leaderboard. It runs under the registry's lock and writes a journal first
(``models/.transaction.json``: what it is about to do), which it deletes last. A process killed
at any step leaves the journal behind; ``check`` (``faceflow champion --check``) then finishes the
promotion when its folder was written whole, or undoes it when it was not, and makes the alias
agree with the link, which is the truth. Every reader goes through the link, so it sees the old
champion or the new one, never a mix.

Prefect-free: the alias is any object with ``get()`` and ``set(record | None)``.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from artifacts.atomic import staged_folder, swap_link, write_file, write_synced
from tasks.champion import (
    CHAMPION_FILES, RECORD, ChampionError, ChampionRecord, append_leaderboard, champion_path, now_utc, read_champion,
)

JOURNAL = ".transaction.json"
LOCK = ".registry.lock"
# Test-only fault injection: the process SIGKILLs itself right after the named step of a promotion.
FAULT_VARIABLE = "FACEFLOW_FAULT_AFTER"
STEPS = ("journal", "folder", "link", "alias", "leaderboard")


class Alias(Protocol):
    """Where the registry's current champion is also named: the Prefect Variable, for the UI and other machines."""

    def get(self) -> dict[str, Any] | None: ...

    def set(self, record: dict[str, Any] | None) -> None: ...


@dataclass(frozen=True)
class Champion:
    """One champion folder of the registry, current or earlier."""

    folder: str
    record: ChampionRecord
    current: bool


@contextmanager
def registry_lock(models: Path) -> Iterator[None]:
    """One transaction at a time on this registry (an flock: the kernel drops it if the holder dies)."""
    models.mkdir(parents=True, exist_ok=True)
    with open(models / LOCK, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fault(step: str) -> None:
    if os.environ.get(FAULT_VARIABLE) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def folder_name(run_folder: Path, record: ChampionRecord) -> str:
    return f"champion-{run_folder.name.removeprefix('run-')}-{record.seed}"


def promote(run_folder: Path, record: ChampionRecord, row: dict[str, Any], models: Path, alias: Alias,
            refuse: Callable[[ChampionRecord], None] | None = None) -> Path:
    """Make the run's model the champion: folder, link, alias, leaderboard row, as one transaction.

    ``refuse(record)`` raises when the model may not be promoted (fitted on a version whose person was
    since forgotten: tasks.forgetting.refuse_retired); checked under the lock a purge holds too.
    """
    with registry_lock(models):
        if refuse is not None:
            refuse(record)
        target = models / folder_name(run_folder, record)
        row = row | {"transaction": uuid.uuid4().hex}
        _journal(models, {"kind": "promotion", "folder": target.name, "record": record.to_json(), "row": row})
        _fault("journal")
        with staged_folder(target) as staging:
            for name in CHAMPION_FILES:
                shutil.copy2(run_folder / name, staging / name)
            write_synced(staging / RECORD, json.dumps(record.to_json(), indent=1).encode())
        _fault("folder")
        _finish(models, target.name, record, row, alias)
        return target


def _finish(models: Path, folder: str, record: ChampionRecord, row: dict[str, Any], alias: Alias) -> None:
    """The steps after the folder: link, alias, leaderboard row (once), then the journal goes."""
    swap_link(champion_path(models), folder)
    _fault("link")
    alias.set(record.to_json())
    _fault("alias")
    if not any(r.get("transaction") == row["transaction"] for r in leaderboard(models)):
        append_leaderboard(models, row)
    _fault("leaderboard")
    (models / JOURNAL).unlink(missing_ok=True)


def _journal(models: Path, entry: dict[str, Any]) -> None:
    write_file(models / JOURNAL, json.dumps(entry, indent=1).encode())


def leaderboard(models: Path) -> list[dict[str, Any]]:
    path = models / "leaderboard.json"
    return json.loads(path.read_text()) if path.is_file() else []


def champions(models: Path) -> list[Champion]:
    """Every champion folder, oldest promotion first; ``current`` marks the one the link names."""
    link = champion_path(models)
    current = os.readlink(link) if link.is_symlink() else None
    found = []
    for record in models.glob(f"champion-*/{RECORD}"):
        found.append(Champion(record.parent.name, ChampionRecord(**json.loads(record.read_text())), record.parent.name == current))
    return sorted(found, key=lambda c: (c.record.promoted_at, c.folder))


def rollback(models: Path, alias: Alias, to: str | None, who: str, why: str, stale: Any = None) -> tuple[Champion, dict[str, Any]]:
    """Make an earlier champion current again (default: the one promoted before the current one); a leaderboard row says who and why.

    Returns the champion now current and the leaderboard row written.

    ``to`` is a champion folder name or a prefix of it, or of its flow run id. ``stale(record)``
    returns why a champion may not be used (fitted on a forgotten person), or None.
    """
    with registry_lock(models):
        history = champions(models)
        current = next((c for c in history if c.current), None)
        if current is None:
            raise ChampionError(f"no champion in {models} to roll back from")
        if to is None:
            earlier = [c for c in history if c.record.promoted_at < current.record.promoted_at and c.folder != current.folder]
            if not earlier:
                raise ChampionError(f"{current.folder} is the first champion in {models}: nothing earlier to roll back to")
            chosen = earlier[-1]
        else:
            matches = [c for c in history if c.folder.startswith(to) or c.folder.removeprefix("champion-").startswith(to)
                       or c.record.flow_run_id.startswith(to)]
            if len(matches) != 1:
                known = ", ".join(c.folder for c in history)
                raise ChampionError(f"--to {to!r} {'names several champions' if matches else 'names no champion'}; "
                                    f"the registry holds {known}")
            chosen = matches[0]
        if chosen.folder == current.folder:
            raise ChampionError(f"{chosen.folder} is the champion already")
        reason = stale(chosen.record) if stale else None
        if reason:
            raise ChampionError(f"{chosen.folder} may not be used again: {reason}")
        record = chosen.record
        row = {"time": now_utc(), "challenger": f"rollback by {who}", "seed": record.seed,
               "faces version": record.faces_version, "validation log p": record.validation_log_prob,
               "held-out log p": record.heldout_log_prob, "promoted": True,
               "why": f"rolled back from {current.folder} to {chosen.folder}: {why}", "run folder": record.run_folder,
               "transaction": uuid.uuid4().hex}
        _journal(models, {"kind": "rollback", "folder": chosen.folder, "record": record.to_json(), "row": row})
        _finish(models, chosen.folder, record, row, alias)
        return Champion(chosen.folder, record, True), row


def check(models: Path, alias: Alias, repair: bool = True) -> list[str]:
    """What is inconsistent in the registry (empty when all agree); with ``repair``, each is put right.

    An interrupted transaction is finished when its champion folder is whole, else undone; then
    the alias is made to name the champion the link names; staging left by a killed writer goes.
    """
    found: list[str] = []
    with registry_lock(models):
        journal = models / JOURNAL
        if journal.is_file():
            entry = json.loads(journal.read_text())
            folder = models / entry["folder"]
            whole = all((folder / name).is_file() for name in (*CHAMPION_FILES, RECORD))
            if whole:
                found.append(f"a {entry['kind']} to {entry['folder']} was interrupted: "
                             + ("finished (link, Variable, leaderboard row)" if repair else "its folder is whole"))
                if repair:
                    _finish(models, entry["folder"], ChampionRecord(**entry["record"]), entry["row"], alias)
            else:
                found.append(f"a {entry['kind']} to {entry['folder']} was interrupted before its folder was whole: "
                             + ("undone" if repair else "not done"))
                if repair:
                    journal.unlink()
        for partial in sorted(models.glob(".*.partial")):
            found.append(f"{partial.name}: staging left by a killed writer" + (", deleted" if repair else ""))
            if repair and partial.is_dir():
                shutil.rmtree(partial, ignore_errors=True)
            elif repair:
                partial.unlink(missing_ok=True)
        current = read_champion(models)
        if current is not None and not any(r.get("promoted") and r.get("run folder") == current.run_folder
                                           for r in leaderboard(models)):
            found.append(f"the leaderboard had no row for the champion from {current.run_folder}"
                         + (": added" if repair else ""))
            if repair:
                append_leaderboard(models, {
                    "time": now_utc(), "challenger": "faceflow champion --check", "seed": current.seed,
                    "faces version": current.faces_version, "validation log p": current.validation_log_prob,
                    "held-out log p": current.heldout_log_prob, "promoted": True,
                    "why": "the champion's row was missing: recorded by the registry check", "run folder": current.run_folder,
                })
        named = alias.get()
        expected = current.to_json() if current else None
        if named != expected:
            who = expected and expected.get("run_folder")
            found.append(f"the Variable named {named and named.get('run_folder')!r}, the link {who!r}"
                         + (": the Variable now names the link's" if repair else ""))
            if repair:
                alias.set(expected)
    return found
