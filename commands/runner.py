"""Run the flow against a given server and summarise it from the run's own result."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.asyncutils import run_coro_as_sync

from artifacts.tables import json_safe
from faceflow.config import FaceflowConfig
from faceflow.sweeps import SweepSpec
from flows.pipeline import faceflow_pipeline


FLUSH_TIMEOUT = 10.0  # seconds each; a server that has gone away must not hold the command up


def flush_to_api() -> None:
    """Send the logs and events Prefect still holds in memory, before the server may stop.

    Best effort: after an interrupt it may fail, and it must not replace the error that ended
    the run (an interrupted run would otherwise exit with a flush error instead of 130).
    """

    async def drain() -> None:
        for drained in (APILogWorker.drain_all(timeout=FLUSH_TIMEOUT), EventsWorker.drain_all(timeout=FLUSH_TIMEOUT)):
            if inspect.isawaitable(drained):
                await drained

    try:
        run_coro_as_sync(drain())
    except Exception as error:
        print(f"warning: some Prefect logs or events were not sent: {error}", file=sys.stderr)


@contextmanager
def recorded_at(api_url: str) -> Iterator[None]:
    """Flows run inside are recorded by the server at ``api_url``, their logs and events all sent by the end."""
    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        try:
            yield
        finally:
            flush_to_api()


def run_pipeline(config: FaceflowConfig, api_url: str) -> dict[str, Any]:
    """Run the flow once, recorded by the server at ``api_url``; raise if it fails."""
    with recorded_at(api_url):
        state = faceflow_pipeline(config=config, return_state=True)
    result = state.result()  # raises the flow's exception if it failed
    return {
        "flow_run_id": str(state.state_details.flow_run_id),
        "output_dir": str(result.report.folder),
        "metrics": {name: json_safe(value) for name, value in result.report.metrics.items()},
        "tasks": result.task_states,
        "repaired": list(result.repairs),
    }


def run_sweep(
    spec: SweepSpec, api_url: str, dask_address: str | None, workers: int, promote: bool, margin: float
) -> dict[str, Any]:
    """Run the sweep flow once on Dask, recorded by the server at ``api_url``; raise if it fails."""
    from flows.sweep import faces_sweep, sweep_task_runner  # Dask loads only for a sweep

    with recorded_at(api_url):
        state = faces_sweep.with_options(task_runner=sweep_task_runner(dask_address, workers))(
            spec=spec, promote=promote, promotion_margin=margin, return_state=True
        )
    result = state.result()
    return {
        "flow_run_id": str(state.state_details.flow_run_id),
        "rows": [{k: json_safe(v) for k, v in row.items()} for row in result.rows],
        "executions": result.executions,
        "promotion": dataclasses.asdict(result.promotion) if result.promotion else None,
    }


def run_retrain(config: FaceflowConfig, api_url: str, margin: float) -> dict[str, Any]:
    """One retraining now (the weekly-retrain flow), recorded by the server at ``api_url``; raise if it fails."""
    from flows.retrain import faceflow_retrain

    with recorded_at(api_url):
        state = faceflow_retrain(config=config, promotion_margin=margin, return_state=True)
    result = state.result()
    return {
        "flow_run_id": str(state.state_details.flow_run_id),
        "promoted": result.promoted,
        "reason": result.reason,
        "challenger": {k: json_safe(v) for k, v in result.challenger.items()},
        "champion": result.champion,
    }
