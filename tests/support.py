"""Helpers for tests that start real faceflow processes: tagging, process-table checks, the run's record."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

import psutil
from prefect.client.orchestration import SyncPrefectClient

from commands.server import api_url_for, free_port, server_url

TAG_VARIABLE = "FACEFLOW_TEST_TAG"
REPO_ROOT = Path(__file__).resolve().parent.parent

# A light model for tests of orchestration, caching, faults and files, which assert no quality: one narrow
# flow of two coupling layers (the default: 3 flows of 192 units, 3 layers) and a GaussianMixture of at most
# 2 components (default 20). Quality is tested on the default model (test_model, test_train,
# test_new_people, test_image_space) and measured by `make bench`.
LIGHT_TRAIN = {"members": 1, "hidden_units": 16, "num_layers": 2}
LIGHT_BASELINES = {"gmm_max_components": 2}
# The same as `faceflow run`/`retrain` options ...
LIGHT_OPTIONS = ["--members", "1", "--hidden-units", "16", "--num-layers", "2", "--gmm-max-components", "2"]


def light_config(config: dict | None = None) -> dict:
    """... and as a flow's ``config`` parameter: ``config`` with the light model's fields added to its sections."""
    config = dict(config or {})
    config["train"] = LIGHT_TRAIN | config.get("train", {})
    config["baselines"] = LIGHT_BASELINES | config.get("baselines", {})
    return config


def new_tag() -> str:
    return uuid.uuid4().hex


def tagged_env(tag: str, home: Path, **extra: str) -> dict[str, str]:
    """An environment whose processes (and everything they start) carry ``tag``, with its own PREFECT_HOME."""
    env = os.environ | {TAG_VARIABLE: tag, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    for variable in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES"):  # a test's `make` runs as a user's, not as
        env.pop(variable, None)  # a sub-make of `make test` (which prints "make[1]:" and passes its jobserver on)
    return env | extra


def tagged_processes(tag: str, running: Callable[[list[str]], bool] | None = None) -> list[psutil.Process]:
    """Every live process whose environment carries ``tag``: children inherit it even once orphaned.

    ``running``, when given, keeps those whose command line it accepts. A process may exit (or turn zombie)
    between any two reads, so every read is guarded: a process gone meanwhile is simply not listed.
    """
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(TAG_VARIABLE) != tag or process.status() == psutil.STATUS_ZOMBIE:
                continue
            if running is None or running(process.cmdline()):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # ZombieProcess is a NoSuchProcess
            continue
    return found


def listening_addresses(tag: str) -> set[str]:
    """The addresses every process carrying ``tag`` listens on, as "ip:port"."""
    found = set()
    for process in tagged_processes(tag):
        try:
            sockets = process.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found |= {f"{s.laddr.ip}:{s.laddr.port}" for s in sockets if s.status == psutil.CONN_LISTEN}
    return found


def only_loopback(addresses: set[str]) -> bool:
    """Whether every address is on 127.0.0.1: nothing a faceflow command starts is reachable from another machine."""
    return all(address.rsplit(":", 1)[0] == "127.0.0.1" for address in addresses)


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


def store_snapshot(root: Path) -> dict[str, bytes]:
    """Every file of a face store and its bytes, the lock file aside (it is empty and always there)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def write_png(path: Path, image) -> "np.ndarray":
    """Save a [0, 1] image as an 8-bit PNG; returns what reading it back gives (the levels, / 255)."""
    import numpy as np
    from PIL import Image

    levels = np.round(np.asarray(image) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(levels).save(path)
    return levels.astype(np.float32) / 255.0


def faceflow(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "commands.cli", *arguments]


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
    with client(api_url) as prefect:
        return {run.id: run.state.name if run.state else "None" for run in prefect.read_flow_runs()}


class RunningUI:
    """`make ui` in its own process group, as a terminal runs it; its output in a file."""

    def __init__(self, tmp_path: Path, tag: str, data_file: Path, home: Path, name: str = "make-ui", **env: str) -> None:
        """``PREFECT_API_URL`` in ``env``: this UI uses that server (a second machine's), else it starts its own."""
        self.port = free_port()
        self.home = home
        self.output = tmp_path / f"{name}.txt"
        # Deployments read and write only inside their folders (faceflow.confinement): here, the test
        # session's temporary folder, which holds every test's tmp_path.
        folders = {"FACEFLOW_INBOX_DIR": str(tmp_path.parent), "FACEFLOW_OUTPUTS_DIR": str(tmp_path.parent)}
        self.env = tagged_env(tag, self.home, FACEFLOW_DATA_FILE=str(data_file), **(folders | env))
        self.api_url = env.get("PREFECT_API_URL") or api_url_for(self.port)
        self.url = self.api_url.removesuffix("/api") if "PREFECT_API_URL" in env else server_url(self.port)
        self.process = subprocess.Popen(
            ["make", "--no-print-directory", "ui", f"PORT={self.port}"], cwd=REPO_ROOT, env=self.env,
            stdin=subprocess.DEVNULL, stdout=self.output.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_for_text(self.output, f"faceflow UI: {self.url}", self.process, timeout=600)

    def ctrl_c(self) -> None:
        """SIGINT to the whole group; make then dies of the same signal, as it does in a terminal."""
        self.stop(signal.SIGINT)

    def stop(self, signum: int) -> None:
        """``signum`` to the whole group (Ctrl-C, or SIGTERM as a service manager sends it); make dies of it."""
        os.killpg(self.process.pid, signum)
        assert self.process.wait(timeout=180) in (0, -signum)
        assert "faceflow ui stopped" in self.output.read_text()


def flow_run_processes(tag: str, flow_run_id: UUID) -> list[psutil.Process]:
    """The live processes carrying ``tag`` that run ``flow_run_id`` (the process worker sets PREFECT__FLOW_RUN_ID in them)."""
    found = []
    for process in tagged_processes(tag):
        try:
            if process.environ().get("PREFECT__FLOW_RUN_ID") == str(flow_run_id):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def sub_flow_runs(api_url: str, parent: UUID) -> list:
    """The flow runs started inside flow run ``parent`` (its sub-flows), as the server has them."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with client(api_url) as prefect:
        return prefect.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent])))


def flow_run_story(api_url: str, flow_run_id: UUID, lines: int = 40) -> str:
    """A flow run's state and the last ``lines`` of its logs, for a failure message."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with client(api_url) as prefect:
        state = prefect.read_flow_run(flow_run_id).state
        logs = prefect.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    told = "\n".join(f"  {log.timestamp:%H:%M:%S} {log.message[:2000]}" for log in sorted(logs, key=lambda log: log.timestamp)[-lines:])
    return f"state {state.name if state else None}: {state.message if state else ''}\n{told}"


def client(api_url: str) -> SyncPrefectClient:
    """A synchronous Prefect client for the server at ``api_url``."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        return get_client(sync_client=True)


def run_deployment(api_url: str, name: str, parameters: dict, flow: str = "faceflow") -> UUID:
    """A flow run of the deployment ``flow/name``, created through the API as the UI's Run button does."""
    with client(api_url) as prefect:
        deployment = prefect.read_deployment_by_name(f"{flow}/{name}")
        return prefect.create_flow_run_from_deployment(deployment.id, parameters=parameters).id


def wait_for_state(api_url: str, flow_run_id: UUID, wanted: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    with client(api_url) as prefect:
        while time.monotonic() < deadline:
            state = prefect.read_flow_run(flow_run_id).state
            if state is not None and (state.name in wanted or state.is_final()):
                return state.name
            time.sleep(1.0)
    raise AssertionError(f"flow run {flow_run_id} not in {wanted} within {timeout} s")


class AlertReceiver:
    """An HTTP server on 127.0.0.1 in a thread that records every POST: where a webhook notification block sends alerts."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.posts: list[tuple[float, str]] = []  # (time.time() of receipt, body)
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode(errors="replace")
                posts.append((time.time(), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *arguments: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, *texts: str, timeout: float) -> tuple[float, str]:
        """The first POST whose body holds every one of ``texts``: (when it came, its body)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for post in list(self.posts):
                if all(text in post[1] for text in texts):
                    return post
            time.sleep(0.2)  # poll interval of the bounded wait for the POST
        raise AssertionError(f"no POST with {texts} within {timeout} s; got:\n" + "\n".join(body for _, body in self.posts))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def save_webhook_block(home: Path, url: str, name: str) -> str:
    """A Prefect custom webhook notification block posting to ``url``, saved in ``home``'s database; its FACEFLOW_ALERT_BLOCK value."""
    from commands.server import local_server

    with local_server(home, timeout=300) as server:
        return save_webhook_block_at(server.api_url, url, name)


def save_webhook_block_at(api_url: str, url: str, name: str) -> str:
    """As ``save_webhook_block``, on the server at ``api_url``."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        CustomWebhookNotificationBlock(name="faceflow alerts", url=url, json_data={"subject": "{{subject}}", "body": "{{body}}"}
                                       ).save(name, overwrite=True)
    return f"custom-webhook/{name}"
