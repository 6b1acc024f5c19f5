"""Real services for tests, started and stopped by the test that needs them: a Redis server, a PostgreSQL cluster,
and the TLS files a Dask scheduler and its clients use."""

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
    ``env`` is its environment (default: this process's), e.g. a test's tagged one; with
    ``password`` it requires it (``requirepass``) and ``url`` carries it.
    """

    def __init__(self, env: dict[str, str] | None = None, start_timeout: float = 30.0, password: str | None = None) -> None:
        self.env = env
        self.password = password
        self.start_timeout = start_timeout
        self.port = 0
        self.folder: Path | None = None
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """redis://[:password@]127.0.0.1:<port>/0 (a database number may be appended in place of /0 by the caller)."""
        return f"redis://{':' + self.password + '@' if self.password else ''}{HOST}:{self.port}/0"

    def start(self) -> RedisServer:
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError("redis-server is not installed (make system-packages installs it)")
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="faceflow-test-redis-"))
        with (self.folder / "redis.log").open("wb") as log:
            self.process = subprocess.Popen(
                [executable, "--bind", HOST, "--port", str(self.port), "--dir", str(self.folder), "--save", "",
                 "--appendonly", "no", "--daemonize", "no", *(["--requirepass", self.password] if self.password else [])],
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
        """Whether the server answers PING with PONG (RESP, over a plain socket; authenticated first with a password)."""
        try:
            with socket.create_connection((HOST, self.port), timeout=1.0) as connection:
                if self.password:
                    connection.sendall(f"AUTH {self.password}\r\n".encode())
                    if not connection.recv(64).startswith(b"+OK"):
                        return False
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


def make_tls_files(folder: Path, names: tuple[str, ...] = ("scheduler", "worker", "client")) -> dict[str, Path]:
    """A certificate authority and, for each of ``names``, a certificate it signed for 127.0.0.1 and its key (PEM).

    Returns {"ca": ca.pem, "<name>-cert": ..., "<name>-key": ...}; keys are readable by their owner only.
    """
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key, issuer: str, issuer_key, authority: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=authority, path_length=None), critical=True))
        if not authority:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(path: Path, data: bytes, private: bool = False) -> Path:
        path.write_bytes(data)
        if private:
            path.chmod(0o600)
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("faceflow test CA", ca_key, "faceflow test CA", ca_key, authority=True)
    files = {"ca": write(folder / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))}
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        files[f"{name}-cert"] = write(folder / f"{name}.pem", certificate(name, key, "faceflow test CA", ca_key, False)
                                      .public_bytes(serialization.Encoding.PEM))
        files[f"{name}-key"] = write(folder / f"{name}.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), private=True)
    return files


def dask_tls_arguments(files: dict[str, Path], name: str) -> list[str]:
    """``dask scheduler``/``dask worker`` options for TLS with ``name``'s certificate (docs/operations.md)."""
    return ["--tls-ca-file", str(files["ca"]), "--tls-cert", str(files[f"{name}-cert"]), "--tls-key", str(files[f"{name}-key"])]


def dask_tls_env(files: dict[str, Path], name: str) -> dict[str, str]:
    """FACEFLOW_DASK_TLS_CA/CERT/KEY for ``name``'s certificate."""
    return {"FACEFLOW_DASK_TLS_CA": str(files["ca"]), "FACEFLOW_DASK_TLS_CERT": str(files[f"{name}-cert"]),
            "FACEFLOW_DASK_TLS_KEY": str(files[f"{name}-key"])}
