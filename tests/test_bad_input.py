"""Bad input is refused before any work, naming the field or file, writing nothing, leaving no process.

One table of cases, run through every entry point: `faceflow run` (the command line), the flow
called with a parameter dict, and a deployment run created through the API as the UI's form does
(its JSON trip, the server's schema check, the worker). "Before any work" is read from the server:
the run has no task runs, or only the data-reading step, failed on its first attempt.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

import numpy as np
import pytest
import scipy.io

from commands.cli import config_fields, option_name
from commands.server import local_server
from faceflow.settings import faces_dir
from conftest import copy_home
from support import (
    RunningUI, assert_no_process_left, client, faceflow, kill_tagged, new_tag, run_deployment, store_snapshot, tagged_env,
    wait_for_state,
)


def _mat(path: Path, **variables: np.ndarray) -> Path:
    scipy.io.savemat(path, variables)
    return path


def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


def _folder(path: Path) -> Path:
    path.mkdir()
    return path


def _faces(fill: float | None = None, **changes: float) -> np.ndarray:
    pixels = np.random.default_rng(0).integers(0, 243, size=(4096, 400)).astype(np.float64)
    if fill is not None:
        pixels[:] = fill
    for position, value in changes.items():
        pixels.flat[int(position.removeprefix("at"))] = value
    return pixels


DATA_FILES: dict[str, Callable[[Path, Path], Path]] = {
    # name -> (temporary folder, the real data file) -> a bad data file
    "wrong variable name": lambda tmp, real: _mat(tmp / "renamed.mat", pixels=_faces()),
    "wrong shape": lambda tmp, real: _mat(tmp / "small.mat", faces=np.zeros((4096, 10))),
    "transposed": lambda tmp, real: _mat(tmp / "transposed.mat", faces=_faces().T),
    "NaN pixels": lambda tmp, real: _mat(tmp / "nan.mat", faces=_faces(at7=np.nan)),
    "inf pixels": lambda tmp, real: _mat(tmp / "inf.mat", faces=_faces(at7=np.inf)),
    "constant": lambda tmp, real: _mat(tmp / "constant.mat", faces=_faces(fill=128.0)),
    "text as faces": lambda tmp, real: _mat(tmp / "text.mat", faces=np.array(["not pixels"])),
    "empty file": lambda tmp, real: _write(tmp / "empty.mat", b""),
    "truncated file": lambda tmp, real: _write(tmp / "cut.mat", real.read_bytes()[:5000]),
    "text file": lambda tmp, real: _write(tmp / "notes.mat", b"faces go here\n"),
    "a directory": lambda tmp, real: _folder(tmp / "folder.mat"),
    "missing file": lambda tmp, real: tmp / "absent.mat",
}

# (name, config values, what the message must name)
BAD_CONFIGS: list[tuple[str, dict, str]] = [
    ("zero epochs", {"train": {"epochs": 0}}, "train.epochs"),
    ("negative epochs", {"train": {"epochs": -5}}, "train.epochs"),
    ("huge epochs", {"train": {"epochs": 10_000_000}}, "train.epochs"),
    ("NaN learning rate", {"train": {"learning_rate": float("nan")}}, "train.learning_rate"),
    ("variance 0", {"pca": {"variance": 0.0}}, "pca.variance"),
    ("variance 1.5", {"pca": {"variance": 1.5}}, "pca.variance"),
    ("batch size 0", {"train": {"batch_size": 0}}, "train.batch_size"),
    ("more components than fit faces", {"pca": {"n_components": 500}}, "pca.n_components"),
    ("temperature 0", {"sample": {"temperature": 0.0}}, "sample.temperature"),
    ("no samples", {"sample": {"n_samples": 0}}, "sample.n_samples"),
    ("same-person interpolation", {"interpolate": {"face_a": "olivetti-00:3", "face_b": "olivetti-00:7"}}, "both person olivetti-00"),
    ("image index past the person's images", {"interpolate": {"face_b": "olivetti-13:10"}}, "interpolate.face_b"),
    ("unknown person as endpoint", {"interpolate": {"face_a": "nobody:0"}}, "interpolate.face_a"),
    ("endpoint neither id nor person:index", {"interpolate": {"face_a": "face zero"}}, "interpolate.face_a"),
    ("image id that is in no version", {"interpolate": {"face_b": "abcdef0123"}}, "interpolate.face_b"),
    ("negative seed", {"seed": -1}, "seed"),
    ("no image left for training", {"data": {"heldout_fraction": 0.8, "validation_fraction": 0.2}}, "at least a tenth"),
    ("unknown faces version", {"data": {"faces_version": "99"}}, "data.faces_version"),
    ("faces version no id starts with", {"data": {"faces_version": "0123456789ab"}}, "data.faces_version"),
    ("too few people for the new-people folds", {"data": {"new_people_per_fold": 20, "new_people_folds": 2}}, "at least 42 are needed"),
]


def cli_arguments(values: dict) -> list[str]:
    """The `faceflow run` options that set ``values`` (a nested config dict)."""
    arguments = []
    for path, _ in config_fields():
        node = values
        for part in path:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if not isinstance(node, dict):
            arguments += [option_name(path), str(node)]
    return arguments


def all_cases(tmp_path: Path, data_file: Path) -> dict[str, tuple[dict, str]]:
    """Every case as (config values, text the message must contain), data files made in ``tmp_path``."""
    cases = {name: (values, named) for name, values, named in BAD_CONFIGS}
    for name, make in DATA_FILES.items():
        bad = make(tmp_path, data_file)
        assert isinstance(bad, Path), name
        cases[name] = ({"data": {"data_file": str(bad)}}, f"data file {str(bad)!r}")
    existing_file = tmp_path / "outputs-is-a-file"
    existing_file.write_text("in the way")
    cases["output path is a file"] = ({"output_dir": str(existing_file)}, f"output folder {str(existing_file)!r}")
    return cases


CASE_NAMES = [name for name, _, _ in BAD_CONFIGS] + list(DATA_FILES) + ["output path is a file"]


def test_the_table_has_at_least_twenty_cases() -> None:
    assert len(CASE_NAMES) >= 20 and len(set(CASE_NAMES)) == len(CASE_NAMES)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_the_command_line_refuses_bad_input_before_any_work(case: str, tmp_path: Path, data_file: Path, tag: str) -> None:
    values, named = all_cases(tmp_path, data_file)[case]
    outputs = tmp_path / "outputs"
    arguments = cli_arguments(values) + ([] if "output_dir" in values else ["--output-dir", str(outputs)])
    result = subprocess.run(
        faceflow("run", *arguments), env=tagged_env(tag, tmp_path / "home", FACEFLOW_DATA_FILE=str(data_file)),
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert named in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3  # one problem, said once
    assert not outputs.exists() and not (tmp_path / "home").exists()  # no output, no server, no database
    assert_no_process_left(tag, within=5)


@pytest.fixture(scope="module")
def api_url(tmp_path_factory: pytest.TempPathFactory, migrated_home: Path) -> str:
    from commands.runner import flush_to_api

    with local_server(copy_home(migrated_home, tmp_path_factory.mktemp("flow-validation") / "home"), timeout=300) as server:
        yield server.api_url
        # The flows' last logs reach the server before it stops: logs still queued for a stopped
        # server kept the test session from exiting ("Still processing items").
        flush_to_api()


# Data-file cases the flow's parameter validation passes (the file exists): fetch_faces reads and refuses them,
# as it refuses a faces version the store does not hold.
READ_BY_THE_FIRST_STEP = set(DATA_FILES) - {"a directory", "missing file"} | {"unknown faces version", "faces version no id starts with"}
# Cases that only the version can judge: fetch_faces reads it (no other step runs), then the flow refuses.
JUDGED_AGAINST_THE_VERSION = {
    "more components than fit faces", "same-person interpolation", "image index past the person's images",
    "unknown person as endpoint", "image id that is in no version", "too few people for the new-people folds",
}


def task_runs_of(api_url: str, flow_run_id: UUID) -> dict[str, tuple[str, int]]:
    """Task name -> (state, attempts) of every task run the server recorded for ``flow_run_id``."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with client(api_url) as prefect:
        runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: (run.state.name, run.run_count) for run in runs}


