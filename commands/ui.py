"""`faceflow ui`: the Prefect UI with faceflow's deployments and a worker, until Ctrl-C.

It starts a server for PREFECT_HOME (or uses PREFECT_API_URL's), creates the process work pool,
deploys every deployment in prefect.yaml with Prefect's own `prefect deploy`, starts a worker
(which passes FACEFLOW_DATA_FILE on to the flow runs it starts), and stops all of it, flow runs
in progress included, when it is interrupted or terminated. While it runs, `faceflow run` with
the same PREFECT_HOME finds its server through the record file it leaves there.

It also creates faceflow's alert automations (commands/alerts.py), gives the pool's flow runs
(through its job template) a heartbeat every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (30 unless set) so that a run whose
process died is marked Crashed, and restarts a worker that exits by itself (at most
MAX_WORKER_RESTARTS within RESTART_WINDOW_SECONDS); a server that exits stops everything.

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

from commands.alerts import HEARTBEATS_BEFORE_CRASHED
from commands.server import (
    HOST, LocalServer, ServerError, check_credentials, is_healthy, local_server, recorded_server, remove_record, tethered, write_record,
)
from faceflow.settings import (
    ALERT_BLOCK_VARIABLE, API_URL_VARIABLE, AUTH_FILE_VARIABLE, AUTH_STRING_VARIABLE, DATA_FILE_VARIABLE, HEARTBEAT_VARIABLES,
    SettingError, alert_block, api_url_from_environment, apply_auth_string, heartbeat_seconds, is_loopback, prefect_home,
)
from commands.tether import become_subreaper

PROJECT_ROOT = Path(__file__).resolve().parent.parent
WORK_POOL = "faceflow-local"  # the pool prefect.yaml's deployments name
# How often the worker asks for scheduled runs; Prefect's default of 10 s makes the UI's Run button feel dead.
WORKER_POLL_SECONDS = "3"
# A worker that exits by itself is started again, unless it has been this many times within the window.
MAX_WORKER_RESTARTS = 5
RESTART_WINDOW_SECONDS = 600.0


class UIError(RuntimeError):
    """The UI could not be brought up."""


def ensure_work_pool(name: str = WORK_POOL) -> None:
    """Create the process work pool the deployments use, or bring its job template up to date.

    The template gives every flow run the pool's workers start (a worker started by hand on another
    machine included) the heartbeat the crash automation expects.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["env"]["default"] = {HEARTBEAT_VARIABLES[0]: str(heartbeat_seconds())}
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))
        except ObjectAlreadyExists:
            client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))


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


def start_worker(name: str) -> subprocess.Popen:
    """`prefect worker start` for the pool, in its own session (we stop it, in order), its output on ours.

    Its flow runs send heartbeats as the pool's job template says (ensure_work_pool).
    """
    env = os.environ | {"PREFECT_WORKER_QUERY_SECONDS": WORKER_POLL_SECONDS}
    return subprocess.Popen(
        tethered([sys.executable, "-m", "prefect", "worker", "start", "--pool", WORK_POOL, "--name", name]),
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


class Worker:
    """The pool's worker, started again when it exits by itself, a bounded number of times.

    A flow run whose worker was killed but which itself survived is re-parented to `faceflow ui`
    (a child subreaper): it is left to finish, since it still reports its own states and heartbeats
    to the server, and it is stopped with everything else when `faceflow ui` stops. A flow run that
    died with its worker stops sending heartbeats and is marked Crashed by the automation.
    """

    def __init__(self) -> None:
        self.started = 0
        self.restarts: list[float] = []  # monotonic times of the restarts
        self.process = self._start()

    def _start(self) -> subprocess.Popen:
        self.started += 1
        # The machine and this process: another machine's workers in the pool are told apart.
        self.name = f"faceflow-{socket.gethostname()}-{os.getpid()}-{self.started}"
        return start_worker(self.name)

    def restart_if_exited(self) -> None:
        """Start a new worker if this one has exited; raise UIError once it exited too often."""
        code = self.process.poll()
        if code is None:
            return
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW_SECONDS]
        if len(self.restarts) >= MAX_WORKER_RESTARTS:
            raise UIError(f"the Prefect worker exited unexpectedly with code {code}, after {len(self.restarts)} restarts "
                          f"within {RESTART_WINDOW_SECONDS / 60:g} minutes: giving up")
        self.restarts.append(now)
        self.process = self._start()
        print(f"faceflow ui: the Prefect worker exited unexpectedly with code {code}; started worker {self.name} "
              f"(restart {len(self.restarts)}, at most {MAX_WORKER_RESTARTS} within {RESTART_WINDOW_SECONDS / 60:g} minutes)",
              flush=True)


