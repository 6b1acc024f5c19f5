"""The services of several machines, secured (docs/operations.md, Security): real ones, each refusing who has no credentials.

A Prefect server with an auth string and CSRF protection, a redis-server with a password, a Dask
scheduler with TLS certificates made here; and faceflow refusing, before any work, to use them
(or to serve the UI beyond loopback) without credentials.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from commands.server import local_server
from conftest import REPO_ROOT
from faceflow.settings import SettingError, dask_tls, redis_url
from services import RedisServer, dask_tls_arguments, dask_tls_env, make_tls_files
from support import assert_no_process_left, faceflow, tagged_env, wait_for_text

SECRET = "faceflow:correct-horse-battery"
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def request(url: str, method: str = "GET", auth: str | None = None, headers: dict[str, str] | None = None) -> int:
    """The HTTP status the server answers ``url`` with."""
    sent = urllib.request.Request(url, data=b"{}" if method == "POST" else None, method=method,
                                  headers={"Content-Type": "application/json"} | (headers or {}))
    if auth is not None:
        sent.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with DIRECT.open(sent, timeout=30) as answer:
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def auth_file(folder: Path, content: str = SECRET, mode: int = 0o600) -> Path:
    path = folder / "prefect-auth"
    path.write_text(content + "\n")
    path.chmod(mode)
    return path


def test_a_server_with_an_auth_string_lets_in_only_who_sends_it(tmp_path: Path, prefect_home: Path, tag: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """faceflow's server (FACEFLOW_AUTH_FILE): 401 without the string, CSRF tokens required, Prefect's client let in;
    a faceflow command with a wrong, missing or malformed string stops with one line naming PREFECT_API_AUTH_STRING."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    secret_file = auth_file(tmp_path)
    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    monkeypatch.setenv("FACEFLOW_AUTH_FILE", str(secret_file))
    monkeypatch.setenv("FACEFLOW_TEST_TAG", tag)
    with local_server(prefect_home, timeout=300) as server:
        api = server.api_url
        assert request(f"{api}/health") == 200  # health alone answers anyone (a load balancer's probe)
        assert request(f"{api}/admin/version") == 401
        assert request(f"{api}/csrf-token?client=stranger") == 401  # no way round it through a CSRF token
        assert request(f"{api}/flows/filter", "POST") in (401, 403)  # (CSRF is checked first: 403)
        assert request(f"{api}/admin/version", auth="faceflow:wrong-password-here") == 401
        assert request(f"{api}/admin/version", auth=SECRET) == 200
        # CSRF protection is on: a state-changing request with the string but without a token is refused.
        assert request(f"{api}/variables/", "POST", auth=SECRET) == 403
        with temporary_settings({PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: SECRET}):
            with get_client(sync_client=True) as prefect:  # Prefect's client fetches a CSRF token and sends both
                from prefect.client.schemas.actions import VariableCreate

                prefect.create_variable(VariableCreate(name="faceflow-auth-check", value="let in"))
                assert prefect.read_variable_by_name("faceflow-auth-check").value == "let in"
        assert secret_file.read_text().strip().split(":")[1] not in server.log_path.read_text()

        base = tagged_env(tag, tmp_path / "client-home", PREFECT_API_URL=api)
        base.pop("FACEFLOW_AUTH_FILE", None)
        for case, extra, status, said in [
            ("wrong", {"PREFECT_API_AUTH_STRING": "faceflow:not-the-right-one"}, 1, "refused the auth string given"),
            ("missing", {}, 1, "requires an auth string, and none is set"),
            ("malformed", {"PREFECT_API_AUTH_STRING": "faceflow-no-colon-here"}, 2, "the auth string is malformed"),
        ]:
            env = {k: v for k, v in base.items() if k != "PREFECT_API_AUTH_STRING"} | extra
            refused = subprocess.run(faceflow("champion", "--check"), env=env, capture_output=True, text=True, timeout=300)
            lines = refused.stderr.strip().splitlines()
            assert refused.returncode == status and len(lines) == 1, (case, refused.stderr[-3000:])
            assert said in lines[0] and "PREFECT_API_AUTH_STRING" in lines[0], (case, lines)
            assert "Traceback" not in refused.stderr and "not-the-right-one" not in refused.stderr + refused.stdout
        right = subprocess.run(faceflow("champion", "--check", "--json"), env=base | {"FACEFLOW_AUTH_FILE": str(secret_file)},
                               capture_output=True, text=True, timeout=300)
        assert right.returncode == 0 and json.loads(right.stdout.splitlines()[-1]) == {"found": []}, right.stderr[-3000:]
    assert_no_process_left(tag)


def test_an_auth_file_others_can_read_is_refused(tmp_path: Path, tag: str) -> None:
    env = tagged_env(tag, tmp_path / "home", FACEFLOW_AUTH_FILE=str(auth_file(tmp_path, mode=0o644)))
    env.pop("PREFECT_API_AUTH_STRING", None)
    refused = subprocess.run(faceflow("champion", "--check"), env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"faceflow refused: FACEFLOW_AUTH_FILE={tmp_path / 'prefect-auth'}: others can read it (mode 644); "
        f"`chmod 600 {tmp_path / 'prefect-auth'}` first"]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.7"])
