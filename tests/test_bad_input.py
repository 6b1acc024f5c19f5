"""Bad input is refused before any work, naming the field or file, writing nothing, leaving no process.

One table of cases, run through both entry points: `faceflow run` (the command line) and the
flow's own parameter validation (what a deployment run from the UI or a schedule goes through).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from commands.cli import config_fields, option_name
from commands.server import local_server
from conftest import copy_home
from support import assert_no_process_left, faceflow, tagged_env


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
    ("same-person interpolation", {"interpolate": {"index_a": 3, "index_b": 7}}, "both person 0"),
    ("index out of range", {"interpolate": {"index_b": 400}}, "interpolate.index_b"),
    ("negative index", {"interpolate": {"index_a": -1}}, "interpolate.index_a"),
    ("negative seed", {"seed": -1}, "seed"),
    ("no image left for training", {"data": {"heldout_per_person": 8, "validation_per_person": 2}}, "at least 1 of 10"),
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
        flush_to_api()  # the flows' last logs reach the server before it stops


@pytest.mark.parametrize("case", CASE_NAMES)
def test_the_flow_refuses_the_same_input_before_any_work(case: str, tmp_path: Path, data_file: Path, api_url: str) -> None:
    """A deployment hands the flow a parameter dict: the flow validates it, or its first step refuses the data."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pipeline import faceflow_pipeline

    values, named = all_cases(tmp_path, data_file)[case]
    outputs = tmp_path / "outputs"
    values = {"output_dir": str(outputs)} | values
    with temporary_settings({PREFECT_API_URL: api_url}):
        state = faceflow_pipeline(config=values, return_state=True)
    assert state.is_failed() and named in state.message, state.message
    assert not outputs.exists() or not any(outputs.iterdir())
