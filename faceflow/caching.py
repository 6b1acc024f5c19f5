"""Cache keys built from what determines a task's output, never from pickled objects.

Fitted estimators and torch modules do not pickle byte-for-byte the same twice, so a key
hashed from them misses the cache. Every task result in faceflow is a ``Keyed`` value:
it carries ``key``, a content address derived from its own inputs' keys and parameters.
The cache policy hashes those keys (and plain parameters) instead of the objects.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.locking.filesystem import FileSystemLockManager
from pydantic import BaseModel

from faceflow.settings import prefect_home

# Bump when a task's output changes meaning without its source changing (e.g. a
# dependency's behaviour); it is part of every key.
KEY_VERSION = "1"


@runtime_checkable
class Keyed(Protocol):
    """A task result addressed by its content."""

    key: str


def _identity(value: Any) -> Any:
    """A JSON-able stand-in for a task input that determines its output."""
    if isinstance(value, Keyed):
        return {"key": value.key}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return {"path": str(value), "sha256": file_sha256(value) if value.is_file() else None}
    if isinstance(value, (list, tuple)):
        return [_identity(item) for item in value]
    if isinstance(value, dict):
        return {str(k): _identity(v) for k, v in sorted(value.items())}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(
        f"cannot build a cache key from a {type(value).__name__}; return a Keyed value instead"
    )


def content_key(*parts: Any) -> str:
    """A short hex digest of the identities of ``parts``."""
    payload = json.dumps([KEY_VERSION, *(_identity(p) for p in parts)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def array_digest(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes."""
    digest = hashlib.sha256(f"{array.dtype}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class KeyedInputs(CachePolicy):
    """Cache key = the task's name and source + the identities of its inputs."""

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        return f"{task_ctx.task.name}-" + content_key(project_source_digest(), inputs)


@lru_cache(maxsize=1)
def project_source_digest() -> str:
    """sha256 over faceflow's source and its numerical libraries' versions.

    Any change to either invalidates every cached result.

    Coarser than per-task source, but a task's output also depends on the helpers it
    calls, and a stale model is worse than a retrain.
    """
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    # Results also depend on the numerical libraries: an upgrade must not reuse old models.
    for library in ("numpy", "scipy", "scikit-learn", "torch", "normflows"):
        digest.update(f"{library}=={importlib.metadata.version(library)}".encode())
    for package in ("faceflow", "tasks", "artifacts"):
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


class ProcessLockManager(FileSystemLockManager):
    """Prefect's lock files, plus the holder's process id, so a killed holder's lock is not waited on forever.

    Prefect's FileSystemLockManager writes locks without an expiry; a run killed with SIGKILL
    while holding one would make every later identical run wait for good.
    """

    def _owner_path(self, key: str) -> Path:
        return self._lock_path_for_key(key).with_suffix(".pid")

    def _record_owner(self, key: str) -> None:
        self._owner_path(key).write_text(str(os.getpid()))

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None) -> bool:
        acquired = super().acquire_lock(key, holder, acquire_timeout, hold_timeout)
        if acquired:
            self._record_owner(key)
        return acquired

    async def aacquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        acquired = await super().aacquire_lock(key, holder, acquire_timeout, hold_timeout)
        if acquired:
            self._record_owner(key)
        return acquired

    def release_lock(self, key: str, holder: str) -> None:
        super().release_lock(key, holder)
        self._owner_path(key).unlink(missing_ok=True)

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        if not super().is_locked(key, use_cache):
            return False
        try:
            owner = int(self._owner_path(key).read_text())
        except (OSError, ValueError):
            return True  # just acquired, owner not written yet
        if _process_alive(owner):
            return True
        self._lock_path_for_key(key).unlink(missing_ok=True)
        self._owner_path(key).unlink(missing_ok=True)
        self._locks.pop(key, None)
        return False


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Serializable: a second identical run waits for the first one's task and reads its result
# instead of computing it again (the lock files live beside Prefect's result storage).
KEYED_INPUTS = KeyedInputs().configure(
    isolation_level="SERIALIZABLE", lock_manager=ProcessLockManager(prefect_home() / "locks")
)