def assert_refused_before_any_work(case: str, api_url: str, flow_run_id: UUID) -> None:
    """The server's record of the run: no step ran, or only fetch_faces: failed on its only attempt (no retries),
    or completed for a case only the version can judge."""
    from commands.runner import flush_to_api

    flush_to_api()  # task runs reach the server as events
    expected = {"fetch_faces": ("Failed", 1)} if case in READ_BY_THE_FIRST_STEP else {}
    if case in JUDGED_AGAINST_THE_VERSION:
        expected = {"fetch_faces": ("Completed", 1)}
    deadline = time.monotonic() + 60
    # Until the server has recorded as many as expected (it records events as they arrive), then no more.
    while len(recorded := task_runs_of(api_url, flow_run_id)) < len(expected) and time.monotonic() < deadline:
        time.sleep(0.2)  # poll interval of the bounded wait (60 s) for the server to record the task runs
    assert recorded == expected, recorded


@pytest.mark.parametrize("case", CASE_NAMES)
def test_the_flow_refuses_the_same_input_before_any_work(case: str, tmp_path: Path, data_file: Path, api_url: str) -> None:
    """The flow called with a parameter dict validates it, or its first step refuses the data."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pipeline import faceflow_pipeline

    values, named = all_cases(tmp_path, data_file)[case]
    outputs = tmp_path / "outputs"
    values = {"output_dir": str(outputs)} | values
    with temporary_settings({PREFECT_API_URL: api_url}):
        state = faceflow_pipeline(config=values, return_state=True)
    assert state.is_failed() and named in state.message, state.message
    assert not outputs.exists() or not any(outputs.iterdir())
    assert_refused_before_any_work(case, api_url, state.state_details.flow_run_id)


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory, data_file: Path, migrated_home: Path) -> RunningUI:
    """`make ui`: server, deployments and a worker, for this module's deployment runs."""
    root, tag = tmp_path_factory.mktemp("deployment-validation"), new_tag()
    try:
        running = RunningUI(root, tag, data_file, copy_home(migrated_home, root / "home"))
        yield running
        running.ctrl_c()
        assert_no_process_left(tag)
    finally:
        kill_tagged(tag)


