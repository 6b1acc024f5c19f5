"""The registry in ``models/``: the champion, every earlier champion, the leaderboard, changed one transaction at a time.

A promotion (or a rollback) changes four things: the champion's folder, the ``champion`` link,
the leaderboard and the alias (the Prefect Variable ``faceflow-champion``, which the caller
passes in as ``Alias``). It runs under the registry's lock and writes a journal first
(``models/.transaction.json``: what it is about to do), which it deletes last.

- **Compare and swap.** A promotion names the champion folder its challenger was judged against
  (``judged_against``); under the lock it goes ahead only if that folder is still current, else it
  changes nothing and says which one is (``Promotion.moved_to``), and the caller judges again.
- **Recovery first.** Every transaction, and ``check`` (``faceflow champion --check``), first
  finishes or undoes the one before it if that one left its journal (killed, or failed at a step,
  e.g. the Variable could not be set): finished when its folder is whole, else undone with its
  leaderboard row kept as not promoted. So no later transaction overwrites an earlier journal.
- **No folder replaced.** Each promotion writes a folder of its own name (the transaction id is
  part of it), so a champion folder never changes once written and a reader that resolved the
  link once reads one champion whole. ``.<name>.old-<hex>`` folders left by earlier code's
  same-name promotions are recovered into history.

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
    CHAMPION_FILES, RECORD, ChampionError, ChampionRecord, append_leaderboard, champion_path, now_utc, pause_point,
    resolve_champion,
)

JOURNAL = ".transaction.json"
LOCK = ".registry.lock"
# Test-only fault injection: the process SIGKILLs itself right after the named step of a promotion.
FAULT_VARIABLE = "FACEFLOW_FAULT_AFTER"
STEPS = ("journal", "folder", "link", "leaderboard", "alias")
UNCHECKED = "(replace whatever is current)"  # ``judged_against`` for callers that judge nothing (benchmarks, tests)


class RegistryError(ChampionError):
    """A registry transaction could not be completed; its journal is kept for the next transaction or ``--check``."""


@dataclass(frozen=True)
class Promotion:
    """What a promotion transaction did."""

    folder: Path | None  # the champion folder it installed; None when it promoted nothing
    moved_to: str | None = None  # the current champion, when it was no longer the one judged against (nothing written)
    refused: str | None = None  # why ``admit`` refused the challenger (its leaderboard row says so)


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


def folder_name(run_folder: Path, record: ChampionRecord, transaction: str) -> str:
    """A name no other promotion uses: the same run promoted twice gets two folders, and no folder is ever replaced."""
    return f"champion-{run_folder.name.removeprefix('run-')}-{record.seed}-{transaction[:8]}"


def current_folder(models: Path) -> str | None:
    """The name of the champion folder the link names now (None when there is no champion)."""
    champion = resolve_champion(models)
    return champion.name if champion else None


def promote(
    run_folder: Path, record: ChampionRecord, row: dict[str, Any], models: Path, alias: Alias, *,
    judged_against: str | None, admit: Callable[[ChampionRecord], str | None] | None = None,
) -> Promotion:
    """Make the run's model the champion (folder, link, leaderboard row, alias: one transaction), if the champion is
    still ``judged_against`` (its folder name; None for no champion) and ``admit(record)`` names no reason against it.

    When the champion moved, nothing is written: ``moved_to`` names the current one, to judge against.
    When ``admit`` refuses, the row is written as not promoted, with the reason. ``UNCHECKED`` replaces
    whatever is current (for callers that judge nothing).
    """
    with registry_lock(models):
        _recover(models, alias, repair=True)
        current = current_folder(models)
        if judged_against != UNCHECKED and current != judged_against:
            return Promotion(None, moved_to=current or "(no champion)")
        pause_point("promotion-checked")  # test-only: a second promotion waits on the lock here, never judges on
        transaction = uuid.uuid4().hex
        row = row | {"transaction": transaction}
        refused = admit(record) if admit else None
        if refused:
            append_leaderboard(models, row | {"promoted": False, "why": f"not promoted: {refused}"})
            return Promotion(None, refused=refused)
        target = models / folder_name(run_folder, record, transaction)
        _journal(models, {"kind": "promotion", "folder": target.name, "record": record.to_json(), "row": row})
        _fault("journal")
        _steps(target.name, lambda: _write_folder(run_folder, record, target), lambda: _finish(models, target.name, record, row, alias))
        return Promotion(target)


def _write_folder(run_folder: Path, record: ChampionRecord, target: Path) -> None:
    with staged_folder(target) as staging:
        for name in CHAMPION_FILES:
            shutil.copy2(run_folder / name, staging / name)
        write_synced(staging / RECORD, json.dumps(record.to_json(), indent=1).encode())
    _fault("folder")


def _steps(folder: str, *steps: Callable[[], None]) -> None:
    """Run a transaction's steps; a failure at any of them says the journal keeps the transaction for repair."""
    try:
        for step in steps:
            step()
    except Exception as error:
        raise RegistryError(
            f"the transaction to {folder} stopped part way ({type(error).__name__}: {error}); its journal "
            f"{JOURNAL} keeps it: the next promotion or rollback, or `faceflow champion --check`, finishes or undoes it"
        ) from error


