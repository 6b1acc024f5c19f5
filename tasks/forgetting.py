"""Forgetting a person: which models are stale, the erasure log, and (``--purge``) every file derived from them.

A champion fitted on a faces version that held an image of a forgotten person is stale: the next
retraining replaces it whatever the margin (flows/retrain.py), and ``faceflow champion`` says so;
a challenger fitted on such a version is never promoted (``retired_reason``, inside the promotion's
transaction). A purge deletes, besides the versions that held them and the shards only those read
(tasks.store.FaceStore.purge):

- run folders computed from those versions (their config.json names the version);
- champion folders fitted on them, and the champion link when it points at one;
- cached task results computed from them: the keys noted under the version's tag
  (faceflow.caching.note_key) in the index beside the result storage, their results, lock files
  and training checkpoints;
- whatever the caller found on the Prefect server (flows/forget.py): persisted flow results
  (files here) and artifacts (deleted there).

Every forget appends one line to the erasure log, ``erasures.jsonl`` in the registry folder: when,
who asked, the person's label, the version written, what was deleted per kind, and the ids
(sha256 hashes, never pixels) of their images, so that an ingest offering one of them again is
refused (tasks.store.FaceStore.add) unless readmitted on purpose, which is logged too.

Prefect-free: the caller passes the folders in.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tasks.champion import RECORD, champion_path, now_utc

if TYPE_CHECKING:
    from tasks.registry import Alias
from tasks.store import FaceStore, StoreError, image_ids

RUN_PREFIX = "run-"
ERASURE_LOG = "erasures.jsonl"
PURGED_SUFFIX = ".purged"  # a purged version's index of cache keys: ids only, kept for the check


def stale_reason(store: FaceStore, faces_version: str) -> str | None:
    """Why a model fitted on ``faces_version`` may no longer be used, or None when it may."""
    forgotten = store.retired().get(faces_version) if faces_version else None
    if not forgotten:
        return None
    return f"fitted on faces version {faces_version[:12]}, which holds {', '.join(forgotten)}, since forgotten"


def retired_reason(store: FaceStore, faces_version: str) -> str | None:
    """Why a model fitted on ``faces_version`` may not become champion (None when it may): ``admit`` of a promotion,
    checked inside the registry lock a purge holds too."""
    reason = stale_reason(store, faces_version)
    return f"challenger not promoted: {reason}" if reason else None



# -- the erasure log ----------------------------------------------------------------------
def erasure_log(models: Path) -> Path:
    """The append-only erasure log in the registry folder: one JSON object per line."""
    return models / ERASURE_LOG


def read_erasures(models: Path) -> list[dict[str, object]]:
    """Every entry of the erasure log, oldest first (empty when nobody was ever forgotten)."""
    path = erasure_log(models)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_erasure(models: Path, entry: dict[str, object]) -> dict[str, object]:
    """Append ``entry`` as the next numbered line of the erasure log (under its own flock, fsynced); returns it numbered."""
    models.mkdir(parents=True, exist_ok=True)
    with open(erasure_log(models), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        number = sum(1 for line in handle if line.strip()) + 1
        numbered = {"erasure": number, **entry}
        handle.write(json.dumps(numbered, sort_keys=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return numbered


def forgotten_images(models: Path) -> dict[str, str]:
    """Image id -> the erasure that forgot it ("erasure N (person)"), less those readmitted since."""
    found: dict[str, str] = {}
    for entry in read_erasures(models):
        ids = entry.get("image_ids") or []
        if entry.get("kind") == "readmit":
            for identity in ids:
                found.pop(str(identity), None)
        else:
            for identity in ids:
                found[str(identity)] = f"erasure {entry['erasure']} ({entry['person']})"
    return found


def forgotten_endpoints(models: Path) -> dict[str, str]:
    """What an interpolation endpoint may not name: a forgotten person's label and image ids -> why."""
    found: dict[str, str] = {}
    for entry in read_erasures(models):
        if entry.get("kind") == "readmit":
            continue
        why = f"forgotten by erasure {entry['erasure']}"
        found[str(entry["person"])] = why
        found |= {str(identity): why for identity in entry.get("image_ids") or []}
    return found