@pytest.fixture(scope="module")
def deployment_runs(ui: RunningUI, tmp_path_factory: pytest.TempPathFactory, data_file: Path) -> dict[str, tuple]:
    """Each deployment case's run (DEPLOYMENT_CASES), all created at once as the UI's Run button does: the worker runs them side by side.

    Case -> (its folder, what the message must name, the flow run id or the server's refusal).
    One after another, each waited for the worker's next poll and a process of its own: 3 minutes.
    """
    from prefect.exceptions import PrefectHTTPStatusError

    runs = {}
    for case in DEPLOYMENT_CASES:
        folder = tmp_path_factory.mktemp("deployment-case")
        values, named = all_cases(folder, data_file)[case]
        try:
            created = run_deployment(ui.api_url, "on-demand", {"config": {"output_dir": str(folder / "outputs")} | values})
        except PrefectHTTPStatusError as refused:
            created = refused
        runs[case] = (folder, named, created)
    return runs


# What the server's check of the form against the flow's schema must say: the full field path and the
# bound faceflow/config.py declares (in jsonschema's words). Every other case reaches the worker's run.
REFUSED_BY_THE_SCHEMA: dict[str, tuple[str, str]] = {
    "zero epochs": ("config.train.epochs", "0 is less than the minimum of 1"),
    "negative epochs": ("config.train.epochs", "-5 is less than the minimum of 1"),
    "huge epochs": ("config.train.epochs", "10000000 is greater than the maximum of 100000"),
    "NaN learning rate": ("config.train.learning_rate", "None is not of type 'number'"),  # JSON has no NaN: it travels as null
    "variance 0": ("config.pca.variance", "0.0 is less than or equal to the minimum of 0.0"),
    "variance 1.5": ("config.pca.variance", "1.5 is greater than the maximum of 1.0"),
    "batch size 0": ("config.train.batch_size", "0 is less than the minimum of 1"),
    "temperature 0": ("config.sample.temperature", "0.0 is less than or equal to the minimum of 0.0"),
    "no samples": ("config.sample.n_samples", "0 is less than the minimum of 1"),
    "endpoint neither id nor person:index": ("config.interpolate.face_a", "'face zero' does not match '^("),
    "negative seed": ("config.seed", "-1 is less than the minimum of 0"),
}


