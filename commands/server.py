"""The one place that finds or starts a Prefect server, and stops what it started.

A faceflow command reuses a server that is already up: ``PREFECT_API_URL`` when set, else the
one ``faceflow ui`` runs for this ``PREFECT_HOME`` (it leaves a record file there). Otherwise it
starts ``prefect server start`` on 127.0.0.1, waits for it as long as a loaded machine needs, and
stops it on every way out: the caller's ``with`` block ends, an error, SIGINT or SIGTERM turned
into exceptions by the caller, a readiness timeout. The server runs in its own session, so a
terminal's Ctrl-C reaches only the faceflow command, which records the run's end in the server
before stopping it; and it is started through ``commands.tether``, so the kernel stops it even
when the command is killed outright.

This module imports nothing from Prefect: a command decides where its server is, and starts
it, before paying for Prefect's and torch's imports, so the server's start-up overlaps them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from faceflow.settings import (
    API_URL_VARIABLE, AUTH_FILE_VARIABLE, AUTH_STRING_VARIABLE, CSRF_VARIABLE, SERVER_AUTH_STRING_VARIABLE,
    api_url_from_environment, auth_string,
)

HOST = "127.0.0.1"
SERVER_RECORD = "faceflow-server.json"  # in PREFECT_HOME, while `faceflow ui` runs a server there
LOG_FOLDER = "server-logs"
# A request sent while the server is still starting waits for the start to finish; a short
# timeout asks again soon instead of waiting out a long one (a 5 s timeout cost 2 s a start).
HEALTH_POLL_TIMEOUT = 0.5
# Until it listens, a connection is refused at once: asking often costs nothing and saves the wait.
HEALTH_POLL_INTERVAL = 0.05


class ServerError(RuntimeError):
    """A Prefect server could not be reached or started."""


class CredentialsError(ServerError):
    """The Prefect server refused this command's auth string, or asked for one it did not have."""


@dataclass(frozen=True)
class LocalServer:
    """A ``prefect server start`` child process serving one PREFECT_HOME on 127.0.0.1."""

    home: Path
    port: int
    process: subprocess.Popen
    log_path: Path
    launched_at: float  # time.monotonic() at launch: readiness timeouts count from here
    host: str = HOST  # the address it listens on

    @property
    def url(self) -> str:
        return server_url(self.port, self.host)

    @property
    def api_url(self) -> str:
        return api_url_for(self.port, self.host)


def server_url(port: int, host: str = HOST) -> str:
    """Where a server faceflow starts on ``host`` and ``port`` answers from this machine: its UI (when it has one)."""
    if host in ("0.0.0.0", "::", ""):  # every interface: this machine reaches it on loopback
        host = HOST
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def api_url_for(port: int, host: str = HOST) -> str:
    """The API of the server faceflow starts on ``host`` and ``port``."""
    return f"{server_url(port, host)}/api"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


# Health checks go straight to the server, never through a proxy: an http_proxy in the user's
# environment (without no_proxy) sent them to the proxy, and urlopen's default opener keeps the
# proxies it first saw for the life of the process.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def is_healthy(api_url: str, timeout: float = 2.0) -> bool:
    """Whether ``api_url/health`` answers 200 within ``timeout`` seconds."""
    try:
        with _DIRECT.open(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def check_credentials(api_url: str, timeout: float = 10.0) -> None:
    """Raise CredentialsError, one line naming PREFECT_API_AUTH_STRING, if the server refuses this process's auth string.

    An authenticated read (the server's version): the health route answers without credentials.
    """
    import base64

    request = urllib.request.Request(f"{api_url.rstrip('/')}/admin/version")
    secret = auth_string()
    if secret is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(secret.encode()).decode())
    try:
        with _DIRECT.open(request, timeout=timeout):
            return
    except urllib.error.HTTPError as error:
        if error.code != 401:
            raise ServerError(f"the Prefect server at {api_url} answered {error.code} to an authenticated read") from None
    except (OSError, ValueError) as error:
        raise ServerError(f"the Prefect server at {api_url} does not answer ({error})") from None
    said = "refused the auth string given" if secret is not None else "requires an auth string, and none is set"
    raise CredentialsError(f"the Prefect server at {api_url} {said}: set {AUTH_STRING_VARIABLE} (or {AUTH_FILE_VARIABLE}, "
                           "a file holding it) to the server's user:password")


def server_auth_env() -> dict[str, str]:
    """What a server faceflow starts needs to require this process's auth string, with CSRF protection; {} without one."""
    secret = auth_string()
    if secret is None:
        return {}
    return {SERVER_AUTH_STRING_VARIABLE: secret, CSRF_VARIABLE: "true"}


def tethered(command: list[str]) -> list[str]:
    """``command`` run through commands.tether: the kernel stops it when this process dies."""
    return [sys.executable, "-m", "commands.tether", str(os.getpid()), *command]


