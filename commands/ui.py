"""`faceflow ui`: the Prefect UI with faceflow's deployments and a worker, until Ctrl-C.

It starts a server for PREFECT_HOME (or uses PREFECT_API_URL's), creates the process work pool,
deploys every deployment in prefect.yaml with Prefect's own `prefect deploy`, starts a worker
(which passes FACEFLOW_DATA_FILE on to the flow runs it starts), and stops all of it, flow runs
in progress included, when it is interrupted or terminated. While it runs, `faceflow run` with
the same PREFECT_HOME finds its server through the record file it leaves there.

Prefect is imported inside the functions that use it: its settings are read once, at import,
and PREFECT_API_URL is only known once the server is up.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psutil

from commands.server import (
    LocalServer, ServerError, is_healthy, local_server, recorded_server, remove_record, tethered, write_record,
)
from faceflow.settings import API_URL_VARIABLE, DATA_FILE_VARIABLE, api_url_from_environment, prefect_home
from commands.tether import become_subreaper

PROJECT_ROOT = Path(__file__).resolve().parent.parent
WORK_POOL = "faceflow-local"  # the pool prefect.yaml's deployments name
# How often the worker asks for scheduled runs; Prefect's default of 10 s makes the UI's Run button feel dead.
WORKER_POLL_SECONDS = "3"


class UIError(RuntimeError):
    """The UI could not be brought up."""


def ensure_work_pool(name: str = WORK_POOL) -> None:
    """Create the process work pool the deployments use, unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            pass


def deploy_all() -> None:
    """`prefect deploy --all` from the project root: prefect.yaml is the one description of the deployments."""
    result = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
        cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True,
    )
    if result.returncode != 0:
        raise UIError(f"prefect deploy --all failed (exit {result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}")


def deployment_names() -> list[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return sorted(deployment.name for deployment in client.read_deployments())


def online_workers(pool: str = WORK_POOL) -> set[str]:
    """The names of the pool's workers that are online (other machines' included)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {worker.name for worker in client.read_workers_for_work_pool(pool) if worker.status == "ONLINE"}


def worker_name() -> str:
    """This `faceflow ui`'s worker: the machine and the process, so a second machine's worker is told apart."""
    return f"faceflow-{socket.gethostname()}-{os.getpid()}"


def start_worker() -> subprocess.Popen:
    """`prefect worker start` for the pool, in its own session (we stop it, in order), its output on ours."""
    env = os.environ | {"PREFECT_WORKER_QUERY_SECONDS": WORKER_POLL_SECONDS}
    return subprocess.Popen(
        tethered([sys.executable, "-m", "prefect", "worker", "start", "--pool", WORK_POOL, "--name", worker_name()]),
        env=env, cwd=PROJECT_ROOT, stdin=subprocess.DEVNULL, start_new_session=True,
    )


def terminate(processes: list[psutil.Process], grace: float) -> None:
    """SIGTERM each process, SIGKILL whichever is still alive after ``grace`` seconds."""
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def stop_worker(worker: subprocess.Popen, grace: float = 30.0) -> None:
    """Stop the worker's flow runs first, then the worker.

    A flow run that receives SIGTERM itself records its end (Crashed) while the server is
    still up; stopped by its worker, it died without a word and stayed Running.
    """
    try:
        process = psutil.Process(worker.pid)
        terminate(process.children(recursive=True), grace)
        terminate([process], grace)
    except psutil.NoSuchProcess:
        pass
    worker.wait()


def stop_orphans(keep: set[int], grace: float = 20.0) -> None:
    """Stop what was started under us and outlived its parent (a flow run whose worker has gone).

    This process is a child subreaper, so such orphans are re-parented to it instead of init.
    """
    terminate([p for p in psutil.Process().children(recursive=True) if p.pid not in keep], grace)


@contextmanager
def running_worker(server: LocalServer | None, timeout: float) -> Iterator[subprocess.Popen]:
    """A worker that is online in the pool; stopped, with any flow run it left, when the block ends."""
    worker = start_worker()
    try:
        deadline = time.monotonic() + timeout
        while worker_name() not in online_workers():
            if worker.poll() is not None:
                raise UIError(f"the Prefect worker exited with code {worker.returncode} while starting")
            if time.monotonic() > deadline:
                raise UIError(f"the Prefect worker did not come online within {timeout:g} s")
            time.sleep(0.5)
        yield worker
    finally:
        stop_worker(worker)
        stop_orphans(keep={server.process.pid} if server else set())


def watch(children: dict[str, subprocess.Popen]) -> None:
    """Block until interrupted; raise if a child we depend on exits by itself."""
    while True:
        for name, child in children.items():
            if child.poll() is not None:
                raise UIError(f"the Prefect {name} exited unexpectedly with code {child.returncode}")
        time.sleep(1.0)


def serve_ui(port: int, start_timeout: float) -> None:
    """Bring the UI up, print where it is, and keep it up until interrupted; stops everything on the way out."""
    become_subreaper()
    home = prefect_home()
    with ExitStack() as stack:
        server: LocalServer | None = None
        api_url = api_url_from_environment()
        if api_url is not None:
            if not is_healthy(api_url, timeout=10.0):
                raise ServerError(f"the Prefect server at {API_URL_VARIABLE}={api_url} does not answer")
            ui_url = api_url.removesuffix("/api")
        else:
            if (running := recorded_server(home)) is not None:
                raise UIError(f"faceflow ui already runs a server for PREFECT_HOME={home} at {running}")
            print(f"starting the Prefect server for PREFECT_HOME={home} ...", flush=True)
            server = stack.enter_context(local_server(home, start_timeout, port=port, ui=True))
            write_record(home, server)
            stack.callback(remove_record, home)
            api_url, ui_url = server.api_url, server.url
        os.environ[API_URL_VARIABLE] = api_url  # for Prefect's client, imported from here on, and for the worker
        print(f"creating work pool {WORK_POOL!r} and deploying prefect.yaml ...", flush=True)
        ensure_work_pool()
        deploy_all()
        if DATA_FILE_VARIABLE not in os.environ:
            print(f"warning: {DATA_FILE_VARIABLE} is not set: runs from the UI will try scikit-learn's download", flush=True)
        worker = stack.enter_context(running_worker(server, start_timeout))
        print(
            f"\nfaceflow UI: {ui_url}\n"
            f"  deployments: {', '.join(deployment_names())}; a worker is online in pool {WORK_POOL!r}\n"
            f"  faceflow run with PREFECT_HOME={home} uses this server\n"
            "  Ctrl-C stops the worker, its flow runs and the server\n",
            flush=True,
        )
        watch({"worker": worker} | ({"server": server.process} if server else {}))