# Through a deployment: every case the form's schema refuses (the server answers at once), and one case of
# each route a refusal takes in the worker's run. Every one of those routes' cases goes through the flow
# called with a parameter dict above; each case here costs a flow-run process of its own.
WORKER_ROUTES = {
    "truncated file": "a data file fetch_faces reads and refuses",
    "unknown faces version": "a faces version fetch_faces looks up and refuses",
    "unknown person as endpoint": "judged against the version fetch_faces read",
    "missing file": "a data path the flow's validation refuses before any step",
    "no image left for training": "settings the flow's validation refuses together",
    "output path is a file": "an output folder the flow refuses before any step",
}
DEPLOYMENT_CASES = list(REFUSED_BY_THE_SCHEMA) + list(WORKER_ROUTES)


def test_the_deployment_cases_are_cases_of_the_table() -> None:
    assert set(DEPLOYMENT_CASES) <= set(CASE_NAMES) and not set(WORKER_ROUTES) & set(REFUSED_BY_THE_SCHEMA)


@pytest.mark.parametrize("case", DEPLOYMENT_CASES)
def test_a_deployment_run_refuses_the_same_input_before_any_work(case: str, deployment_runs: dict, ui: RunningUI) -> None:
    """As the UI's Run form sends it: the server refuses what the flow's schema forbids; the rest fails in the worker's run."""
    folder, named, created = deployment_runs[case]
    if isinstance(created, Exception):  # the server refused the form
        assert case in REFUSED_BY_THE_SCHEMA, created.response.text
        field, reason = REFUSED_BY_THE_SCHEMA[case]
        assert created.response.status_code == 409, created.response.text
        detail = created.response.json()["detail"]
        assert f"Validation failed for field '{field}'. Failure reason: {reason}" in detail, detail
        return
    assert case not in REFUSED_BY_THE_SCHEMA  # the form's schema forbids it: the server must not have taken it
    assert wait_for_state(ui.api_url, created, {"Failed"}, timeout=300) == "Failed"
    with client(ui.api_url) as prefect:
        message = prefect.read_flow_run(created).state.message
    assert named in message, message
    outputs = folder / "outputs"
    assert not outputs.exists() or not any(outputs.iterdir())
    assert_refused_before_any_work(case, ui.api_url, created)

# The ingest and forget deployments' forms, as the UI sends them: (deployment, flow, parameters, what the error names).
STORE_CASES = {
    "ingest of a missing folder": ("ingest", "faceflow-ingest", lambda tmp: {"path": str(tmp / "absent")}, "absent"),
    "ingest of an empty folder": ("ingest", "faceflow-ingest", lambda tmp: {"path": str(_folder(tmp / "empty"))}, "empty"),
    "ingest of a file that is not an image": (
        "ingest", "faceflow-ingest", lambda tmp: {"path": str(_write(_folder(_folder(tmp / "people") / "ann") / "x.png", b"not a png").parent.parent)},
        "x.png"),
    "forget of a person not there": ("forget", "faceflow-forget", lambda tmp: {"person": "nobody-here"}, "nobody-here"),
    "forget of an invalid label": ("forget", "faceflow-forget", lambda tmp: {"person": "../etc"}, "person"),
}


@pytest.mark.parametrize("case", list(STORE_CASES))
def test_ingest_and_forget_deployments_refuse_bad_input_naming_it_and_leave_the_store_unchanged(
    case: str, tmp_path: Path, ui: RunningUI
) -> None:
    from prefect.exceptions import PrefectHTTPStatusError

    deployment, flow, parameters, named = STORE_CASES[case]
    before = store_snapshot(faces_dir())
    try:
        flow_run_id = run_deployment(ui.api_url, deployment, parameters(tmp_path), flow=flow)
    except PrefectHTTPStatusError as refused:  # the form's schema: the server refuses it before any run
        assert refused.response.status_code in (409, 422) and named in refused.response.text, refused.response.text
    else:
        assert wait_for_state(ui.api_url, flow_run_id, {"Failed"}, timeout=300) == "Failed"
        with client(ui.api_url) as prefect:
            message = prefect.read_flow_run(flow_run_id).state.message
        assert named in message, message
    assert store_snapshot(faces_dir()) == before
