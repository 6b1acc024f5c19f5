"""Cache locks in Redis (FACEFLOW_REDIS_URL): shared by runs on any machine, and expiring.

A real redis-server per test (tests/services.py), real processes, real Prefect transactions.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from redis import Redis

from commands.server import local_server
from conftest import REPO_ROOT
from faceflow.settings import DEFAULT_LOCK_SECONDS, SettingError, redis_url
from support import assert_no_process_left, faceflow, tagged_env

# A flow with one cached step that holds its lock until the test has seen it held (the file "go").
FLOW_PROGRAM = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from prefect import flow, task
    from prefect_redis import RedisLockManager
    from faceflow.caching import KEYED_INPUTS, chosen_lock_manager

    folder = Path(sys.argv[1])

    @task(cache_policy=KEYED_INPUTS, persist_result=True)
    def doubled(number: int) -> int:
        (folder / f"computing-{{os.getpid()}}").touch()
        deadline = time.monotonic() + 300
        while not (folder / "go").exists():  # the step's work: it lasts until the test has looked at Redis
            assert time.monotonic() < deadline, "the test never wrote go"
            time.sleep(0.05)  # poll interval of the bounded wait for the file "go"
        return 2 * number

    @flow
    def small(number: int) -> dict:
        state = doubled(number, return_state=True)
        return {{"state": state.name, "result": state.result(), "redis": isinstance(chosen_lock_manager(), RedisLockManager)}}

    print(json.dumps(small(21)), flush=True)
""").format(repo=str(REPO_ROOT))

# Takes a step's lock as Prefect's Transaction.begin does (no hold timeout), then works until killed.
HOLDER_PROGRAM = textwrap.dedent("""
    import signal, sys
    sys.path.insert(0, {repo!r})
    from faceflow.caching import KEYED_INPUTS
    assert KEYED_INPUTS.lock_manager.acquire_lock(sys.argv[1], holder="a run that dies")
    print("held", flush=True)
    signal.pause()  # the step's work, until the test's SIGKILL
""").format(repo=str(REPO_ROOT))


def wait_until(condition: Callable[[], object], processes: list[subprocess.Popen], timeout: float, what: str) -> object:
    """Poll ``condition`` until it is true; fail if a process exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        for process in processes:
            if process.poll() is not None:
                raise AssertionError(f"a process exited with {process.returncode} before {what}: "
                                     f"{process.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {timeout} s")
        time.sleep(0.05)  # poll interval of the bounded wait
    return value


def set_calls(redis: Redis) -> int:
    """How many SET commands the server has run: a lock is taken, or tried, with one SET NX."""
    return redis.info("commandstats").get("cmdstat_set", {}).get("calls", 0)


def test_two_identical_concurrent_flow_runs_compute_the_step_once_under_one_redis_lock(
        tmp_path: Path, prefect_home: Path, redis_server, tag: str) -> None:
    """The second run waits on the first one's lock in Redis, then reads its result: "Cached"."""
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    env = tagged_env(tag, prefect_home, FACEFLOW_REDIS_URL=redis_server.url)
    with local_server(prefect_home, timeout=300) as server:
        env["PREFECT_API_URL"] = server.api_url
        runs = [subprocess.Popen([sys.executable, "-c", FLOW_PROGRAM, str(tmp_path)], env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
        try:
            wait_until(lambda: list(tmp_path.glob("computing-*")), runs, 120, "a run computes the step")
            locks = redis.keys("lock:doubled-*")
            assert len(locks) == 1, redis.keys("*")
            assert 0 < redis.pttl(locks[0]) <= DEFAULT_LOCK_SECONDS * 1000  # it expires
            held = set_calls(redis)
            wait_until(lambda: set_calls(redis) >= held + 3, runs, 120, "the other run waits for the lock")
            assert len(list(tmp_path.glob("computing-*"))) == 1
            (tmp_path / "go").touch()
            outputs = [run.communicate(timeout=120) for run in runs]
        finally:
            for run in runs:
                run.kill()
                run.wait()
    assert [run.returncode for run in runs] == [0, 0], [err[-3000:] for _, err in outputs]
    results = [json.loads(out.splitlines()[-1]) for out, _ in outputs]
    assert sorted(r["state"] for r in results) == ["Cached", "Completed"]
    assert [r["result"] for r in results] == [42, 42] and [r["redis"] for r in results] == [True, True]
    assert len(list(tmp_path.glob("computing-*"))) == 1
    assert redis.keys("lock:*") == []  # both released
    assert_no_process_left(tag)


def test_a_lock_whose_holder_was_killed_expires_after_its_hold_timeout(
        redis_server, tag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL the holder: its lock is free after FACEFLOW_LOCK_SECONDS, not never."""
    from faceflow.caching import KEYED_INPUTS

    redis = Redis.from_url(redis_server.url)
    key = "train_realnvp-deadbeef"
    monkeypatch.setenv("FACEFLOW_REDIS_URL", redis_server.url)
    locks = KEYED_INPUTS.lock_manager
    assert not locks.is_locked(key)  # this process's Redis client imported and connected before the clock starts
    # 5 s: the checks below, on a loaded machine, must fit in the dead holder's lock time.
    env = tagged_env(tag, tmp_path / "home", FACEFLOW_REDIS_URL=redis_server.url, FACEFLOW_LOCK_SECONDS="5")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER_PROGRAM, key], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held", holder.communicate()[1][-3000:]
        assert 0 < redis.pttl(f"lock:{key}") <= 5000
        holder.kill()
        holder.wait(timeout=30)
        assert locks.is_locked(key)  # the dead run's lock, still there
    finally:
        holder.kill()
        holder.communicate()
    waited = time.monotonic()
    assert locks.acquire_lock(key, holder="the next run", acquire_timeout=30)
    assert time.monotonic() - waited < 5 + 5  # its lock time, and a margin for a loaded machine
    assert locks.is_lock_holder(key, "the next run")
    locks.release_lock(key, "the next run")
    assert not locks.is_locked(key)
    assert_no_process_left(tag)


class Kept(logging.Handler):
    """Keeps every record a logger emits: Prefect's loggers do not propagate to pytest's caplog."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_step_that_outlives_its_lock_still_commits_and_leaves_the_next_holders_lock(
        redis_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worst case of a step longer than FACEFLOW_LOCK_SECONDS: another run computes it too; no failure."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore

    from faceflow.caching import KEYED_INPUTS
    from faceflow.redis_locks import ExpiringRedisLockManager

    monkeypatch.setenv("FACEFLOW_REDIS_URL", redis_server.url)
    monkeypatch.setenv("FACEFLOW_LOCK_SECONDS", "2")  # long enough for the transaction to see its lock taken
    redis, locks, key = Redis.from_url(redis_server.url), KEYED_INPUTS.lock_manager, "fit_pca-0123abcd"
    elsewhere = ExpiringRedisLockManager(redis_server.url, 60)  # another machine's run
    store = ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path)), lock_manager=locks)
    kept, logger = Kept(), logging.getLogger("faceflow-test-transaction")
    logger.addHandler(kept)
    logging.getLogger("faceflow.redis_locks").addHandler(kept)
    try:
        _outlive_the_lock(key, store, logger, redis, elsewhere)
    finally:
        logger.removeHandler(kept)
        logging.getLogger("faceflow.redis_locks").removeHandler(kept)
    assert [record.levelname for record in kept.records] == ["WARNING"]  # no error while committing
    assert "expired before its step finished (FACEFLOW_LOCK_SECONDS=2)" in kept.records[0].getMessage()
    assert redis.get(f"lock:{key}") == b"another run"  # the first run's release left it be
    elsewhere.release_lock(key, "another run")
    assert store.read(key).result == 42


