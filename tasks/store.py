"""The face store: every image once, content-addressed, and immutable versions of who is in it.

Layout of the store folder (``FACEFLOW_FACES_DIR``, default ``faces/``)::

    images/<sha256 of the file>.npy     a shard: (n, 64, 64) float32 in [0, 1], the images one
                                        version added that the store did not hold yet
    versions/<version id>/manifest.csv  one row per image: image_id, person, source, added_in, shard, row
    versions/<version id>/version.json  number, parent, created, counts, the shards it reads
    LATEST                              the id of the highest-numbered version
    .lock                               held (fcntl.flock) by the one writer at a time
    .staging/                           a writer's files before they are renamed into place

An image's id is the sha256 of its 64x64 float32 (little-endian, C order) bytes. A version's id
is the sha256 of its manifest, so a version is named by its content; ``added_in`` holds version
numbers (1, 2, ...), which the lock makes consecutive. Every file is written under ``.staging``
and renamed into place, the version folder last: a version exists whole or not at all, and a
writer killed at any point leaves at most an unreferenced shard, deleted by the next writer.
Shards, not one file per image: reading 40,000 faces is then a few ``np.load`` calls.

Forgetting a person writes a version without them that reads no shard holding their pixels (the
shards' other images are copied into a new one); ``purge`` deletes the versions that held them,
and with them the only shards that do.

Prefect-free, torch-free: numpy and the standard library only.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from artifacts.atomic import fsync_folder, staged_folder, write_file, write_synced

IMAGE_SHAPE = (64, 64)
MANIFEST_COLUMNS = ("image_id", "person", "source", "added_in", "shard", "row")
# A person's name becomes a CSV cell, a CLI argument and a figure label: letters, digits and
# ". _ -", starting with a letter or digit, at most 64 characters.
PERSON_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MIN_VERSION_PREFIX = 6  # a shorter hex prefix would too often name several versions


class StoreError(ValueError):
    """The store cannot do what was asked; the message names the field, file or version."""


class UnknownVersionError(StoreError):
    """A version reference that names no version (or several)."""


def image_id(image: np.ndarray) -> str:
    """The content address of one 64x64 image: sha256 of its float32 little-endian bytes."""
    return hashlib.sha256(np.ascontiguousarray(image, dtype="<f4").tobytes()).hexdigest()


def image_ids(images: np.ndarray) -> list[str]:
    """The content address of each image of an (n, 64, 64) array."""
    flat = np.ascontiguousarray(images, dtype="<f4").reshape(len(images), -1)
    return [hashlib.sha256(row.tobytes()).hexdigest() for row in flat]


def check_person(name: object, where: str) -> str:
    """``name`` if it is a valid person label; else a StoreError naming ``where``."""
    text = name if isinstance(name, str) else str(name)
    if not PERSON_PATTERN.fullmatch(text):
        shown = repr(text) if text else "empty"
        raise StoreError(
            f"{where}: person label {shown} is not a valid name "
            "(letters, digits, '.', '_' or '-', starting with a letter or digit, at most 64 characters)"
        )
    return text


def check_images(images: np.ndarray, where: Callable[[int], str]) -> np.ndarray:
    """(n, 64, 64) float32 in [0, 1], finite and not constant, or a StoreError naming the image."""
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise StoreError(f"{where(-1)}: images have shape {images.shape}; expected (n, 64, 64)")
    if not np.issubdtype(images.dtype, np.floating):
        raise StoreError(f"{where(-1)}: images are {images.dtype}; expected float32 in [0, 1]")
    flat = images.reshape(len(images), -1)
    bad = np.flatnonzero(~np.isfinite(flat).all(axis=1))
    if len(bad):
        raise StoreError(f"{where(int(bad[0]))}: holds NaN or infinite pixels ({len(bad)} images do)")
    bad = np.flatnonzero((flat.min(axis=1, initial=0.0) < 0) | (flat.max(axis=1, initial=0.0) > 1))
    if len(bad):
        raise StoreError(f"{where(int(bad[0]))}: pixels outside [0, 1] ({len(bad)} images have some)")
    bad = np.flatnonzero(flat.min(axis=1) == flat.max(axis=1)) if len(flat) else []
    if len(bad):
        raise StoreError(f"{where(int(bad[0]))}: every pixel is {float(flat[bad[0], 0]):g}, a constant image ({len(bad)} are)")
    return np.ascontiguousarray(images, dtype=np.float32)


@dataclass(frozen=True)
class Version:
    """One immutable version: its id (sha256 of its manifest), number, and counts."""

    id: str
    number: int
    parent: str | None
    created: str  # ISO 8601, UTC
    people: int
    images: int
    added: int  # images new in this version
    duplicates: int  # images offered to this version that the store already held
    shards: tuple[str, ...]  # shard files the manifest reads
    forgotten: tuple[str, ...] = ()  # people this version forgot: its parent held them, it holds none of their images
    retired: tuple[str, ...] = ()  # ids of every version that held an image of a person this version forgot

    @property
    def short(self) -> str:
        return self.id[:12]

    def to_json(self) -> dict[str, object]:
        return {**self.__dict__, "shards": list(self.shards)}

    @classmethod
    def from_json(cls, record: dict[str, object]) -> Version:
        tuples = {name: tuple(record.get(name, ())) for name in ("shards", "forgotten", "retired")}
        return cls(**{**record, **tuples})  # type: ignore[arg-type]


@dataclass(frozen=True)
class VersionFaces:
    """The images of one version in manifest order, with their ids, people and provenance."""

    version: Version
    images: np.ndarray  # (n, 64, 64) float32 in [0, 1]
    image_ids: tuple[str, ...]
    people: tuple[str, ...]
    sources: tuple[str, ...]
    added_in: np.ndarray  # (n,) int: the version number each image arrived in


@dataclass(frozen=True)
class AddResult:
    """What an ingest did: the new version (None when nothing was new) and what it skipped."""

    version: Version | None
    previous: Version | None
    added: int
    duplicates: int  # already in the store
    repeated: int  # offered more than once in this ingest (the first one counts)
    relabelled: int  # duplicates whose offered person differs from the stored one (the stored one stays)


@dataclass(frozen=True)
class ForgetResult:
    """What forgetting a person did: the version without them, and the versions that still hold them."""

    person: str
    version: Version | None  # None when the latest version did not hold them (forgotten before)
    forgotten_in: Version  # the version that forgot them (``version``, or an earlier one)
    images: int  # their images in the version before
    retired: tuple[str, ...]  # ids of every version that held one of their images
    image_ids: tuple[str, ...] = ()  # the ids of their images (hashes, no pixels): what the erasure log keeps


class FaceStore:
    """A store folder: read versions without a lock, write them one writer at a time."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -- reading --------------------------------------------------------------------------
    def versions(self) -> list[Version]:
        """Every complete version, oldest first."""
        folder = self.root / "versions"
        if not folder.is_dir():
            return []
        found = []
        for entry in folder.iterdir():
            record = entry / "version.json"
            if record.is_file():  # a version folder is renamed into place complete; no partial one exists
                found.append(Version.from_json(json.loads(record.read_text())))
        return sorted(found, key=lambda version: version.number)

    def latest(self) -> Version | None:
        """The highest-numbered version.

        Read from the versions themselves, not trusted to the LATEST pointer: a writer killed
        between renaming its version into place and moving the pointer would otherwise leave
        every reader on the version before until the next writer tidied up.
        """
        versions = self.versions()
        return versions[-1] if versions else None

    def resolve(self, reference: str | None) -> Version:
        """The version a reference names: None or 'latest', a number ('3'), or an id or id prefix (>= 6 hex digits)."""
        versions = self.versions()
        if not versions:
            raise UnknownVersionError(f"the face store {self.root} holds no version yet")
        text = (reference or "latest").strip().lower()
        if text == "latest":
            return self.latest() or versions[-1]
        matches = [v for v in versions if str(v.number) == text.removeprefix("v")]
        if not matches and len(text) >= MIN_VERSION_PREFIX and re.fullmatch(r"[0-9a-f]+", text):
            matches = [v for v in versions if v.id.startswith(text)]
        if len(matches) != 1:
            known = ", ".join(f"{v.number} ({v.short})" for v in versions[-5:])
            problem = "names several versions" if matches else "is not a version"
            raise UnknownVersionError(
                f"faces version {reference!r} {problem} in {self.root}; it holds {known}"
                + (" and older" if len(versions) > 5 else "")
            )
        return matches[0]

    def retired(self) -> dict[str, tuple[str, ...]]:
        """Every version that held an image of a forgotten person: version id -> the people it held that were forgotten."""
        found: dict[str, tuple[str, ...]] = {}
        for version in self.versions():
            for held in version.retired:
                found[held] = tuple(dict.fromkeys([*found.get(held, ()), *version.forgotten]))
        return found

    def manifest(self, version: Version) -> list[dict[str, str]]:
        """The version's manifest rows, as strings."""
        with open(self.root / "versions" / version.id / "manifest.csv", newline="") as handle:
            return list(csv.DictReader(handle))

    def read(self, version: Version) -> VersionFaces:
        """Every image of ``version``, in manifest order: one ``np.load`` per shard."""
        rows = self.manifest(version)
        images = np.empty((len(rows), *IMAGE_SHAPE), dtype=np.float32)
        by_shard: dict[str, tuple[list[int], list[int]]] = {}
        for position, row in enumerate(rows):
            targets, sources = by_shard.setdefault(row["shard"], ([], []))
            targets.append(position)
            sources.append(int(row["row"]))
        for shard, (targets, sources) in by_shard.items():
            stored = np.load(self.root / "images" / shard, mmap_mode="r")
            start = targets[0]
            if targets == list(range(start, start + len(targets))) and sources == list(range(len(stored))):
                images[start : start + len(targets)] = stored  # the usual case: a whole shard in order, one copy
            else:
                images[targets] = stored[sources]
        return VersionFaces(
            version=version,
            images=images,
            image_ids=tuple(row["image_id"] for row in rows),
            people=tuple(row["person"] for row in rows),
            sources=tuple(row["source"] for row in rows),
            added_in=np.array([int(row["added_in"]) for row in rows], dtype=np.int64),
        )

    def verify(self, version: Version) -> list[str]:
        """Images whose bytes no longer match their id (a damaged shard); empty when all are intact."""
        faces = self.read(version)
        return [
            f"{source}: image {expected[:12]} reads as {found[:12]}"
            for source, expected, found in zip(faces.sources, faces.image_ids, image_ids(faces.images))
            if expected != found
        ]

    # -- writing --------------------------------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[None]:
        """The store's one writer: an exclusive flock, which the kernel drops if the holder dies."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                self._tidy()
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def ensure_first_version(self, make: Callable[[], tuple[np.ndarray, Sequence[str], Sequence[str]]]) -> Version:
        """The latest version; on first use, version 1 from ``make()`` = (images, people, sources)."""
        existing = self.latest()
        if existing is not None:
            return existing
        with self.locked():
            existing = self.latest()  # another process may have made it while this one waited
            if existing is not None:
                return existing
            images, people, sources = make()
            result = self._add_locked(images, people, sources)
            assert result.version is not None  # an empty store takes every image
            return result.version

    def add(self, images: np.ndarray, people: Sequence[str], sources: Sequence[str],
            forgotten: Mapping[str, str] | None = None, readmit: bool = False) -> AddResult:
        """A new version = the latest + those of ``images`` the store does not hold; nothing when none is new.

        Every image and label is checked before anything is written: bad input leaves the store as it was.
        ``forgotten`` maps the image ids of forgotten people to the erasure that forgot them: offering
        one is refused naming it, unless ``readmit`` (the caller records the readmission).
        """
        with self.locked():
            return self._add_locked(images, people, sources, forgotten or {}, readmit)

    def _add_locked(self, images: np.ndarray, people: Sequence[str], sources: Sequence[str],
                    forgotten: Mapping[str, str] | None = None, readmit: bool = False) -> AddResult:
        if not (len(images) == len(people) == len(sources)):
            raise StoreError(f"{len(images)} images, {len(people)} people and {len(sources)} sources: one of each per image")
        if len(images) == 0:
            raise StoreError("no images to add")
        images = check_images(images, lambda i: f"image {i} ({sources[i]})" if i >= 0 else "images")
        names = [check_person(person, f"image {i} ({sources[i]})") for i, person in enumerate(people)]
        previous = self.latest()
        rows = self.manifest(previous) if previous else []
        held = {row["image_id"]: row["person"] for row in rows}
        ids = image_ids(images)
        new: list[int] = []
        seen: set[str] = set()
        duplicates = repeated = relabelled = 0
        for index, identity in enumerate(ids):
            if identity in held:
                duplicates += 1
                relabelled += held[identity] != names[index]
            elif identity in seen:
                repeated += 1
            else:
                seen.add(identity)
                new.append(index)
        forgotten = forgotten or {}
        erased = [i for i in new if ids[i] in forgotten]
        if erased and not readmit:
            first = erased[0]
            raise StoreError(f"image {first} ({sources[first]}): image {ids[first][:12]} was forgotten by {forgotten[ids[first]]} "
                             f"({len(erased)} offered images were); --readmit adds them on purpose, recorded in the erasure log")
        if not new:
            return AddResult(None, previous, 0, duplicates, repeated, relabelled)
        number = (previous.number if previous else 0) + 1
        shard_bytes = _npy_bytes(images[new])
        shard = hashlib.sha256(shard_bytes).hexdigest() + ".npy"
        new_rows = [
            {"image_id": ids[i], "person": names[i], "source": str(sources[i]), "added_in": str(number),
             "shard": shard, "row": str(row)}
            for row, i in enumerate(new)
        ]
        manifest = _manifest_bytes(rows + new_rows)
        version = Version(
            id=hashlib.sha256(manifest).hexdigest(),
            number=number,
            parent=previous.id if previous else None,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            people=len({row["person"] for row in rows + new_rows}),
            images=len(rows) + len(new_rows),
            added=len(new_rows),
            duplicates=duplicates + repeated,
            shards=tuple(dict.fromkeys([*(previous.shards if previous else ()), shard])),
        )
        self._commit(version, manifest, shard_bytes)
        return AddResult(version, previous, len(new_rows), duplicates, repeated, relabelled)

    def forget(self, person: str) -> ForgetResult:
        """A new version = the latest without every image of ``person``; its pixels stay only in older versions.

        The new version reads no shard that holds one of their images (the shards' other images are
        copied into a new one), so deleting the versions that held them (``purge``) deletes their
        pixels. The version records whom it forgot and which versions held them: a model fitted on
        one of those is stale (tasks.forgetting).
        """
        check_person(person, "person")
        with self.locked():
            latest = self.latest()
            if latest is None:
                raise StoreError(f"person {person!r} is not in the face store {self.root}: it holds no version yet")
            rows = self.manifest(latest)
            theirs = [row for row in rows if row["person"] == person]
            if not theirs:
                earlier = [v for v in self.versions() if person in v.forgotten]
                if earlier:
                    still = [v for v in self.versions() if v.id in set(earlier[-1].retired)]
                    ids = {row["image_id"] for v in still for row in self.manifest(v) if row["person"] == person}
                    return ForgetResult(person, None, earlier[-1], 0, earlier[-1].retired, tuple(sorted(ids)))
                people = sorted({row["person"] for row in rows})
                shown = ", ".join(people[:8]) + (f" and {len(people) - 8} more" if len(people) > 8 else "")
                raise StoreError(f"person {person!r} is not in faces version {latest.number} ({latest.short}); it holds {shown}")
            kept = [row for row in rows if row["person"] != person]
            if not kept:
                raise StoreError(f"person {person!r} is everyone in faces version {latest.number}: forgetting them would leave no face")
            forgotten_ids = {row["image_id"] for row in theirs}
            retired = tuple(v.id for v in self.versions() if any(r["image_id"] in forgotten_ids for r in self.manifest(v)))
            version = self._write_without(latest, kept, theirs, retired)
            return ForgetResult(person, version, latest, len(theirs), retired, tuple(sorted(forgotten_ids)))

    def _write_without(self, latest: Version, kept: list[dict[str, str]], theirs: list[dict[str, str]],
                       retired: tuple[str, ...]) -> Version:
        touched = {row["shard"] for row in theirs}
        moving = [row for row in kept if row["shard"] in touched]
        shards = [shard for shard in latest.shards if shard not in touched]
        rows = [dict(row) for row in kept]
        shard_bytes = None
        if moving:
            pixels = np.stack([np.load(self.root / "images" / row["shard"], mmap_mode="r")[int(row["row"])] for row in moving])
            shard_bytes = _npy_bytes(pixels)
            new_shard = hashlib.sha256(shard_bytes).hexdigest() + ".npy"
            moved = {row["image_id"]: index for index, row in enumerate(moving)}
            for row in rows:
                if row["image_id"] in moved:
                    row["shard"], row["row"] = new_shard, str(moved[row["image_id"]])
            shards.append(new_shard)
        manifest = _manifest_bytes(rows)
        version = Version(
            id=hashlib.sha256(manifest).hexdigest(), number=latest.number + 1, parent=latest.id,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            people=len({row["person"] for row in rows}), images=len(rows), added=0, duplicates=0,
            shards=tuple(dict.fromkeys(shards)), forgotten=(theirs[0]["person"],), retired=retired,
        )
        self._commit(version, manifest, shard_bytes)
        return version

    def _commit(self, version: Version, manifest: bytes, shard_bytes: bytes | None) -> None:
        """Place the version's new shard (if any), then its folder, then the pointer: the folder's rename is the commit.

        Everything is staged under ``.staging`` first; a failure before the commit takes the placed
        shard back, and a writer killed before it leaves an unreferenced shard the next writer deletes.
        """
        (self.root / "images").mkdir(exist_ok=True)
        placed: Path | None = None
        try:
            with staged_folder(self.root / "versions" / version.id, staging_root=self.root / ".staging") as folder:
                write_synced(folder / "manifest.csv", manifest)
                write_synced(folder / "version.json", json.dumps(version.to_json(), indent=1).encode())
                if shard_bytes is not None:
                    shard = hashlib.sha256(shard_bytes).hexdigest() + ".npy"
                    write_synced(folder / shard, shard_bytes)
                    placed = self.root / "images" / shard
                    os.replace(folder / shard, placed)
            placed = None  # the version is in place, whole: the shard is referenced
        finally:
            if placed is not None:
                placed.unlink(missing_ok=True)
        write_file(self.root / "LATEST", (version.id + "\n").encode())

    def purge(self, version_ids: Sequence[str]) -> list[Version]:
        """Delete these versions (never the latest) and every shard no remaining version reads; returns those deleted.

        For forgetting for good: the versions that held a forgotten person go, and with them the
        only shards holding their pixels.
        """
        with self.locked():
            latest = self.latest()
            doomed = [v for v in self.versions() if v.id in set(version_ids)]
            if latest is not None and any(v.id == latest.id for v in doomed):
                raise StoreError(f"faces version {latest.number} ({latest.short}) is the latest: it cannot be purged")
            for version in doomed:
                # Renamed out of versions/ first: a reader never sees a version folder losing files.
                gone = self.root / ".staging" / f"purged-{version.id}"
                gone.parent.mkdir(parents=True, exist_ok=True)
                os.rename(self.root / "versions" / version.id, gone)
            fsync_folder(self.root / "versions")
            self._tidy()  # deletes the staging folder and every shard only they read
            return doomed

    def _tidy(self) -> None:
        """Under the lock: drop what a killed writer left (staging files, an unreferenced shard) and fix the pointer."""
        shutil.rmtree(self.root / ".staging", ignore_errors=True)
        versions = self.versions()
        if versions:
            referenced = {shard for version in versions for shard in version.shards}
            for shard in (self.root / "images").glob("*.npy"):
                if shard.name not in referenced:
                    shard.unlink()
            pointer = self.root / "LATEST"
            if not pointer.is_file() or pointer.read_text().strip() != versions[-1].id:
                write_file(pointer, (versions[-1].id + "\n").encode())


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype="<f4"), allow_pickle=False)
    return buffer.getvalue()


def _manifest_bytes(rows: list[dict[str, str]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()

