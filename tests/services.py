"""Real services for tests, started and stopped by the test that needs them: a Redis server, a PostgreSQL cluster."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from commands.server import free_port

HOST = "127.0.0.1"


class RedisServer:
    """Debian's ``redis-server`` on 127.0.0.1 and a free port, in a temporary folder, persisting nothing.

    ``start()`` returns once it answers PING; ``stop()`` sends SIGTERM and waits for it to exit
    (SIGTERM, not SIGINT: a process started from a script's background job ignores SIGINT).
    ``env`` is its environment (default: this process's), e.g. a test's tagged one.
    """

    def __init__(self, env: dict[str, str] | None = None, start_timeout: float = 30.0) -> None:
        self.env = env
        self.start_timeout = start_timeout
        self.port = 0
        self.folder: Path | None = None
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """redis://127.0.0.1:<port>/0 (a database number may be appended in place of /0 by the caller)."""
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> RedisServer:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not installed (make system-packages installs it)")
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="faceflow-test-redis-"))
        with (self.folder / "redis.log").open("wb") as log:
            self.process = subprocess.Popen(
                [executable, "--bind", HOST, "--port", str(self.port), "--dir", str(self.folder), "--save", "",
                 "--appendonly", "no", "--daemonize", "no"],
                env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not self.answers_ping():
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer PING within {self.start_timeout:g} s:\n{self.log()}")
            time.sleep(0.05)  # poll interval of the bounded wait for PONG

    def answers_ping(self) -> bool:
        """Whether the server answers PING with PONG (RESP, over a plain socket)."""
        try:
            with socket.create_connection((HOST, self.port), timeout=1.0) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def log(self) -> str:
        path = self.folder / "redis.log" if self.folder else None
        return path.read_text(errors="replace")[-3000:] if path and path.is_file() else ""

    def stop(self) -> None:
        """SIGTERM, wait for the exit (SIGKILL after 30 s), and remove the folder."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def postgres_program(name: str) -> str:
    """A PostgreSQL server program: Debian keeps them out of PATH, under /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    assert found, f"PostgreSQL's {name} is missing: `make test` installs Debian's postgresql package"
    return found


class Cluster:
    """A PostgreSQL cluster in a temporary folder on 127.0.0.1, owned by this test."""

    def __init__(self) -> None:
        # initdb refuses to run as root: the cluster then belongs to the `postgres` user.
        self.as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.root = Path(tempfile.mkdtemp(prefix="faceflow-postgres-"))
        self.root.chmod(0o755)
        if self.as_owner:
            shutil.chown(self.root, "postgres", "postgres")
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if k != "FACEFLOW_TEST_TAG"} | {"LC_ALL": "C.UTF-8"}

    def run(self, program: str, *arguments: str) -> str:
        result = subprocess.run(
            [*self.as_owner, postgres_program(program), *arguments], env=self.env, cwd=self.root,
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, f"{program} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def start(self) -> None:
        data = str(self.root / "data")
        self.run("initdb", "-D", data, "--auth=trust", "--username=postgres", "--encoding=UTF8", "--no-sync")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self.run("pg_ctl", "-D", data, "-l", str(self.root / "server.log"), "-o", options, "-w", "start")
        self.run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "prefect")

    def stop(self) -> None:
        if (self.root / "data" / "postmaster.pid").exists():
            self.run("pg_ctl", "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def query(self, sql: str) -> str:
        return self.run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", "prefect", "-tAc", sql).strip()

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/prefect"
