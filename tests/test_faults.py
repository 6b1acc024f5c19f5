"""Faults injected for real: broken checkpoints, full and read-only disks, a stalled download, concurrent runs."""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from artifacts.run_folder import OutputFolderError, write_run_folder
from commands.server import local_server
from conftest import copy_home
from support import LIGHT_OPTIONS, assert_no_process_left, faceflow, tagged_env
from tasks.data import DataUnavailableError, load_faces
from tasks.model import CheckpointError, ModelSpec, build_realnvp, checkpoint_payload, load_checkpoint, save_checkpoint

DIM = 8
RAN = "payload-ran"  # the file a malicious checkpoint's code would create


def _checkpoint(path: Path) -> Path:
    model = build_realnvp(ModelSpec(DIM, 2, 8), np.zeros(DIM), np.ones(DIM))
    save_checkpoint(path, checkpoint_payload(model.state_dict(), ModelSpec(DIM, 2, 8), {"epochs": 1}))
    return path


class _RunsCode:
    """A pickle that runs code when loaded: it would create the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _save(path: Path, value: object) -> Path:
    torch.save(value, path)
    return path


def _with_payload(path: Path, change: Callable[[dict], None]) -> Path:
    payload = torch.load(_checkpoint(path), weights_only=True)
    change(payload)
    torch.save(payload, path)
    return path


BROKEN_CHECKPOINTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing": (lambda p: p, "does not exist"),
    "empty": (lambda p: _write(p, b""), "not a readable torch checkpoint"),
    "truncated": (lambda p: _write(p, _checkpoint(p).read_bytes()[:300]), "not a readable torch checkpoint"),
    "a pickle that runs code": (lambda p: _write(p, pickle.dumps(_RunsCode(p.with_name(RAN)))), "not a readable torch checkpoint"),
    "another format": (lambda p: _save(p, {"weights": 1}), "not a faceflow checkpoint"),
    "no weights": (lambda p: _with_payload(p, lambda d: d.pop("state_dict")), "lacks state_dict"),
    "NaN weights": (lambda p: _with_payload(p, lambda d: next(iter(d["state_dict"].values())).fill_(float("nan"))),
                    "non-finite weights"),
    "weights of another shape": (lambda p: _with_payload(p, lambda d: d["spec"].update(hidden_units=16)),
                                 "does not match the model"),
    "shares for another number of flows": (lambda p: _with_payload(p, lambda d: d["spec"].update(members=2, member_weights=(1.0,))),
                                           "does not match the model"),
}


@pytest.mark.parametrize("case", list(BROKEN_CHECKPOINTS))
def test_a_broken_checkpoint_is_refused_naming_the_file(case: str, tmp_path: Path) -> None:
    make, reason = BROKEN_CHECKPOINTS[case]
    path = make(tmp_path / "model.pt")
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    assert str(path) in str(caught.value) and reason in str(caught.value)
    assert not (tmp_path / RAN).exists()  # refused before unpickling ran anything, not after


@contextmanager
def tmpfs(where: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A small RAM disk mounted at ``where``: a real full or read-only file system (needs root)."""
    where.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (these tests need root): {mounted.stderr}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


