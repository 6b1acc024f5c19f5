"""Test session set-up: a private PREFECT_HOME and face store, no telemetry, the real data file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Before anything imports prefect: this session's database and result cache are its own (each pytest-xdist
# worker imports this file afresh, so each worker has its own).
_SESSION_HOME = tempfile.mkdtemp(prefix="faceflow-test-prefect-")
os.environ["PREFECT_HOME"] = _SESSION_HOME
# ... and so is its face store: tests never write faces/ in the repository.
_SESSION_FACES = tempfile.mkdtemp(prefix="faceflow-test-faces-")
os.environ["FACEFLOW_FACES_DIR"] = _SESSION_FACES
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.pop("PREFECT_API_URL", None)

import pytest  # noqa: E402

from commands.signals import answer_ctrl_c_again  # noqa: E402

answer_ctrl_c_again()  # tests send SIGINT as a terminal's Ctrl-C would

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data" / "olivettifaces.mat"


@pytest.fixture(scope="session")
def data_file() -> Path:
    """The real olivettifaces.mat: FACEFLOW_DATA_FILE, else ../shared/data/."""
    path = Path(os.environ.get("FACEFLOW_DATA_FILE") or SHARED_DATA)
    if not path.is_file():
        pytest.fail(f"the Olivetti data file is missing at {path}; set FACEFLOW_DATA_FILE")
    return path


@pytest.fixture(scope="session")
def faces(data_file: Path):
    from tasks.data import load_faces

    return load_faces(data_file)


@pytest.fixture(scope="session", autouse=True)
def _one_compute_thread():
    """As the pipeline does: small models on a shared 2-core machine run best on one thread."""
    from faceflow.threads import limited_threads

    with limited_threads(1):
        yield


@pytest.fixture(autouse=True)
def _events_sent_to_this_tests_server():
    """After each test, the logs and events Prefect holds in this process are sent and its senders stopped.

    Prefect keeps one events sender per process for any running server, bound to the API URL it first
    saw: without this, a test after one whose server has stopped would send its events to that dead
    server (a rollback's event never arrived, 2026-12-06). Draining here, while a module's server still
    runs, sends them where they belong; the next test's first event starts a sender for its own server.
    """
    yield
    from commands.runner import flush_to_api

    flush_to_api()  # nothing to send and no sender: returns at once


# Modules by their measured time, longest first (pytest --durations=0 on a loaded 2-core machine). With
# pytest-xdist (`make test` runs `-n 3 --dist loadscope --no-loadscope-reorder`) each module runs whole on
# one worker, in this order, so the longest start first and the short ones fill in behind them; modules not
# named here follow in pytest-randomly's order. Within a module the random order stands.
LONGEST_FIRST = [  # seconds per module measured 2026-12-06, 3 workers: 294, 269, 262, 258, 238, 206, 192, 129, ...
    "test_ui_stop.py", "test_rehearsal.py", "test_bad_input.py", "test_ui.py", "test_faults.py", "test_ui_walk.py",
    "test_pipeline.py", "test_security.py", "test_retrain.py", "test_server.py", "test_forget.py", "test_sweep.py",
    "test_promotion.py", "test_data.py", "test_registry.py", "test_security_services.py", "test_redis_locks.py",
    "test_erasure.py", "test_ingest.py", "test_signals.py", "test_train.py",
]


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest modules first (LONGEST_FIRST); a stable sort keeps pytest-randomly's order otherwise.

    Runs after pytest-randomly's shuffle (its hook is tryfirst), on every xdist worker alike: they share its seed.
    """
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The session's Prefect home (database, cached results) goes with the session.

    Under pytest-xdist every worker is a process of its own that imported this file: its own home and face
    store, removed when that worker's session ends.
    """
    import shutil

    shutil.rmtree(_SESSION_HOME, ignore_errors=True)
    shutil.rmtree(_SESSION_FACES, ignore_errors=True)


@pytest.fixture(scope="session")
def migrated_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PREFECT_HOME whose database is created and migrated once: a copy spares a test the ~10 s first start.

    Tests of first use itself start from an empty home instead.
    """
    import shutil

    from commands.server import LOG_FOLDER, local_server

    home = tmp_path_factory.mktemp("migrated-prefect-home")
    with local_server(home, timeout=300):
        pass
    shutil.rmtree(home / LOG_FOLDER, ignore_errors=True)
    return home


def copy_home(template: Path, destination: Path) -> Path:
    import shutil

    shutil.copytree(template, destination)
    return destination


@contextmanager
def reporting_server(migrated_home: Path, root: Path) -> Iterator:
    """A server on a copy of the migrated home under ``root``, which this process's flows report to until the
    block ends; their last logs and events are sent before it stops."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from commands.runner import flush_to_api
    from commands.server import local_server

    with local_server(copy_home(migrated_home, root / "home"), timeout=300) as running, \
            temporary_settings({PREFECT_API_URL: running.api_url}):
        try:
            yield running
        finally:
            flush_to_api()


@pytest.fixture
def prefect_home(tmp_path: Path, migrated_home: Path) -> Path:
    """This test's own PREFECT_HOME, its database already migrated."""
    return copy_home(migrated_home, tmp_path / "home")


@pytest.fixture
def tag() -> str:
    """A tag this test's processes carry in their environment; whatever still has it at the end is killed."""
    from support import kill_tagged, new_tag

    tag = new_tag()
    yield tag
    kill_tagged(tag)


@pytest.fixture
def redis_server():
    """A redis-server of this test's own on 127.0.0.1 (tests/services.py), stopped when the test ends."""
    from services import RedisServer

    with RedisServer() as server:
        yield server
