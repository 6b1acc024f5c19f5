"""A real Prefect server on 127.0.0.1 for tests and benchmarks, started and stopped by its user."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def prefect_server(home: Path, timeout: float = 120.0) -> Iterator[str]:
    """Start `prefect server start` with its own PREFECT_HOME; yield its API URL; stop it."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    # The UI's pages call the API at PREFECT_UI_API_URL, which defaults to port 4200.
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                        "PREFECT_UI_API_URL": api_url}
    env.pop("PREFECT_API_URL", None)
    log = (home / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not start; see {home / 'server.log'}")
            time.sleep(0.5)
        yield api_url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def boot_temporary_server_early() -> threading.Thread | None:
    """Start Prefect's own ephemeral server now, in the background; None if an API URL is set.

    A flow run without PREFECT_API_URL starts this server itself, but only when the flow
    begins, after torch, scikit-learn and the tasks have been imported. Booting it first lets
    the server's start-up (seconds, database migrations included) overlap those imports. The
    flow then finds the same server already running. Join the thread before running a flow.
    """
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return None
    from prefect.server.api.server import SubprocessASGIServer

    thread = threading.Thread(target=SubprocessASGIServer().start, name="prefect-server-boot", daemon=True)
    thread.start()
    return thread