@pytest.mark.parametrize(("size", "read_only", "reason"), [("1m", False, "MiB free"), ("100m", True, "not writable")])
def test_an_output_folder_that_cannot_take_a_run_is_refused_before_work(
    tmp_path: Path, data_file: Path, size: str, read_only: bool, reason: str, tag: str
) -> None:
    with tmpfs(tmp_path / "disk", size, read_only) as disk:
        result = subprocess.run(
            faceflow("run", "--output-dir", str(disk / "outputs")),
            env=tagged_env(tag, tmp_path / "home", FACEFLOW_DATA_FILE=str(data_file)),
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 2 and f"output folder {str(disk / 'outputs')!r}" in result.stderr
        assert reason in result.stderr
        assert not (tmp_path / "home").exists()


def test_a_disk_that_fills_while_the_run_folder_is_written_leaves_nothing(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "1m") as disk:
        with pytest.raises(OutputFolderError, match="no space left"):
            write_run_folder(disk / "run-x", {"small.txt": b"ok", "big.bin": os.urandom(2 * 2**20)})
        assert list(disk.iterdir()) == []


@dataclass(frozen=True)
class StallingProxy:
    url: str
    connected: threading.Event  # set once a client's connection is held, unanswered


@contextmanager
def stalling_proxy() -> Iterator[StallingProxy]:
    """An HTTP proxy that accepts connections and never answers: a stalled network."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held: list[socket.socket] = []
    stop, connected = threading.Event(), threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue
            connected.set()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield StallingProxy(f"http://127.0.0.1:{listener.getsockname()[1]}", connected)
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        listener.close()


def test_a_stalled_download_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with stalling_proxy() as proxy:
        for variable in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
            monkeypatch.setenv(variable, proxy.url)
        monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path))
        monkeypatch.setenv("FACEFLOW_DOWNLOAD_TIMEOUT", "0.5")
        # urlopen's default opener keeps the proxies it is built with: built here, with the stalled
        # proxy, it would send this process's later requests there too. Put back afterwards.
        monkeypatch.setattr(urllib.request, "_opener", None)
        started = time.monotonic()
        with pytest.raises(DataUnavailableError, match="FACEFLOW_DATA_FILE"):
            load_faces(None)
        assert time.monotonic() - started < 10


def test_an_http_proxy_in_the_environment_does_not_stand_between_faceflow_and_its_server(
    prefect_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user's http_proxy (no no_proxy) must not carry the health checks: through this proxy they never got an answer."""
    with stalling_proxy() as proxy:
        for variable in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
            monkeypatch.setenv(variable, proxy.url)
        for variable in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(variable, raising=False)
        monkeypatch.setattr(urllib.request, "_opener", None)  # as a new process would build it, from this environment
        with local_server(prefect_home, timeout=120) as server:
            assert server.api_url.startswith("http://127.0.0.1:")
        assert not proxy.connected.is_set()


def test_sigterm_ends_a_stalled_download_promptly(tmp_path: Path, prefect_home: Path, tag: str) -> None:
    with stalling_proxy() as proxy:
        # Only the download goes through the stalled proxy; Prefect's own connections stay local.
        # An empty face store: version 1, the Olivetti faces, must be downloaded (the session's store has it).
        env = tagged_env(tag, prefect_home, SCIKIT_LEARN_DATA=str(tmp_path), HTTPS_PROXY=proxy.url, https_proxy=proxy.url,
                         NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", FACEFLOW_FACES_DIR=str(tmp_path / "faces"))
        env.pop("FACEFLOW_DATA_FILE", None)
        stderr = tmp_path / "stderr.txt"
        process = subprocess.Popen(
            faceflow("run", "--output-dir", str(tmp_path / "outputs")), env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=stderr.open("wb"),
        )
        # The download's connection is held unanswered: the run waits inside fetch_faces (read timeout 30 s).
        assert proxy.connected.wait(timeout=300), stderr.read_text()[-3000:]
        assert process.poll() is None
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
        assert process.returncode == 128 + signal.SIGTERM
        assert time.monotonic() - sent < 15
    assert_no_process_left(tag)


def test_two_identical_concurrent_runs_compute_each_task_once(tmp_path: Path, data_file: Path, prefect_home: Path, tag: str) -> None:
    """Prefect's serializable cache isolation: the second run waits for the first and reads its results."""
    arguments = ["run", "--json", "--epochs", "300", "--n-samples", "4", "--steps", "3", *LIGHT_OPTIONS, "--output-dir", str(tmp_path / "out")]
    with local_server(prefect_home, timeout=300) as server:
        env = tagged_env(tag, prefect_home, FACEFLOW_DATA_FILE=str(data_file), PREFECT_API_URL=server.api_url)
        runs = [subprocess.Popen(faceflow(*arguments), env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                for _ in range(2)]
        outputs = [run.communicate(timeout=900)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    first, second = (json.loads(out.decode().splitlines()[-1]) for out in outputs)
    assert first["output_dir"] == second["output_dir"] and first["metrics"] == second["metrics"]
    for task, state in first["tasks"].items():
        # fetch_faces reads the face store's version in every run (never cached: "latest" moves).
        expected = {"Completed"} if task == "fetch_faces" else {"Completed", "Cached"}
        assert {state, second["tasks"][task]} == expected, (task, state, second["tasks"][task])


def test_a_training_killed_with_sigkill_resumes_to_the_same_weights(tmp_path: Path, data_file: Path, migrated_home: Path, tag: str) -> None:
    """SIGKILL mid-training, run again: training resumes from its last checkpoint and ends bit-identical.

    The reference is an uninterrupted run of the same configuration in another PREFECT_HOME.
    """
    arguments = ["run", "--json", "--epochs", "1000", "--members", "1", "--hidden-units", "64", "--num-layers", "2", "--gmm-max-components", "2",
                 "--n-samples", "4", "--steps", "3"]

    def env(home: str) -> dict[str, str]:
        return tagged_env(tag, copy_home(migrated_home, tmp_path / home), FACEFLOW_DATA_FILE=str(data_file),
                          FACEFLOW_CHECKPOINT_SECONDS="0.2")

    reference = subprocess.run(faceflow(*arguments, "--output-dir", str(tmp_path / "reference")), env=env("home-a"),
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed_env, stderr = env("home-b"), tmp_path / "stderr.txt"
    killed = subprocess.Popen(faceflow(*arguments, "--output-dir", str(tmp_path / "resumed")), env=killed_env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr.open("wb"))
    checkpoints = tmp_path / "home-b" / "checkpoints"
    deadline = time.monotonic() + 300
    while not any(checkpoints.glob("train_realnvp-*.pt")) and time.monotonic() < deadline and killed.poll() is None:
        time.sleep(0.1)
    killed.kill()  # mid-training: a checkpoint is on disk (written whole, by rename) and the run still trains
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL and any(checkpoints.glob("train_realnvp-*.pt"))
    assert_no_process_left(tag)
    again = subprocess.run(faceflow(*arguments, "--output-dir", str(tmp_path / "resumed")), env=killed_env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = json.loads(again.stdout.splitlines()[-1])
    assert 0 < resumed["metrics"]["resumed_from_epoch"] < 1000
    assert {resumed["tasks"][name] for name in ("split_faces", "fit_pca", "build_dataloader")} == {"Cached"}
    assert not any(checkpoints.glob("*.pt"))  # removed once the training finished
    weights = [torch.load(Path(json.loads(out)["output_dir"]) / "model.pt", weights_only=True)["state_dict"]
               for out in (reference.stdout.splitlines()[-1], again.stdout.splitlines()[-1])]
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name
    assert resumed["metrics"]["heldout_log_prob"] == json.loads(reference.stdout.splitlines()[-1])["metrics"]["heldout_log_prob"]


def test_with_an_auth_string_the_server_refuses_unauthenticated_requests(prefect_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """How to expose a server (docs/security.md): PREFECT_SERVER_API_AUTH_STRING on the server, PREFECT_API_AUTH_STRING on clients."""
    monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", "faceflow:secret")
    with local_server(prefect_home, timeout=300) as server:
        request = urllib.request.Request(f"{server.api_url}/flows/filter", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401
        request.add_header("Authorization", "Basic " + base64.b64encode(b"faceflow:secret").decode())
        with urllib.request.urlopen(request, timeout=10) as accepted:
            assert accepted.status == 200