def test_ui_beyond_loopback_without_an_auth_string_is_refused_before_anything_starts(host: str, tmp_path: Path, tag: str) -> None:
    env = tagged_env(tag, tmp_path / "home")
    for variable in ("PREFECT_API_AUTH_STRING", "FACEFLOW_AUTH_FILE"):
        env.pop(variable, None)
    refused = subprocess.run(["make", "--no-print-directory", "ui", f"HOST={host}", "PORT=4299"], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    lines = [line for line in refused.stderr.splitlines() if not line.startswith("make:")]
    assert len(lines) == 1 and lines[0].startswith(f"faceflow ui refused: --host {host} lets other machines reach"), refused.stderr
    assert "PREFECT_API_AUTH_STRING" in lines[0] and "Traceback" not in refused.stderr
    assert not (tmp_path / "home").exists()  # no server, no database, no log: nothing started
    assert_no_process_left(tag)


def test_redis_with_a_password_refuses_clients_without_it_and_serves_faceflow_s_locks(tag: str) -> None:
    from redis import Redis
    from redis.exceptions import AuthenticationError

    from faceflow.redis_locks import ExpiringRedisLockManager

    with RedisServer(env={"FACEFLOW_TEST_TAG": tag}, password="a-long-redis-password") as server:
        with Redis(host="127.0.0.1", port=server.port) as stranger, pytest.raises(AuthenticationError):
            stranger.set("faceflow-lock:planted", "stall", nx=True)  # a lock planted to stall every step: refused
        with Redis.from_url(server.url) as member:
            assert member.exists("faceflow-lock:planted") == 0
        manager = ExpiringRedisLockManager(server.url, hold_seconds=30)
        assert manager.acquire_lock("step-key", holder="machine a", acquire_timeout=5)
        other = ExpiringRedisLockManager(server.url, hold_seconds=30)
        assert other.is_locked("step-key") and not other.acquire_lock("step-key", holder="machine b", acquire_timeout=0.2)
        manager.release_lock("step-key", holder="machine a")
        assert not other.is_locked("step-key")
    assert_no_process_left(tag)


@pytest.mark.parametrize("url, accepted", [
    ("redis://cache.example:6379/0", False),
    ("redis://faceflow@cache.example:6379/0", False),  # an ACL user with no password
    ("rediss://cache.example:6380/0", False),
    ("redis://:a-password@cache.example:6379/0", True),
    ("redis://faceflow:a-password@10.0.0.5:6379/0", True),
    ("rediss://faceflow:a-password@cache.example:6380/0", True),
    ("redis://127.0.0.1:6379/0", True),  # this machine only
    ("redis://localhost:6379/0", True),
])
def test_a_redis_url_beyond_this_machine_needs_a_password(url: str, accepted: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACEFLOW_REDIS_URL", url)
    if accepted:
        assert redis_url() == url
        return
    with pytest.raises(SettingError) as refused:
        redis_url()
    assert str(refused.value).startswith(f"FACEFLOW_REDIS_URL={url!r}: cache.example is not this machine, and the URL has "
                                         "no password")


def test_faceflow_refuses_a_remote_redis_without_credentials_before_any_command(tmp_path: Path, tag: str) -> None:
    env = tagged_env(tag, tmp_path / "home", FACEFLOW_REDIS_URL="redis://cache.example:6379/0")
    refused = subprocess.run(faceflow("run", "--output-dir", str(tmp_path / "out")), env=env, capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("faceflow refused: FACEFLOW_REDIS_URL='redis://cache.example:6379/0': "
                                                   "cache.example is not this machine"), lines
    assert not (tmp_path / "home").exists() and not (tmp_path / "out").exists()


def _start_tls_scheduler(folder: Path, tls: dict[str, Path], tag: str) -> tuple[subprocess.Popen, str]:
    scheduler_file = folder / "scheduler.json"
    log = folder / "scheduler.err"
    process = subprocess.Popen(
        [sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard", "--protocol", "tls",
         "--scheduler-file", str(scheduler_file), *dask_tls_arguments(tls, "scheduler")],
        env=tagged_env(tag, folder / "home"), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log.open("wb"),
    )
    wait_for_text(scheduler_file, "tls://", process, timeout=120)
    return process, json.loads(scheduler_file.read_text())["address"]


def _client_context(ca: Path, cert: Path | None = None, key: Path | None = None):
    """A TLS client context that trusts ``ca``, with ``cert`` and ``key`` when given (as dask's Security builds it)."""
    import ssl

    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    context.check_hostname = False  # dask checks the CA's signature, not host names
    if cert is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def _scheduler_answers(address: str, context) -> bool:
    """Whether the scheduler at ``address`` answers an ``identity`` request over TLS with ``context``."""
    import asyncio

    from distributed.comm import connect

    async def ask() -> bool:
        try:
            comm = await connect(address, timeout=10, ssl_context=context, require_encryption=True)
            try:
                await comm.write({"op": "identity", "reply": True})
                return (await comm.read()).get("type") == "Scheduler"
            finally:
                await comm.close()
        except OSError:  # CommClosedError, a TLS alert, a handshake refused
            return False

    return asyncio.run(ask())


def test_a_tls_dask_scheduler_refuses_clients_without_a_certificate_and_runs_the_sweep_s(tmp_path: Path, tag: str,
                                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A scheduler and worker with certificates signed by the test's CA: the sweep's client (flows/sweep.py) gets in;
    one with no certificate, one with another CA's, and a plain tcp:// one do not."""
    from distributed import Client
    from flows.sweep import sweep_task_runner

    tls = make_tls_files(tmp_path / "tls")
    stranger = make_tls_files(tmp_path / "other-ca", names=("client",))
    scheduler, address = _start_tls_scheduler(tmp_path, tls, tag)
    worker = subprocess.Popen(
        [sys.executable, "-m", "dask", "worker", address, "--nthreads", "1", "--nworkers", "1", "--host", "127.0.0.1",
         "--no-dashboard", *dask_tls_arguments(tls, "worker")],
        env=tagged_env(tag, tmp_path / "home"), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "worker.err").open("wb"),
    )
    try:
        for name, value in dask_tls_env(tls, "client").items():
            monkeypatch.setenv(name, value)
        runner = sweep_task_runner(address)  # the sweep's DaskTaskRunner: its client's arguments
        with Client(address, timeout=60, **runner.client_kwargs) as client:
            client.wait_for_workers(1, timeout=120)
            assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
        # A client that trusts the CA (and so would talk TLS) but has no certificate, and one whose
        # certificate another CA signed: the scheduler ends both before they can ask it anything.
        assert _scheduler_answers(address, _client_context(tls["ca"])) is False
        assert _scheduler_answers(address, _client_context(tls["ca"], stranger["client-cert"], stranger["client-key"])) is False
        assert _scheduler_answers(address, _client_context(tls["ca"], tls["client-cert"], tls["client-key"])) is True
        with pytest.raises(OSError):  # plain TCP to the TLS port
            Client(address.replace("tls://", "tcp://"), timeout=5)
    finally:
        for process in (worker, scheduler):
            process.terminate()
            process.wait(timeout=60)
    assert_no_process_left(tag)


def test_dask_tls_settings_are_checked_before_any_work(tmp_path: Path, tag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tls = make_tls_files(tmp_path / "tls", names=("client",))
    for name, value in dask_tls_env(tls, "client").items():
        monkeypatch.setenv(name, value)
    assert dask_tls() == {"ca": str(tls["ca"]), "cert": str(tls["client-cert"]), "key": str(tls["client-key"])}
    monkeypatch.delenv("FACEFLOW_DASK_TLS_KEY")
    with pytest.raises(SettingError, match=r"^FACEFLOW_DASK_TLS_KEY not set: Dask's TLS needs all of"):
        dask_tls()
    monkeypatch.setenv("FACEFLOW_DASK_TLS_KEY", str(tmp_path / "missing.key"))
    with pytest.raises(SettingError, match=rf"^FACEFLOW_DASK_TLS_KEY={tmp_path / 'missing.key'}: cannot be read \(No such file"):
        dask_tls()
    monkeypatch.setenv("FACEFLOW_DASK_TLS_KEY", str(tls["client-key"]))

    spec = tmp_path / "sweep.yaml"
    spec.write_text("grid:\n  train.learning_rate: [0.003, 0.005]\n")
    env = tagged_env(tag, tmp_path / "home")
    address = "tcp://scheduler.example:8786"  # TLS set, a plain address
    refused = subprocess.run(faceflow("sweep", str(spec), "--dask-address", address), env=env | dask_tls_env(tls, "client"),
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        f"faceflow sweep refused: --dask-address {address}: FACEFLOW_DASK_TLS_CA and the others are set: "
        "give the scheduler as tls://host:port"]
    no_tls = {name: value for name, value in env.items() if not name.startswith("FACEFLOW_DASK_TLS_")}  # set above
    plain = subprocess.run(faceflow("sweep", str(spec), "--dask-address", "tcp://scheduler.example:8786"), env=no_tls,
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and plain.stderr.strip().splitlines()[0].startswith(
        "faceflow sweep refused: --dask-address tcp://scheduler.example:8786: scheduler.example is not this machine: "
        "a Dask scheduler beyond it must use TLS")
    unreadable = subprocess.run(faceflow("sweep", str(spec), "--dask-address", "tls://127.0.0.1:8786"),
                                env=env | dask_tls_env(tls, "client") | {"FACEFLOW_DASK_TLS_CA": str(tmp_path / "nowhere.pem")},
                                capture_output=True, text=True, timeout=120)
    assert unreadable.returncode == 2 and unreadable.stderr.strip().splitlines() == [
        f"faceflow sweep refused: FACEFLOW_DASK_TLS_CA={tmp_path / 'nowhere.pem'}: cannot be read (No such file or directory)"]
    assert not (tmp_path / "home").exists()
    assert_no_process_left(tag)