@contextmanager
def running_worker(server: LocalServer | None, timeout: float) -> Iterator[Worker]:
    """A worker that is online in the pool; stopped, with any flow run it left, when the block ends."""
    worker = Worker()
    try:
        deadline = time.monotonic() + timeout
        while worker.name not in online_workers():  # this one: another machine's may be online already
            if worker.process.poll() is not None:
                raise UIError(f"the Prefect worker exited with code {worker.process.returncode} while starting")
            if time.monotonic() > deadline:
                raise UIError(f"the Prefect worker did not come online within {timeout:g} s")
            time.sleep(0.5)
        yield worker
    finally:
        stop_worker(worker.process)
        stop_orphans(keep={server.process.pid} if server else set())


def reap_orphans(keep: set[int]) -> None:
    """Collect the exit status of adopted orphans (flow runs whose worker died) that have ended, so none stays a zombie."""
    for child in psutil.Process().children():
        try:
            if child.pid not in keep and child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)
        except (psutil.NoSuchProcess, ChildProcessError):
            continue


def watch(worker: Worker, server: subprocess.Popen | None) -> None:
    """Block until interrupted: restart the worker when it exits; raise if the server exits."""
    while True:
        if server is not None and server.poll() is not None:
            raise UIError(f"the Prefect server exited unexpectedly with code {server.returncode}")
        worker.restart_if_exited()
        reap_orphans(keep={worker.process.pid} | ({server.pid} if server else set()))
        time.sleep(1.0)


def set_up_alerts(block_id, ui_url: str) -> bool:
    """faceflow's automations (commands/alerts.py), created or updated by name; whether alerts go somewhere (a line if not)."""
    from commands.alerts import ensure_automations

    notifying = all(automation.enabled for automation in ensure_automations(block_id, ui_url, heartbeat_seconds()))
    if not notifying:
        print(f"alerts go nowhere until {ALERT_BLOCK_VARIABLE} names a notification block (docs/operations.md, Alerts)",
              flush=True)
    return notifying


def refuse_open_host(host: str) -> None:
    """SettingError for a ``host`` beyond loopback while no auth string is set (or a malformed one)."""
    if apply_auth_string() is None and not is_loopback(host):
        raise SettingError(f"--host {host} lets other machines reach the server, which would then run any code and show "
                           f"every face to whoever asks: set {AUTH_STRING_VARIABLE} or {AUTH_FILE_VARIABLE} (user:password) "
                           f"first, or serve on {HOST}")


def serve_ui(port: int, start_timeout: float, host: str = HOST) -> None:
    """Bring the UI up, print where it is, and keep it up until interrupted; stops everything on the way out."""
    refuse_open_host(host)  # before anything starts
    heartbeat_seconds(), alert_block()  # a malformed setting stops here, before anything starts
    become_subreaper()
    home = prefect_home()
    with ExitStack() as stack:
        server: LocalServer | None = None
        api_url = api_url_from_environment()
        if api_url is not None:
            if not is_healthy(api_url, timeout=10.0):
                raise ServerError(f"the Prefect server at {API_URL_VARIABLE}={api_url} does not answer")
            check_credentials(api_url)
            ui_url = api_url.removesuffix("/api")
        else:
            if (running := recorded_server(home)) is not None:
                raise UIError(f"faceflow ui already runs a server for PREFECT_HOME={home} at {running}")
            print(f"starting the Prefect server for PREFECT_HOME={home} ...", flush=True)
            server = stack.enter_context(local_server(home, start_timeout, port=port, ui=True, host=host))
            write_record(home, server)
            stack.callback(remove_record, home)
            api_url, ui_url = server.api_url, server.url
        os.environ[API_URL_VARIABLE] = api_url  # for Prefect's client, imported from here on, and for the worker
        from commands.alerts import notification_block

        block_id = notification_block()  # FACEFLOW_ALERT_BLOCK naming no block stops here, before the UI is up
        print(f"creating work pool {WORK_POOL!r} and deploying prefect.yaml ...", flush=True)
        ensure_work_pool()
        deploy_all()
        notifying = set_up_alerts(block_id, ui_url)
        if DATA_FILE_VARIABLE not in os.environ:
            print(f"warning: {DATA_FILE_VARIABLE} is not set: runs from the UI will try scikit-learn's download", flush=True)
        worker = stack.enter_context(running_worker(server, start_timeout))
        print(
            f"\nfaceflow UI: {ui_url}\n"
            f"  deployments: {', '.join(deployment_names())}; a worker is online in pool {WORK_POOL!r}\n"
            f"  faceflow run with PREFECT_HOME={home} uses this server\n"
            f"  alerts: {os.environ.get(ALERT_BLOCK_VARIABLE) or 'as another machine set them' if notifying else 'nowhere'}; "
            "a deployment run without a heartbeat "
            f"for {HEARTBEATS_BEFORE_CRASHED * heartbeat_seconds()} s is marked Crashed\n"
            "  Ctrl-C stops the worker, its flow runs and the server\n",
            flush=True,
        )
        watch(worker, server.process if server else None)
