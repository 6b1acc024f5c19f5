"""Publishing to Prefect (artifacts) and to disk (the run folder), atomically."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
from prefect.artifacts import create_markdown_artifact, create_table_artifact


def json_safe(value: object) -> object:
    """Non-finite numbers as strings: JSON has no -inf, and the UI should still show it."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _records(frame: pd.DataFrame) -> list[dict]:
    return [{k: json_safe(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


def publish_artifacts(markdown: str, comparison: pd.DataFrame, scores: pd.DataFrame, metrics: dict[str, float]) -> None:
    """The report, the quality comparison, per-face scores and the run's metrics as Prefect artifacts."""
    create_markdown_artifact(markdown, key="faceflow-report", description="faceflow run report")
    create_table_artifact(_records(comparison), key="faceflow-quality", description="Held-out log p: flow vs baselines")
    create_table_artifact(_records(scores), key="faceflow-scores", description="log p per scored face (nats)")
    create_table_artifact(
        _records(pd.DataFrame({"metric": list(metrics), "value": list(metrics.values())})),
        key="faceflow-metrics",
        description="Run metrics",
    )


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_run_folder(destination: Path, files: dict[str, bytes]) -> Path:
    """Write every file into a hidden sibling folder, then swap it into place in one rename.

    A failure part-way leaves no half-written run folder behind.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".partial"))
    staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would hide the report from other users
    try:
        for name, content in files.items():
            (staging / name).write_bytes(content)
        if destination.exists():
            retired = destination.with_name(f".{destination.name}.old-{os.getpid()}")
            os.replace(destination, retired)
            os.replace(staging, destination)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination
