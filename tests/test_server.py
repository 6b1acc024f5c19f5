"""`faceflow run` ends however it is ended, and leaves no process behind: real processes, real signals.

Every command runs with a tag in its environment, which every process it starts inherits,
orphans included; after each way a run can end, the process table holds nothing with that tag.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from commands.server import local_server
from support import (
    LIGHT_OPTIONS, assert_no_process_left, describe, faceflow, flow_run_states, tagged_env, tagged_processes,
    wait_for_text,
)

LONG_TRAINING = ["--epochs", "20000", "--n-samples", "4", "--steps", "3"]


def start_run(
    tmp_path: Path, home: Path, tag: str, data_file: Path, *arguments: str, **env: str
) -> tuple[subprocess.Popen, Path]:
    """`faceflow run` in the background; stdout is a pipe (as `out=$(faceflow run)` has), stderr a file."""
    stderr = tmp_path / "stderr.txt"
    process = subprocess.Popen(
        faceflow("run", "--output-dir", str(tmp_path / "outputs"), *arguments),
        env=tagged_env(tag, home, FACEFLOW_DATA_FILE=str(data_file), **env),
        cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr.open("wb"),
        start_new_session=True,  # its own process group, as a shell gives a foreground command
    )
    return process, stderr


def recorded_states(home: Path) -> list[str]:
    """The state of every flow run in ``home``'s database, read through a server started for the purpose."""
    with local_server(home, timeout=300) as server:
        return list(flow_run_states(server.api_url).values())


def ctrl_c(process: subprocess.Popen) -> None:
    """What a terminal's Ctrl-C does: SIGINT to every process of the foreground process group."""
    os.killpg(process.pid, signal.SIGINT)


def kill_term(process: subprocess.Popen) -> None:
    """What `kill PID` (and a scheduler stopping a job) does: SIGTERM to the one process."""
    process.send_signal(signal.SIGTERM)


@pytest.mark.parametrize(("stop", "exit_code"), [(kill_term, 128 + signal.SIGTERM), (ctrl_c, 130)])
def test_a_signal_during_training_ends_the_run_crashed_and_leaves_nothing(
    tmp_path: Path, prefect_home: Path, tag: str, data_file: Path, stop: Callable[[subprocess.Popen], None], exit_code: int
) -> None:
    process, stderr = start_run(tmp_path, prefect_home, tag, data_file, *LONG_TRAINING)
    wait_for_text(stderr, "train_realnvp", process, timeout=300)
    running = tagged_processes(tag)
    assert len(running) == 2, describe(running)  # the command and the server it started
    stop(process)
    # communicate() returns only once every holder of the stdout pipe has closed it: no orphan keeps it.
    try:
        process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running 120 s after the signal:\n{stderr.read_text()[-5000:]}") from None
    assert process.returncode == exit_code, stderr.read_text()[-3000:]
    assert_no_process_left(tag)
    outputs = tmp_path / "outputs"
    assert not outputs.exists() or not any(outputs.iterdir())  # nothing half-written
    assert recorded_states(prefect_home) == ["Crashed"], stderr.read_text()[-3000:]


def test_sigkill_leaves_no_server(tmp_path: Path, prefect_home: Path, tag: str, data_file: Path) -> None:
    """No cleanup code runs after SIGKILL: the kernel stops the server the command started."""
    process, stderr = start_run(tmp_path, prefect_home, tag, data_file, *LONG_TRAINING)
    wait_for_text(stderr, "train_realnvp", process, timeout=300)
    process.kill()
    process.communicate(timeout=60)
    assert_no_process_left(tag)


def test_a_server_that_does_not_start_in_time_is_reported_and_stopped(
    tmp_path: Path, prefect_home: Path, tag: str, data_file: Path
) -> None:
    process, stderr = start_run(tmp_path, prefect_home, tag, data_file, FACEFLOW_SERVER_START_TIMEOUT="0.2")
    stdout, _ = process.communicate(timeout=120)
    message = stderr.read_text()
    assert process.returncode == 1 and stdout == b""
    assert "did not answer within 0.2 s" in message and "FACEFLOW_SERVER_START_TIMEOUT" in message
    assert_no_process_left(tag)


def test_a_bad_timeout_setting_is_refused_before_anything_starts(tmp_path: Path, tag: str, data_file: Path) -> None:
    process, stderr = start_run(tmp_path, tmp_path / "home", tag, data_file, FACEFLOW_SERVER_START_TIMEOUT="soon")
    process.communicate(timeout=60)
    assert process.returncode == 2
    assert "FACEFLOW_SERVER_START_TIMEOUT='soon'" in stderr.read_text()
    assert not (tmp_path / "home").exists()


def test_a_run_succeeds_with_both_cores_busy(tmp_path: Path, tag: str, data_file: Path) -> None:
    """First use (the database is created) while two processes keep both cores busy."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"], env=tagged_env(tag, tmp_path)) for _ in range(2)]
    try:
        started = time.monotonic()
        process, stderr = start_run(
            tmp_path, tmp_path / "home", tag, data_file, "--epochs", "3", "--n-samples", "4", "--steps", "3", *LIGHT_OPTIONS, "--json"
        )
        stdout, _ = process.communicate(timeout=900)
        assert process.returncode == 0, stderr.read_text()[-3000:]
        assert "report" in stdout.decode().splitlines()[-1], f"took {time.monotonic() - started:.0f} s"
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert_no_process_left(tag)