def erasures_of(models: Path, person: str) -> list[dict[str, object]]:
    """The erasure log's forget entries for ``person``."""
    return [e for e in read_erasures(models) if e.get("person") == person and e.get("kind") != "readmit"]


# -- what a purge deletes -----------------------------------------------------------------
@dataclass
class Purged:
    """What a purge deleted, by kind (paths as text, or counts)."""

    versions: list[str] = field(default_factory=list)
    run_folders: list[str] = field(default_factory=list)
    champions: list[str] = field(default_factory=list)
    cached_results: int = 0
    lock_files: int = 0
    checkpoints: int = 0
    cache_index: int = 0
    flow_results: int = 0
    artifacts: int = 0

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)

    def counts(self) -> dict[str, int]:
        return {name: len(value) if isinstance(value, list) else int(value) for name, value in self.__dict__.items()}


@dataclass(frozen=True)
class Places:
    """Where faceflow puts what it derives from faces: the folders a purge and a scan look in."""

    models: Path
    results: Path  # Prefect's result storage (shared between machines in the several-machine set-up)
    index: Path  # the cache index beside it (faceflow.caching.cache_index)
    locks: Path  # this machine's cache lock files
    checkpoints: Path  # this machine's training checkpoints
    output_dirs: tuple[Path, ...] = ()


@dataclass
class PurgePlan:
    """Everything a purge of ``retired`` would delete, found before anything is: checked, then deleted."""

    run_folders: list[Path] = field(default_factory=list)
    champions: list[Path] = field(default_factory=list)
    unlink_champion: bool = False
    cached_results: list[Path] = field(default_factory=list)
    lock_files: list[Path] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    cache_index: list[Path] = field(default_factory=list)
    flow_results: list[Path] = field(default_factory=list)

    def paths(self) -> dict[str, list[Path]]:
        return {"run_folders": self.run_folders, "champions": self.champions, "cached_results": self.cached_results,
                "lock_files": self.lock_files, "checkpoints": self.checkpoints, "cache_index": self.cache_index,
                "flow_results": self.flow_results}


