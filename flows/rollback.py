"""Roll back the champion from the UI: an earlier champion becomes current, the leaderboard says who and why."""

from __future__ import annotations

from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from pydantic import Field

from faceflow.settings import models_dir
from flows.retrain import publish_leaderboard
from tasks.registry import leaderboard
from tasks.steps import roll_back_champion


@flow(name="faceflow-rollback")
def faceflow_rollback(
    reason: Annotated[str, Field(min_length=1, description="Why: recorded on the leaderboard.")],
    to: Annotated[str | None, Field(description="The champion to make current: its folder name (or a prefix), or its "
                                                "flow run id; empty for the one promoted before the current one.")] = None,
) -> dict[str, Any]:
    """Make an earlier champion current again (`faceflow champion --history` lists them), as one registry transaction."""
    chosen, row = roll_back_champion(to or None, f"deployment run {flow_run.name or 'in-process'}", reason)
    publish_leaderboard(leaderboard(models_dir()), row["why"])  # the leaderboard, and the rollback's row as this run's decision
    get_run_logger().info(f"champion: {chosen.folder} (from {chosen.record.run_folder})")
    return {"folder": chosen.folder} | chosen.record.to_json()