def _outlive_the_lock(key: str, store, logger: logging.Logger, redis: Redis, elsewhere) -> None:
    """A step's transaction whose lock expires mid-way and is taken by another run, as Prefect's task engine runs it."""
    from prefect.transactions import IsolationLevel, transaction

    with transaction(key=key, store=store, isolation_level=IsolationLevel.SERIALIZABLE, logger=logger) as txn:
        assert redis.exists(f"lock:{key}")
        deadline = time.monotonic() + 10
        while redis.exists(f"lock:{key}") and time.monotonic() < deadline:
            time.sleep(0.05)  # the step's work, outliving its lock
        assert elsewhere.acquire_lock(key, holder="another run", acquire_timeout=1)
        txn.stage(42)  # committed, and the lock released, on the way out


@pytest.mark.parametrize("value, problem", [
    ("http://127.0.0.1:6379/0", "the scheme is http://"),
    ("127.0.0.1:6379", "the scheme is missing"),
    ("redis://127.0.0.1:port/0", "the port is not a number"),
    ("redis://127.0.0.1:70000/0", "the port is not a number"),
    ("redis:///0", "the host is missing"),
    ("redis://127.0.0.1:6379/cache", "the database 'cache' is not a number"),
])
def test_a_malformed_redis_url_is_refused_naming_the_variable(value: str, problem: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACEFLOW_REDIS_URL", value)
    with pytest.raises(SettingError) as refused:
        redis_url()
    message = str(refused.value)
    assert message.startswith(f"FACEFLOW_REDIS_URL={value!r}: {problem}") and "redis://[user:password@]host" in message


def test_faceflow_run_refuses_a_malformed_redis_url_before_any_work(tmp_path: Path, tag: str) -> None:
    """Status 2 and one line naming the variable, its password hidden; no server started, nothing written."""
    env = tagged_env(tag, tmp_path / "home", FACEFLOW_REDIS_URL="redis://faceflow:secret@cache.example:637900")
    refused = subprocess.run(faceflow("run", "--output-dir", str(tmp_path / "out")), env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines() == [
        "faceflow refused: FACEFLOW_REDIS_URL='redis://faceflow:***@cache.example:637900': the port is not a number "
        "from 1 to 65535; expected redis://[user:password@]host[:port][/db] or rediss://... (TLS)"]
    assert not (tmp_path / "home").exists() and not (tmp_path / "out").exists()
    assert_no_process_left(tag)
