"""Helpers for tests that start real faceflow processes: tagging, process-table checks, the run's record."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from uuid import UUID

import psutil

TAG_VARIABLE = "FACEFLOW_TEST_TAG"


def new_tag() -> str:
    return uuid.uuid4().hex


def tagged_env(tag: str, home: Path, **extra: str) -> dict[str, str]:
    """An environment whose processes (and everything they start) carry ``tag``, with its own PREFECT_HOME."""
    env = os.environ | {TAG_VARIABLE: tag, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    return env | extra


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Every live process whose environment carries ``tag``: children inherit it even once orphaned."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(TAG_VARIABLE) == tag and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def describe(processes: list[psutil.Process]) -> str:
    lines = []
    for process in processes:
        try:
            lines.append(f"{process.pid} (parent {process.ppid()}): {' '.join(process.cmdline())[:200]}")
        except psutil.NoSuchProcess:
            continue
    return "\n".join(lines)


def assert_no_process_left(tag: str, within: float = 30.0) -> None:
    """Fail if any process carrying ``tag`` is still alive ``within`` seconds from now.

    A grace period, not a sleep: a process the kernel was told to stop may take a moment to exit.
    """
    deadline = time.monotonic() + within
    while (left := tagged_processes(tag)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, "processes outlived their command:\n" + describe(left)


def kill_tagged(tag: str) -> None:
    """Clean up after a failed test so it cannot leak into the next one."""
    for process in tagged_processes(tag):
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def faceflow(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "faceflow.cli", *arguments]


def wait_for_text(path: Path, text: str, process: subprocess.Popen, timeout: float) -> None:
    """Wait until ``text`` appears in the file ``path`` while ``process`` runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode} before {text!r}:\n{path.read_text()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"{text!r} did not appear in {path} within {timeout} s:\n{path.read_text()[-3000:]}")


def flow_run_states(api_url: str) -> dict[UUID, str]:
    """Flow run id -> state name, as the server recorded them."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return {run.id: run.state.name if run.state else "None" for run in client.read_flow_runs()}