def _finish(models: Path, folder: str, record: ChampionRecord, row: dict[str, Any], alias: Alias) -> None:
    """The steps after the folder: link, leaderboard row (once), alias, then the journal goes.

    The row comes before the alias: a Variable that cannot be set (the server down) leaves the
    history whole on disk, and the journal for the next transaction or ``--check`` to finish.
    """
    swap_link(champion_path(models), folder)
    _fault("link")
    _append_once(models, row)
    _fault("leaderboard")
    alias.set(record.to_json())
    _fault("alias")
    (models / JOURNAL).unlink(missing_ok=True)


def _append_once(models: Path, row: dict[str, Any]) -> None:
    if not any(r.get("transaction") == row["transaction"] for r in leaderboard(models)):
        append_leaderboard(models, row)


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
        _recover(models, alias, repair=True)
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
        _steps(chosen.folder, lambda: _finish(models, chosen.folder, record, row, alias))
        return Champion(chosen.folder, record, True), row


def check(models: Path, alias: Alias, repair: bool = True) -> list[str]:
    """What is inconsistent in the registry (empty when all agree); with ``repair``, each is put right.

    An interrupted transaction is finished when its champion folder is whole, else undone (its
    row kept, as not promoted); champion folders set aside by earlier code's same-name promotions
    (``.<name>.old-<hex>``) go back into history; the alias is made to name the champion the link
    names; staging left by a killed writer goes.
    """
    with registry_lock(models):
        found = _recover(models, alias, repair)
        for partial in sorted(models.glob(".*.partial")):
            found.append(f"{partial.name}: staging left by a killed writer" + (", deleted" if repair else ""))
            if repair and partial.is_dir():
                shutil.rmtree(partial, ignore_errors=True)
            elif repair:
                partial.unlink(missing_ok=True)
        champion = resolve_champion(models)
        current = champion.record if champion else None
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


def _whole(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (*CHAMPION_FILES, RECORD))


def _recover(models: Path, alias: Alias, repair: bool) -> list[str]:
    """Under the lock: set-aside champion folders back into history, then the interrupted transaction finished or undone.

    Returns what was found (and, with ``repair``, put right).
    """
    found = []
    for aside in sorted(p for p in models.glob(".champion-*.old-*") if p.is_dir()):
        name = aside.name[1:].rsplit(".old-", 1)[0]
        if not _whole(aside):
            found.append(f"{aside.name}: part of a champion folder set aside by a same-name promotion; left for inspection")
            continue
        taken = (models / name).exists()
        back = f"{name}-kept-{aside.name.rsplit('.old-', 1)[1][:8]}" if taken else name
        found.append(f"{aside.name}: a champion folder set aside by a same-name promotion"
                     + (f": back in history as {back}" if repair else ""))
        if repair:
            os.replace(aside, models / back)
    journal = models / JOURNAL
    if not journal.is_file():
        return found
    entry = json.loads(journal.read_text())
    folder = models / entry["folder"]
    whole = _whole(folder) and json.loads((folder / RECORD).read_text()) == entry["record"]
    if whole:
        found.append(f"a {entry['kind']} to {entry['folder']} was interrupted: "
                     + ("finished (link, leaderboard row, Variable)" if repair else "its folder is whole"))
        if repair:
            _steps(entry["folder"], lambda: _finish(models, entry["folder"], ChampionRecord(**entry["record"]), entry["row"], alias))
    else:
        found.append(f"a {entry['kind']} to {entry['folder']} was interrupted before its folder was whole: "
                     + ("undone, its leaderboard row kept as not promoted" if repair else "not done"))
        if repair:
            _append_once(models, entry["row"] | {
                "promoted": False, "why": f"{entry['row'].get('why') or ''} (not promoted: the promotion was "
                                          "interrupted before its champion folder was whole, and undone)".lstrip()})
            journal.unlink()
    return found