def run_folder_version(folder: Path) -> str | None:
    """The faces version id a run folder's config.json names, or None when it names none (or is unreadable)."""
    try:
        return json.loads((folder / "config.json").read_text())["data"]["faces_version"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_folders_of(retired: set[str], output_dirs: Iterable[Path]) -> list[Path]:
    """The run folders in ``output_dirs`` computed from one of the ``retired`` versions."""
    found = []
    for output_dir in dict.fromkeys(Path(d) for d in output_dirs):
        if output_dir.is_dir():
            found += [f for f in sorted(output_dir.glob(f"{RUN_PREFIX}*")) if f.is_dir() and run_folder_version(f) in retired]
    return found


def output_dirs_named_in(models: Path) -> set[Path]:
    """Folders that hold run folders the leaderboard or a champion record names."""
    named: set[Path] = set()
    leaderboard = models / "leaderboard.json"
    rows = json.loads(leaderboard.read_text()) if leaderboard.is_file() else []
    for row in rows:
        if row.get("run folder"):
            named.add(Path(row["run folder"]).parent)
    for record in models.glob(f"champion-*/{RECORD}"):
        named.add(Path(json.loads(record.read_text())["run_folder"]).parent)
    return named


def plan_purge(retired: set[str], places: Places, flow_results: Iterable[Path] = ()) -> PurgePlan:
    """Every file and folder computed from the ``retired`` versions, wherever faceflow put it; nothing deleted."""
    plan = PurgePlan()
    plan.run_folders = run_folders_of(retired, [*places.output_dirs, *output_dirs_named_in(places.models)])
    link = champion_path(places.models)
    current = link.resolve() if link.is_symlink() else None
    for record in sorted(places.models.glob(f"champion-*/{RECORD}")):
        if json.loads(record.read_text()).get("faces_version") in retired:
            plan.champions.append(record.parent)
            plan.unlink_champion |= current == record.parent.resolve()
    for version in sorted(retired):
        noted = places.index / version[:12]
        # A purged version's keys stay noted (ids of results, no data), so a later scan still finds a result left behind.
        purged = noted.with_name(noted.name + PURGED_SUFFIX)
        keys = {key for path in (noted, purged) if path.is_file() for key in path.read_text().split()}
        plan.cache_index += [noted] if noted.is_file() else []
        for key in sorted(keys):
            plan.cached_results += [p for p in [places.results / key] if p.is_file()]
            plan.lock_files += [p for p in (places.locks / f"{key}.lock", places.locks / f"{key}.pid") if p.is_file()]
            plan.checkpoints += [p for p in [places.checkpoints / f"{key}.pt"] if p.is_file()]
    plan.flow_results = sorted({Path(p) for p in flow_results if Path(p).is_file()})
    return plan


def check_writable(plan: PurgePlan, places: Places) -> None:
    """StoreError naming the first folder a purge could not delete from: before anything is deleted."""
    folders = {path.parent for paths in plan.paths().values() for path in paths}
    folders |= {champion_path(places.models).parent} if plan.unlink_champion else set()
    for folder in sorted(folders):
        if not os.access(folder, os.W_OK | os.X_OK):
            raise StoreError(f"cannot delete in {folder} (no write access): nothing was deleted; "
                             "`faceflow forget --verify PERSON` lists what still holds them")
    for folder in plan.run_folders + plan.champions:
        for inner, subfolders, _ in os.walk(folder):
            if not os.access(inner, os.W_OK | os.X_OK):
                raise StoreError(f"cannot delete in {inner} (no write access): nothing was deleted; "
                                 "`faceflow forget --verify PERSON` lists what still holds them")


def execute_purge(plan: PurgePlan, places: Places, alias: Alias | None = None) -> Purged:
    """Delete what ``plan`` found; the champion link (and ``alias``) first, so no reader follows it into a folder being deleted."""
    purged = Purged()
    if plan.unlink_champion:
        champion_path(places.models).unlink(missing_ok=True)  # no champion until the next retraining promotes one
        if alias is not None:
            alias.set(None)
    for folder in plan.run_folders:
        shutil.rmtree(folder)
        purged.run_folders.append(str(folder))
    for folder in plan.champions:
        shutil.rmtree(folder)
        purged.champions.append(str(folder))
    for kind in ("cached_results", "lock_files", "checkpoints", "flow_results"):
        paths = getattr(plan, kind)
        for path in paths:
            path.unlink(missing_ok=True)
        setattr(purged, kind, len(paths))
    for noted in plan.cache_index:  # last: its keys are what finds the files above
        kept = noted.with_name(noted.name + PURGED_SUFFIX)
        with open(kept, "a") as handle:
            handle.write(noted.read_text())
        noted.unlink()
    purged.cache_index = len(plan.cache_index)
    return purged


def purge_derived(retired: set[str], places: Places, flow_results: Iterable[Path] = ()) -> Purged:
    """Delete every run folder, champion folder, cached result, lock, checkpoint and flow result computed from ``retired``."""
    plan = plan_purge(retired, places, flow_results)
    check_writable(plan, places)
    return execute_purge(plan, places)


# -- forgetting ---------------------------------------------------------------------------
def forget_person(person: str, purge: bool, store: FaceStore, places: Places, asked_by: str = "user",
                  server: ServerSide | None = None, alias: Alias | None = None) -> dict[str, object]:
    """Write a version without ``person``; with ``purge`` also delete every version and file derived from them.

    Refused (StoreError naming the person) when the latest version does not hold them and no
    version forgot them, or when they are everyone. Forgetting someone forgotten before writes no
    new version; with ``purge`` it deletes what still holds them. The purge runs under the
    registry's lock, so no promotion interleaves with it. Each forget appends to the erasure log.
    """
    from tasks.registry import registry_lock

    done = store.forget(person)
    if done.version is None and not purge:
        raise StoreError(f"person {person!r} was forgotten in faces version {done.forgotten_in.number} already; "
                         "--purge deletes the older versions that hold them and the files computed from them")
    known = {v.id: v.number for v in store.versions()}
    retired = set(done.retired)
    ids = set(done.image_ids) | {str(i) for e in erasures_of(places.models, person) for i in e.get("image_ids") or []}
    purged = None
    if purge:
        with registry_lock(places.models):
            found = server.find(retired, earlier_numbers(places.models, retired, known)) if server else None
            plan = plan_purge(retired, places, found.flow_results if found else ())
            check_writable(plan, places)
            purged = execute_purge(plan, places, alias)
            if server and found:
                purged.artifacts = server.delete(found)
            purged.versions = [f"{v.number} ({v.short})" for v in store.purge(sorted(retired))]
    entry = append_erasure(places.models, {
        "time": now_utc(), "asked_by": asked_by, "person": person, "kind": "purge" if purge else "forget",
        "version_written": done.version.to_json() if done.version else None,
        "retired": [{"id": v, "number": known.get(v)} for v in sorted(retired)],
        "deleted": purged.counts() if purged else None, "image_ids": sorted(ids),
    })
    return {
        "erasure": entry["erasure"], "person": person, "images": done.images, "retired": list(done.retired),
        "version": done.version.to_json() if done.version else None,
        "forgotten_in": done.forgotten_in.to_json(), "purged": purged.to_json() if purged else None,
    }


def earlier_numbers(models: Path, retired: set[str], known: Mapping[str, int]) -> dict[str, int]:
    """Version id -> number for the ``retired`` versions: from the store, else from earlier erasure log lines."""
    numbers = {v: known[v] for v in retired if v in known}
    for entry in read_erasures(models):
        for held in entry.get("retired") or []:
            if held["id"] in retired and held.get("number") is not None:
                numbers.setdefault(held["id"], int(held["number"]))
    return numbers


class ServerSide:
    """What a purge finds and deletes on the Prefect server (flows/forget.py implements it)."""

    def find(self, retired: set[str], numbers: Mapping[str, int]) -> Found:
        raise NotImplementedError

    def delete(self, found: Found) -> int:
        raise NotImplementedError


@dataclass
class Found:
    """On the server: artifacts computed from (or showing) retired versions, and flow runs' persisted result files."""

    artifacts: list[tuple[str, str]] = field(default_factory=list)  # (artifact id, what it is)
    flow_results: list[Path] = field(default_factory=list)


# -- the check ----------------------------------------------------------------------------
def refuse_unless_forgotten(models: Path, person: str) -> list[dict[str, object]]:
    """The erasure log's entries for ``person``; StoreError when it names none."""
    entries = erasures_of(models, person)
    if not entries:
        raise StoreError(f"person {person!r} was never forgotten here (the erasure log {erasure_log(models)} "
                         "does not name them): nothing to verify")
    return entries


def scan(person: str, store: FaceStore, places: Places, server: ServerSide | None = None) -> list[str]:
    """Every place that still holds ``person``'s faces or something computed from them; empty after a purge.

    StoreError when the erasure log never forgot them. Looks at the store (every shard's images by
    their ids, every manifest), the run folders, the registry, the result storage and its index,
    lock files, checkpoints and, given ``server``, the server's artifacts and persisted flow results.
    """
    entries = refuse_unless_forgotten(places.models, person)
    ids = {str(i) for e in entries for i in e.get("image_ids") or []}
    retired = {str(held["id"]) for e in entries for held in e.get("retired") or []}
    numbers = earlier_numbers(places.models, retired, {v.id: v.number for v in store.versions()})
    found = []
    for version in store.versions():
        if version.id in retired:
            found.append(f"faces version {version.number} ({version.short}) holds them")
        elif any(row["image_id"] in ids for row in store.manifest(version)):
            found.append(f"faces version {version.number} ({version.short}) lists one of their image ids")
    for shard in sorted((store.root / "images").glob("*.npy")) if (store.root / "images").is_dir() else []:
        held = sum(identity in ids for identity in image_ids(np.load(shard, mmap_mode="r")))
        if held:
            found.append(f"shard {shard} holds {held} of their images")
    server_found = server.find(retired, numbers) if server else None
    plan = plan_purge(retired, places, server_found.flow_results if server_found else ())
    for kind, paths in plan.paths().items():
        found += [f"{kind.replace('_', ' ')[:-1]}: {path}" for path in paths]
    if plan.unlink_champion:
        found.append(f"the champion link {champion_path(places.models)} names a model fitted on them")
    if server_found:
        found += [f"artifact {identity} on the server: {what}" for identity, what in server_found.artifacts]
    return found


