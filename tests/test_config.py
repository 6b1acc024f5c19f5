"""Bad input is refused before any work starts, naming the field and what is allowed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from commands.cli import config_fields, option_name
from faceflow.config import FaceflowConfig

BAD_VALUES = [
    ({"train": {"epochs": 0}}, "train.epochs", "greater than or equal to 1"),
    ({"pca": {"variance": 0.0}}, "pca.variance", "greater than 0"),
    ({"pca": {"variance": 1.5}}, "pca.variance", "less than or equal to 1"),
    ({"train": {"batch_size": 0}}, "train.batch_size", "greater than or equal to 1"),
    ({"pca": {"n_components": 31}}, "pca.n_components", "must be even"),
    ({"interpolate": {"face_a": "olivetti-00:0", "face_b": "olivetti-00:0"}}, "interpolate", "two different people"),
    ({"interpolate": {"face_b": "person 13"}}, "interpolate.face_b", "should match pattern"),
    ({"data": {"faces_version": ""}}, "data.faces_version", "at least 1 character"),
    ({"sample": {"temperature": 0.0}}, "sample.temperature", "greater than 0"),
    ({"sample": {"temperature": 1.5}}, "sample.temperature", "less than or equal to 1"),
    ({"data": {"heldout_fraction": 0.8, "validation_fraction": 0.2}}, "data", "at least a tenth"),
    ({"data": {"heldout_fraction": 0.0}}, "data.heldout_fraction", "greater than 0"),
    ({"data": {"split_seed": 1.5}}, "data.split_seed", "integer"),
]


@pytest.mark.parametrize(("values", "field", "allowed"), BAD_VALUES)
def test_bad_values_are_rejected_with_field_and_range(values: dict, field: str, allowed: str) -> None:
    with pytest.raises(ValidationError) as caught:
        FaceflowConfig.model_validate(values)
    message = str(caught.value)
    location = ".".join(str(p) for p in caught.value.errors()[0]["loc"])
    assert field == location or field in message
    assert allowed in message


def test_missing_data_file_is_rejected_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="absent.mat"):
        FaceflowConfig.model_validate({"data": {"data_file": str(tmp_path / "absent.mat")}})


def test_every_field_has_a_unique_option_and_a_description() -> None:
    names = [option_name(path) for path, _ in config_fields()]
    assert len(names) == len(set(names))
    assert {"--epochs", "--batch-size", "--seed", "--data-file", "--output-dir"} <= set(names)
    assert all(info.description for _, info in config_fields())


def _cli(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "commands.cli", *arguments], cwd=cwd, capture_output=True, text=True, timeout=120,
        env=os.environ | {"COLUMNS": "200"},
    )


def test_cli_help_lists_every_option_with_defaults(tmp_path: Path) -> None:
    result = _cli("run", "--help", cwd=tmp_path)
    assert result.returncode == 0
    for path, _ in config_fields():
        assert option_name(path) in result.stdout
    assert f"default: ({FaceflowConfig().train.epochs})" in result.stdout


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--epochs", "0"], "train.epochs (--epochs): Input should be greater than or equal to 1"),
        (["--variance", "1.5"], "pca.variance (--variance): Input should be less than or equal to 1"),
        (["--face-a", "olivetti-03:0", "--face-b", "olivetti-03:5"], "both person olivetti-03"),
        (["--face-b", "olivetti-03:10"], "interpolate.face_b: olivetti-03 has 10 images"),
        (["--face-a", "nobody:0"], "interpolate.face_a: no person 'nobody'"),
        (["--faces-version", "99"], "data.faces_version: faces version '99' is not a version"),
        (["--n-components", "500"], "pca.n_components (500) exceeds what the data allows"),
    ],
)
def test_cli_rejects_bad_input_before_any_work(tmp_path: Path, arguments: list[str], expected: str) -> None:
    output = tmp_path / "out"
    result = _cli("run", "--output-dir", str(output), *arguments, cwd=tmp_path)
    assert result.returncode == 2
    assert expected in result.stderr
    assert not output.exists()


def test_cli_options_reach_the_config_tree(tmp_path: Path) -> None:
    import json

    result = _cli("show-config", "--no-round-to-power-of-two", "--epochs", "5", "--temperature", "0.5",
                  "--method", "linear", "--include-lab-recipe", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert config["pca"]["round_to_power_of_two"] is False and config["train"]["epochs"] == 5
    assert config["sample"]["temperature"] == 0.5 and config["interpolate"]["method"] == "linear"
    assert config["baselines"]["include_lab_recipe"] is True
    assert config["data"]["split_seed"] == 0  # untouched fields keep their defaults
