"""Files and folders written whole or not at all: staged beside their destination, fsynced, renamed into place.

The one staging-and-rename helper of faceflow: the face store's versions and pointer, a run's
folder, the champion's folder and link, and the leaderboard all go through it. A writer killed
at any point leaves the old file or folder, or the new one, never a mix; what it staged is a
hidden ``.*.partial`` entry (the store stages under its own ``.staging`` and clears it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_synced(path: Path, data: bytes) -> None:
    """Write and fsync: a rename must never publish a file whose bytes are still only in the page cache."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_folder(path: Path) -> None:
    """Make the renames in folder ``path`` durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_file(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one rename: a reader sees the old bytes or the new ones."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        write_synced(temporary, data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_folder(path.parent)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextmanager
def staged_folder(destination: Path, staging_root: Path | None = None) -> Iterator[Path]:
    """A fresh folder to fill; if the block ends normally it takes ``destination``'s place, else it is deleted.

    Staged in ``staging_root`` (default: beside ``destination``; the same file system either way).
    An existing ``destination`` is renamed aside, the new folder renamed in, and the old one deleted.
    """
    parent = staging_root or destination.parent
    parent.mkdir(parents=True, exist_ok=True)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{destination.name}.", suffix=".partial"))
    staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would hide the folder from other users
    try:
        yield staging
        if destination.exists():
            retired = destination.with_name(f".{destination.name}.old-{uuid.uuid4().hex}")
            os.replace(destination, retired)
            os.replace(staging, destination)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, destination)
        fsync_folder(destination.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def swap_link(link: Path, target: str) -> None:
    """Point the symlink ``link`` at ``target`` (relative to its folder) in one rename."""
    temporary = link.with_name(f".{link.name}.{uuid.uuid4().hex}.link")
    temporary.symlink_to(target)
    try:
        os.replace(temporary, link)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_folder(link.parent)
