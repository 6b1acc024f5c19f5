"""`make ui` on PostgreSQL: a throwaway cluster from PostgreSQL's own initdb and pg_ctl, a deployment run on it."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from commands.server import free_port
from support import RunningUI, assert_no_process_left, run_deployment, wait_for_state


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


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    cluster = Cluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_make_ui_runs_a_deployment_on_postgresql(tmp_path: Path, data_file: Path, cluster: Cluster, tag: str) -> None:
    ui = RunningUI(tmp_path, tag, data_file, tmp_path / "home", PREFECT_API_DATABASE_CONNECTION_URL=cluster.url)
    config = {"train": {"epochs": 3}, "sample": {"n_samples": 4}, "output_dir": str(tmp_path / "outputs")}
    flow_run_id = run_deployment(ui.api_url, "on-demand", {"config": config})
    assert wait_for_state(ui.api_url, flow_run_id, {"Completed"}, timeout=600) == "Completed"
    assert cluster.query(f"select state_name from flow_run where id = '{flow_run_id}'") == "Completed"
    assert cluster.query("select count(*) from deployment") == "6"
    assert not (ui.home / "prefect.db").exists()  # nothing went to SQLite
    ui.ctrl_c()
    assert_no_process_left(tag)
