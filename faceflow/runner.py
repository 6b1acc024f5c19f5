"""Run the flow and summarise it: run id, output folder, metrics, each task's final state."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from artifacts.publish import json_safe
from faceflow.config import FaceflowConfig
from flows.pipeline import faceflow_pipeline


def task_states(flow_run_id: UUID) -> dict[str, str]:
    """Task name -> final state name ("Completed", "Cached", ...), from the Prefect API."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name if run.state else "Unknown" for run in runs}


def run_pipeline(config: FaceflowConfig) -> dict[str, Any]:
    """Run the flow once; raise if it fails."""
    state = faceflow_pipeline(config=config, return_state=True)
    result = state.result()  # raises the flow's exception if it failed
    flow_run_id = state.state_details.flow_run_id
    return {
        "flow_run_id": str(flow_run_id),
        "output_dir": str(result.folder),
        "metrics": {name: json_safe(value) for name, value in result.metrics.items()},
        "tasks": task_states(flow_run_id),
    }