def start_server(home: Path, port: int | None = None, ui: bool = False, host: str = HOST) -> LocalServer:
    """Launch ``prefect server start`` for ``home`` on ``host``; returns at once (see ``wait_until_ready``).

    With an auth string (PREFECT_API_AUTH_STRING or FACEFLOW_AUTH_FILE) the server requires it on
    every route but its health check, and checks CSRF tokens; the caller refuses a ``host``
    beyond loopback without one (commands/ui.py).
    """
    port = port or free_port()
    api_url = api_url_for(port, host)
    logs = home / LOG_FOLDER
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / (f"ui-{port}.log" if ui else f"run-{os.getpid()}-{port}.log")
    env = os.environ | {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "true" if ui else "false",
        # The UI's pages call the API at this address; Prefect's default is port 4200.
        "PREFECT_UI_API_URL": api_url,
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
    } | server_auth_env()
    if os.environ.get("PREFECT_UI_API_URL") and host not in (HOST, "localhost"):
        env["PREFECT_UI_API_URL"] = os.environ["PREFECT_UI_API_URL"]  # the address other machines' browsers use
    env.pop(API_URL_VARIABLE, None)
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            tethered(command), env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # the terminal's Ctrl-C reaches us, and we stop it in order
        )
    return LocalServer(home, port, process, log_path, time.monotonic(), host)


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_until_ready(server: LocalServer, timeout: float) -> None:
    """Poll the health endpoint until it answers; raise ServerError if the server exits or ``timeout`` passes.

    ``timeout`` counts from the server's launch, not from this call.
    """
    deadline = server.launched_at + timeout
    while not is_healthy(server.api_url, timeout=HEALTH_POLL_TIMEOUT):
        if server.process.poll() is not None:
            raise ServerError(
                f"the Prefect server exited with code {server.process.returncode} while starting; "
                f"its log {server.log_path} ends:\n{_log_tail(server.log_path)}"
            )
        if time.monotonic() > deadline:
            raise ServerError(
                f"the Prefect server did not answer within {timeout:g} s (raise FACEFLOW_SERVER_START_TIMEOUT "
                f"on a busy machine); its log is {server.log_path}"
            )
        time.sleep(HEALTH_POLL_INTERVAL)


def stop_server(server: LocalServer, grace: float = 20.0) -> None:
    """SIGTERM (a graceful uvicorn shutdown), SIGKILL after ``grace`` seconds; reaps the process."""
    for stop_signal, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if server.process.poll() is not None:
            break
        try:
            os.killpg(server.process.pid, stop_signal)
        except ProcessLookupError:
            break
        try:
            server.process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    server.process.wait()


@contextmanager
def local_server(home: Path, timeout: float, port: int | None = None, ui: bool = False,
                 host: str = HOST) -> Iterator[LocalServer]:
    """A started and ready server for ``home``, stopped when the block ends however it ends."""
    server = start_server(home, port, ui, host)
    try:
        wait_until_ready(server, timeout)
        yield server
    finally:
        stop_server(server)


def record_path(home: Path) -> Path:
    return home / SERVER_RECORD


def write_record(home: Path, server: LocalServer) -> None:
    """Tell later faceflow commands with this PREFECT_HOME that ``server`` is up (``faceflow ui``)."""
    record = {"api_url": server.api_url, "pid": server.process.pid, "owner_pid": os.getpid()}
    temporary = record_path(home).with_suffix(".tmp")
    temporary.write_text(json.dumps(record))
    os.replace(temporary, record_path(home))


def remove_record(home: Path) -> None:
    record_path(home).unlink(missing_ok=True)


def recorded_server(home: Path) -> str | None:
    """The API URL ``faceflow ui`` recorded for ``home``, if that server answers."""
    try:
        api_url = json.loads(record_path(home).read_text())["api_url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return api_url if is_healthy(api_url) else None


class ApiServer:
    """Where a command's flow runs are recorded: a server found running, or one this command started."""

    def __init__(self, api_url: str, started: LocalServer | None) -> None:
        self.api_url = api_url
        self.started = started

    def wait_until_ready(self, timeout: float) -> None:
        if self.started is not None:
            wait_until_ready(self.started, timeout)
        elif not is_healthy(self.api_url, timeout=10.0):
            raise ServerError(f"the Prefect server at {API_URL_VARIABLE}={self.api_url} does not answer")
        check_credentials(self.api_url)  # a wrong or missing auth string: one line, before any flow run


@contextmanager
def api_server(home: Path) -> Iterator[ApiServer]:
    """Reuse ``PREFECT_API_URL`` or ``faceflow ui``'s server for ``home``, else start one (stopped on exit).

    Returns before a started server is ready, so the caller can import while it boots; call
    ``wait_until_ready`` before using it.
    """
    api_url = api_url_from_environment() or recorded_server(home)
    if api_url is not None:
        yield ApiServer(api_url, None)
        return
    started = start_server(home)
    succeeded = False
    try:
        yield ApiServer(started.api_url, started)
        succeeded = True
    finally:
        stop_server(started)
        if succeeded:  # a failed command keeps the server's log for its error message to name
            started.log_path.unlink(missing_ok=True)
