"""Cache locks in Redis that expire: prefect-redis's RedisLockManager with a hold timeout.

Prefect takes a step's lock without a hold timeout (Transaction.begin passes none), and a Redis
lock without one would outlive a machine that died holding it, blocking that step everywhere.
Imported only with FACEFLOW_REDIS_URL set (faceflow.caching.chosen_lock_manager).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from prefect_redis.locking import RedisLockManager
from redis.exceptions import LockNotOwnedError

from faceflow.settings import LOCK_SECONDS_VARIABLE

logger = logging.getLogger(__name__)

# How often a wait for someone else's lock looks again (redis-py's own lock waits poll as often).
POLL_SECONDS = 0.1


class ExpiringRedisLockManager(RedisLockManager):
    """prefect-redis's locks, which expire ``hold_seconds`` after they are taken.

    A step that outlives its lock is still right: another run may take the lock and compute the
    same step too, and both write the same content-keyed result. The first one's release then
    finds the lock gone, or someone else's, and leaves it be.
    """

    def __init__(self, url: str, hold_seconds: float) -> None:
        self.hold_seconds = hold_seconds
        super().__init__(connection_url=url)

    def __getstate__(self) -> dict[str, Any]:
        return super().__getstate__() | {"hold_seconds": self.hold_seconds}

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        return super().acquire_lock(key, holder, acquire_timeout, hold_timeout or self.hold_seconds)

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        return await super().aacquire_lock(key, holder, acquire_timeout, hold_timeout or self.hold_seconds)

    def release_lock(self, key: str, holder: str) -> None:
        try:
            super().release_lock(key, holder)
        except LockNotOwnedError:  # expired: gone, or taken by another process since
            self._locks.pop(self._lock_name_for_key(key), None)
            self._warn_expired(key)
        except ValueError:  # expired and taken since by another thread of this process: its lock, left be
            self._warn_expired(key)

    def _warn_expired(self, key: str) -> None:
        logger.warning("The cache lock of %s expired before its step finished (%s=%g): another run may have "
                       "computed the step too", key, LOCK_SECONDS_VARIABLE, self.hold_seconds)

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """Wait until no one holds ``key``'s lock, without taking it.

        prefect-redis takes and releases the lock, with no hold timeout: a waiter killed in
        between would leave a lock that never expires.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(POLL_SECONDS)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        """wait_for_lock's asynchronous twin."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while await self.async_client.exists(self._lock_name_for_key(key)):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL_SECONDS)
        return True
