"""Forgetting a person: which models are stale, and (``--purge``) every file derived from them.

A champion fitted on a faces version that held an image of a forgotten person is stale: the next
retraining replaces it whatever the margin (flows/retrain.py), and ``faceflow champion`` says so.
A purge deletes, besides the versions that held them and the shards only those read
(tasks.store.FaceStore.purge):

- run folders computed from those versions (their config.json names the version);
- champion folders fitted on them, and the champion link when it points at one;
- cached task results computed from them: the keys noted under the version's tag
  (faceflow.caching.note_key), in Prefect's result storage and lock folder.

Prefect-free: the caller passes the folders in.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tasks.champion import RECORD, champion_path
from tasks.store import FaceStore, StoreError

RUN_PREFIX = "run-"


def stale_reason(store: FaceStore, faces_version: str) -> str | None:
    """Why a model fitted on ``faces_version`` may no longer be used, or None when it may."""
    forgotten = store.retired().get(faces_version) if faces_version else None
    if not forgotten:
        return None
    return f"fitted on faces version {faces_version[:12]}, which holds {', '.join(forgotten)}, since forgotten"


@dataclass
class Purged:
    """What a purge deleted, by kind (paths as text)."""

    versions: list[str] = field(default_factory=list)
    run_folders: list[str] = field(default_factory=list)
    champions: list[str] = field(default_factory=list)
    cached_results: int = 0

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


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


def purge_derived(retired: set[str], output_dirs: Iterable[Path], models: Path, results: Path, locks: Path,
                  index: Path) -> Purged:
    """Delete every run folder, champion folder and cached result computed from the ``retired`` versions."""
    purged = Purged()
    for folder in run_folders_of(retired, [*output_dirs, *output_dirs_named_in(models)]):
        shutil.rmtree(folder)
        purged.run_folders.append(str(folder))
    link = champion_path(models)
    current = link.resolve() if link.is_symlink() else None
    for record in sorted(models.glob(f"champion-*/{RECORD}")):
        if json.loads(record.read_text()).get("faces_version") in retired:
            if current == record.parent.resolve():
                link.unlink()  # no champion until the next retraining promotes one
            shutil.rmtree(record.parent)
            purged.champions.append(str(record.parent))
    short = {version[:12] for version in retired}
    for noted in [index / name for name in sorted(short)]:
        if not noted.is_file():
            continue
        for key in set(noted.read_text().split()):
            for path in (results / key, locks / f"{key}.lock", locks / f"{key}.pid"):
                if path.is_file():
                    path.unlink()
                    purged.cached_results += path.parent == results
        noted.unlink()
    return purged


def forget_person(person: str, purge: bool, store: FaceStore, output_dirs: Iterable[Path], models: Path,
                  results: Path, locks: Path, index: Path) -> dict[str, object]:
    """Write a version without ``person``; with ``purge`` also delete every version and file derived from them.

    Refused (StoreError naming the person) when the latest version does not hold them and no
    version forgot them, or when they are everyone. Forgetting someone forgotten before writes no
    new version; with ``purge`` it deletes what still holds them.
    """
    done = store.forget(person)
    if done.version is None and not purge:
        raise StoreError(f"person {person!r} was forgotten in faces version {done.forgotten_in.number} already; "
                         "--purge deletes the older versions that hold them and the files computed from them")
    purged = Purged()
    if purge:
        retired = set(done.retired)
        purged = purge_derived(retired, output_dirs, models, results, locks, index)
        purged.versions = [f"{v.number} ({v.short})" for v in store.purge(sorted(retired))]
    return {
        "person": person, "images": done.images, "retired": list(done.retired),
        "version": done.version.to_json() if done.version else None,
        "forgotten_in": done.forgotten_in.to_json(), "purged": purged.to_json() if purge else None,
    }

