"""Publishing to Prefect: the run's artifacts."""

from __future__ import annotations

import math

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
