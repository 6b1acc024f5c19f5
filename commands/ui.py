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
import signal
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
# The process worker sets this in every flow run's process: which run a process belongs to.
FLOW_RUN_ID_VARIABLE = "PREFECT__FLOW_RUN_ID"
# `faceflow ui` gives its worker, and so every flow run process the worker starts, its own pid:
# how it finds what it started even where the process tree no longer shows it.
UI_PID_VARIABLE = "FACEFLOW_UI_PID"
# Rounds of stopping: each round stops what the previous one left or let start.
STOP_ROUNDS = 5


class UIError(RuntimeError):
    """The UI could not be brought up."""


def ensure_work_pool(name: str = WORK_POOL) -> None:
    """Create the process work pool the deployments use, or bring its job template up to date.

    The template gives every flow run the pool's workers start (a worker started by hand on another
    machine included) the heartbeat the crash automation expects, and output of its own (not piped
    through the worker), so a run outlives a worker that dies.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["env"]["default"] = {HEARTBEAT_VARIABLES[0]: str(heartbeat_seconds())}
    # A flow run's output would go through a pipe to its worker: once the worker died, the run's next
    # log line hit the broken pipe and Rich's console exited the run (Crashed, "system exit call").
    # Its logs go to the server (the run's page in the UI) either way.
    template["variables"]["properties"]["stream_output"]["default"] = False
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
    env = os.environ | {"PREFECT_WORKER_QUERY_SECONDS": WORKER_POLL_SECONDS, UI_PID_VARIABLE: str(os.getpid())}
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


def with_descendants(pids: set[int]) -> set[int]:
    """``pids`` and the pids of every process below them (a server's own child processes)."""
    found = set(pids)
    for pid in pids:
        try:
            found |= {child.pid for child in psutil.Process(pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            continue
    return found


def started_processes(keep: set[int]) -> list[psutil.Process]:
    """Every live process this `faceflow ui` started, but those in ``keep`` and below them.

    Its descendants (orphaned flow runs included: it is a child subreaper), and any process that
    carries its pid in UI_PID_VARIABLE (a flow run its worker started) wherever it was re-parented.
    """
    found = {process.pid: process for process in psutil.Process().children(recursive=True)}
    mark = str(os.getpid())
    for process in psutil.process_iter():
        try:
            if process.pid not in found and process.environ().get(UI_PID_VARIABLE) == mark:
                found[process.pid] = process
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    alive = []
    keep = with_descendants(keep)
    for pid, process in found.items():
        try:
            if pid not in keep and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            continue
    return alive


def flow_run_id(process: psutil.Process) -> str | None:
    """The id of the flow run ``process`` runs (or belongs to, a Dask worker it started), if any."""
    try:
        return process.environ().get(FLOW_RUN_ID_VARIABLE)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def stop_started(worker: subprocess.Popen, keep: set[int], grace: float = 30.0) -> set[str]:
    """Stop the worker's flow runs first, then the worker, then whatever is left; the ids of the flow runs stopped.

    The worker is frozen (SIGSTOP) first, so it starts no flow run while its runs are stopped. A
    flow run that receives SIGTERM itself records its end (Crashed) while the server is still up;
    stopped by its worker, it died without a word and stayed Running. Each round stops what is
    still alive, the flow runs' processes before the rest: a flow run the worker started as it
    was being stopped, one re-parented, one that ignored SIGTERM (SIGKILLed after ``grace``).
    """
    try:
        psutil.Process(worker.pid).suspend()
    except psutil.NoSuchProcess:
        pass
    runs: set[str] = set()
    for _ in range(STOP_ROUNDS):
        left = started_processes(keep)
        if not left:
            break
        flow_runs = [process for process in left if flow_run_id(process)]
        runs |= {flow_run_id(process) for process in flow_runs} - {None}
        if not flow_runs:
            for process in left:
                try:
                    process.resume()  # a frozen worker takes SIGTERM only once it runs again
                except psutil.NoSuchProcess:
                    pass
        terminate(flow_runs or left, grace)
        reap_orphans(keep)
    worker.wait()
    if left := started_processes(keep):
        print(f"faceflow ui: {len(left)} process(es) outlived {STOP_ROUNDS} rounds of SIGTERM and SIGKILL: "
              + ", ".join(str(process.pid) for process in left), flush=True)
    return runs


STOPPED_MESSAGE = "stopped with `faceflow ui` (make ui) before it ended"


def mark_stopped_runs(stopped: set[str], worker_names: list[str]) -> list[str]:
    """Set Crashed every run stopped with `faceflow ui` that did not record its end; the ids it set.

    Such a run was still starting (Pending, or Submitting: its process importing) or was killed
    after the grace. The runs the stopped processes ran count, with their sub-flows, and so does
    every Pending run of the pool that one of these workers had taken (the worker's label on it),
    or any Pending run of the pool when no other machine's worker is online.
    """
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterParentFlowRunId, FlowRunFilterState, FlowRunFilterStateType, WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    not_final = FlowRunFilterState(type=FlowRunFilterStateType(not_any_=[
        StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED]))
    others_online = online_workers() - set(worker_names)
    marked = []
    with get_client(sync_client=True) as client:
        pending = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PENDING]))),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[WORK_POOL])),
        )
        runs = {UUID(run_id) for run_id in stopped}
        runs |= {run.id for run in pending if run.labels.get("prefect.worker.name") in worker_names or not others_online}
        if runs:
            runs |= {run.id for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=list(runs)), state=not_final))}
        for run_id in runs:
            state = client.read_flow_run(run_id).state
            if state is None or not state.is_final():
                client.set_flow_run_state(run_id, Crashed(message=STOPPED_MESSAGE), force=True)
                marked.append(str(run_id))
    return marked


def ignore_stop_signals() -> None:
    """While `faceflow ui` stops, another SIGTERM or Ctrl-C must not cut the stop short.

    make, sent SIGTERM with its group, sends its child SIGTERM again: raised in the middle of the
    stop, it left a starting flow run's process behind, re-parented to init, for good.
    """
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.SIG_IGN)


def _unwind_once(signum: int, frame: object) -> None:
    """As commands/signals.py unwinds a command, taking only the first stop signal: the stop is under way."""
    ignore_stop_signals()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def stop_on_the_first_signal() -> None:
    """SIGTERM and Ctrl-C unwind `faceflow ui` once, never mid-import; a second one, while it stops, is ignored.

    make, sent SIGTERM with its group, sends its child SIGTERM again at once: taken before the stop
    began (while the first one's exception was on its way to it), it skipped the stop of the
    worker and its flow runs, and a starting run's process was left behind, Submitting, for good.
    """
    from faceflow.interrupts import deferring

    handler = deferring(_unwind_once)
    signal.signal(signal.SIGTERM, handler)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, handler)


class Worker:
    """The pool's worker, started again when it exits by itself, a bounded number of times.

    A flow run whose worker was killed but which itself survived is re-parented to `faceflow ui`
    (a child subreaper): it is left to finish, since it still reports its own states and heartbeats
    to the server, and it is stopped with everything else when `faceflow ui` stops. A flow run that
    died with its worker stops sending heartbeats and is marked Crashed by the automation.
    """

    def __init__(self) -> None:
        self.started = 0
        self.names: list[str] = []  # every worker started, the current one last
        self.restarts: list[float] = []  # monotonic times of the restarts
        self.process = self._start()

    def _start(self) -> subprocess.Popen:
        self.started += 1
        # The machine and this process: another machine's workers in the pool are told apart.
        self.name = f"faceflow-{socket.gethostname()}-{os.getpid()}-{self.started}"
        self.names.append(self.name)
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
        ignore_stop_signals()
        stopped = stop_started(worker.process, keep={server.process.pid} if server else set())
        try:
            marked = mark_stopped_runs(stopped, worker.names)  # before the server stops
        except Exception as error:  # the server is gone: nothing more can be recorded
            print(f"faceflow ui: could not record the end of the flow runs it stopped: {error}", flush=True)
        else:
            if marked:
                print(f"faceflow ui: marked Crashed {len(marked)} flow run(s) it stopped before they ended: "
                      + ", ".join(marked), flush=True)


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
    stop_on_the_first_signal()
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
