"""A run's folder on disk: checked before work, written whole or not at all, verified on re-runs."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

from artifacts.atomic import staged_folder, write_synced

MANIFEST = "manifest.json"
# A run folder holds about 1 MB (figures, model, PCA); ask for room to spare.
REQUIRED_FREE_BYTES = 64 * 1024 * 1024


class OutputFolderError(OSError):
    """The output folder cannot receive run folders."""


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_folder(output_dir: Path, required_free_bytes: int = REQUIRED_FREE_BYTES) -> None:
    """Refuse, before any work, an output folder that cannot take a run folder."""
    name = repr(str(output_dir))
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputFolderError(f"output folder {name} exists and is not a folder")
    existing = _nearest_existing(output_dir)
    if not existing.is_dir():
        raise OutputFolderError(f"output folder {name} cannot be created: {str(existing)!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputFolderError(f"output folder {name} is not writable (no write permission on {str(existing)!r})")
    free = shutil.disk_usage(existing).free
    if free < required_free_bytes:
        raise OutputFolderError(
            f"output folder {name}: only {free / 2**20:.1f} MiB free on its disk; a run needs "
            f"{required_free_bytes / 2**20:.0f} MiB"
        )


def sha256_of(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def write_run_folder(destination: Path, files: dict[str, bytes]) -> Path:
    """Write every file and a manifest (file -> sha256) into a hidden sibling folder, then swap it into place.

    A failure part-way, a full disk included, leaves no half-written run folder behind.
    """
    manifest = {name: sha256_of(content) for name, content in sorted(files.items())}
    files = files | {MANIFEST: json.dumps(manifest, indent=1).encode()}
    try:
        with staged_folder(destination) as staging:
            for name, content in files.items():
                write_synced(staging / name, content)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise OutputFolderError(
                f"no space left on the disk of {str(destination.parent)!r} while writing run folder "
                f"{destination.name}; nothing was written"
            ) from error
        raise
    return destination


def run_folder_problems(folder: Path) -> list[str]:
    """What is wrong with a run folder against its manifest: missing or changed files (empty when intact)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return ["the folder or its manifest.json is missing"]
    except (OSError, ValueError):
        return ["manifest.json is unreadable"]
    problems = []
    for name, digest in manifest.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_of(path.read_bytes()) != digest:
            problems.append(f"{name} has changed")
    return problems
