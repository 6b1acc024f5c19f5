"""Prefect's cache policy for faceflow's tasks: keyed on the content keys of their inputs.

Every task input is a ``Keyed`` result or a plain parameter (faceflow.keys); the policy hashes
those keys with the digest of faceflow's source, so editing the code invalidates the cache.

Flows run a version's steps under the tag ``faces:<version id, 12 digits>`` (``version_tag``),
which the UI shows on each task run; the policy also notes each key computed under it in the
cache index, ``.faceflow-cache-index/<version>`` inside Prefect's result storage: beside the
results, so it is shared wherever they are (every machine and Dask worker of the several-machine
set-up notes into the one index), and forgetting a person can delete the cached results, lock
files and checkpoints computed from the versions that held them (tasks.forgetting).

Its isolation is serializable: a second identical run waits for the first one's step and reads
its result. The locks live in Redis when FACEFLOW_REDIS_URL is set (they expire, so a dead
machine's lock frees itself), else in lock files beside Prefect's result storage.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.locking.filesystem import FileSystemLockManager
from prefect.locking.protocol import LockManager
from prefect.results import get_result_store

from faceflow.keys import content_key, project_source_digest
from faceflow.settings import lock_seconds, prefect_home, redis_url, result_storage


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
        key = cache_key(task_ctx.task.name, inputs)
        for tag in task_ctx.task_run.tags:
            if tag.startswith(VERSION_TAG_PREFIX):
                note_key(tag.removeprefix(VERSION_TAG_PREFIX), key)
        return key


VERSION_TAG_PREFIX = "faces:"


def version_tag(version_id: str) -> str:
    """The tag a version's task runs carry: ``faces:`` and the version id's first 12 hex digits."""
    return VERSION_TAG_PREFIX + version_id[:12]


def cache_index() -> Path:
    """Where each version's cache keys are noted: one file per version (12 hex digits), a key per line.

    Inside the result storage, beside the results it indexes: a machine that computes a result
    notes it where every other machine's purge reads. Prefect's keys never start with a dot.
    """
    return result_storage() / ".faceflow-cache-index"


def checkpoint_folder() -> Path:
    """Where a training writes its resumable checkpoints, named by its cache key (this machine's PREFECT_HOME)."""
    return prefect_home() / "checkpoints"


def lock_folder() -> Path:
    """Where the cache's lock files live (beside Prefect's result storage)."""
    return prefect_home() / "locks"


def note_key(version: str, key: str) -> None:
    """Note that ``key``'s result is computed from faces version ``version`` (appended: one short write)."""
    folder = cache_index()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / version, "a") as handle:
        handle.write(key + "\n")


def cache_key(task_name: str, inputs: dict[str, Any]) -> str:
    """The key a faceflow task's result is cached under, from its name and its inputs by parameter name."""
    return f"{task_name}-" + content_key(project_source_digest(), inputs)


def is_cached(task: Task, **inputs: Any) -> bool:
    """Whether ``task`` called with ``inputs`` would be served from the cache (a result is stored under its key).

    Lets a flow run a cached step where it is, instead of shipping it to a cluster that would
    only start to read a stored result. The task's own result store: a flow's keeps its metadata
    elsewhere and would not find a task's result.
    """
    return get_result_store().update_for_task(task).exists(cache_key(task.name, inputs))


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

    def _get_lock_info(self, key: str, use_cache: bool = True) -> Any:
        try:
            return super()._get_lock_info(key, use_cache)
        except ValueError:
            # Prefect creates the lock file, then writes it: read in between (by a second identical
            # run), it is empty or half written, and parsing it failed that run. It is a lock being
            # taken: held, by a holder not known yet; not cached, so the next read sees the holder.
            return {"holder": None, "expiration": None, "path": self._lock_path_for_key(key)}

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


@functools.cache
def redis_lock_manager(url: str, hold_seconds: float) -> LockManager:
    """The one lock manager per Redis URL and hold timeout: it remembers which locks this process holds."""
    from faceflow.redis_locks import ExpiringRedisLockManager  # prefect-redis: imported only when asked for

    return ExpiringRedisLockManager(url, hold_seconds)


# Lock files, as before Redis: their folder is read once, at import, as Prefect reads PREFECT_HOME.
_FILE_LOCKS = ProcessLockManager(lock_folder())


def chosen_lock_manager() -> LockManager:
    """Redis's expiring locks with FACEFLOW_REDIS_URL (SettingError if malformed), else lock files."""
    url = redis_url()
    return _FILE_LOCKS if url is None else redis_lock_manager(url, lock_seconds())


def _same(manager: LockManager) -> LockManager:
    return manager


class SettingsLockManager(LockManager):
    """The cache's locks, where the settings say at each use (chosen_lock_manager), not where they said at import.

    Pickled (a task shipped to a Dask worker) as the manager chosen where it was pickled, so a
    worker locks where the run that sent it does.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (_same, (chosen_lock_manager(),))

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        return chosen_lock_manager().acquire_lock(key, holder, acquire_timeout, hold_timeout)

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        return await chosen_lock_manager().aacquire_lock(key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        chosen_lock_manager().release_lock(key, holder)

    def is_locked(self, key: str) -> bool:
        return chosen_lock_manager().is_locked(key)

    def is_lock_holder(self, key: str, holder: str) -> bool:
        return chosen_lock_manager().is_lock_holder(key, holder)

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return chosen_lock_manager().wait_for_lock(key, timeout)

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return await chosen_lock_manager().await_for_lock(key, timeout)


# Serializable: a second identical run waits for the first one's task and reads its result
# instead of computing it again (the lock lives in Redis or beside Prefect's result storage).
KEYED_INPUTS = KeyedInputs().configure(isolation_level="SERIALIZABLE", lock_manager=SettingsLockManager())
