"""Scheduled retraining: a challenger is trained and replaces the champion only if it is better on validation faces."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from prefect import flow, get_run_logger, tags
from prefect.runtime import flow_run
from pydantic import Field

from artifacts.publish import publish_markdown
from artifacts.rankings import leaderboard_markdown
from faceflow.interrupts import defer_during_imports
from faceflow.confinement import confine_forms
from faceflow.config import RETRAIN_VALIDATION_FRACTION, DataConfig, FaceflowConfig
from faceflow.keys import content_key
from faceflow.serializer import RESULTS, allow_stored
from faceflow.settings import faces_dir, models_dir
from flows.pipeline import PipelineResult, faceflow_pipeline
from tasks.champion import (
    ChampionFolder, ChampionRecord, Decision, append_leaderboard, decide, now_utc, pause_point, resolve_champion,
    unseen_by_champion, validation_image_log_prob,
)
from tasks.data import version_pixels
from tasks.forgetting import stale_reason
from tasks.registry import leaderboard
from tasks.steps import promote_champion, score_champion
from tasks.store import FaceStore

RETRAIN_CONFIG = FaceflowConfig(data=DataConfig(validation_fraction=RETRAIN_VALIDATION_FRACTION))
# How often a challenger is judged again when another promotion replaced the champion it was judged
# against; then it is recorded as superseded. Each judging scores one champion on a few dozen faces.
JUDGINGS = 3


@dataclass(frozen=True)
class RetrainResult:
    promoted: bool
    reason: str
    challenger: dict[str, object]  # its leaderboard row
    champion: dict[str, object] | None  # the champion after this run


def seed_for(scheduled: datetime.datetime, flow_run_id: str) -> int:
    """A model seed from the run's scheduled time and its flow run id: each run a fresh one (two scheduled in the
    same second too), a retried run (the same flow run) the same."""
    digest = hashlib.sha256(f"{scheduled.isoformat()} {flow_run_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1  # below 2**31: every seed consumer takes it


def _leaderboard_row(source: str, seed: int, result: PipelineResult | None, error: str | None) -> dict:
    metrics = result.report.metrics if result else {}
    version = result.config.data.faces_version if result and result.config else None
    return {
        "time": now_utc(), "challenger": source, "seed": seed, "faces version": version,
        "validation log p": metrics.get("validation_log_prob"), "held-out log p": metrics.get("heldout_log_prob"),
        "promoted": False, "why": error or "", "run folder": str(result.report.folder) if result else None, "flow run": str(flow_run.id),
    }


allow_stored(RetrainResult)  # its persisted result is read back without pickle


@flow(name="faceflow-retrain", persist_result=True, **RESULTS)
def faceflow_retrain(
    config: FaceflowConfig = RETRAIN_CONFIG,
    promotion_margin: Annotated[
        float, Field(ge=0.0, le=100.0, description="Nats of validation log p a challenger must gain to replace the champion.")
    ] = 0.5,
) -> RetrainResult:
    """Train a challenger with a seed from the scheduled time; promote it only on validation log p."""
    defer_during_imports()  # a Ctrl-C or SIGTERM mid-import is taken after it (faceflow.interrupts)
    (config,) = confine_forms([config])  # from a deployment: output_dir and the data file inside their folders
    scheduled = flow_run.scheduled_start_time or datetime.datetime.now(datetime.timezone.utc)
    seed = seed_for(scheduled, str(flow_run.id))
    return challenge(config, promotion_margin, seed, source=f"scheduled {scheduled.isoformat(timespec='seconds')}")


def challenge(config: FaceflowConfig, margin: float, seed: int, source: str) -> RetrainResult:
    """Run the pipeline for ``config`` with ``seed`` as a challenger; promote it if it beats the champion on validation.

    Both are scored on the same faces: this run's validation faces that the champion was not fitted
    on, by the log p of their pixels (image space), so champions of other PCA bases compare fairly;
    held-out faces decide nothing. Every challenger gets a leaderboard row, with the count of faces judged
    and the champion folder it was judged against. The promotion goes ahead only if that folder is
    still the champion (compare and swap, under the registry's lock); if another promotion replaced
    it meanwhile, the challenger is judged again against the new one (``JUDGINGS`` times at most, then
    recorded as superseded): never promoted over a champion it was not compared with.
    """
    if config.data.validation_fraction <= 0:
        raise ValueError("promotion compares validation log p: config.data.validation_fraction must be above 0")
    models = models_dir()
    # The sub-flow carries the run's tags (the deployment's `faceflow`), so its events match the
    # crash automation (commands/alerts.py): killed with its parent, it is marked Crashed too.
    with tags(*(flow_run.tags or ())):
        state = faceflow_pipeline(config=config.model_copy(update={"seed": seed}), return_state=True)
    if state.is_failed() or state.is_crashed():
        row = _leaderboard_row(source, seed, None, f"challenger failed: {state.message}")
        publish_leaderboard(append_leaderboard(models, row), row["why"])
        state.result()  # raises: a failed challenger fails the run that offered it
    challenger: PipelineResult = state.result()
    ran = challenger.config or config  # data.faces_version resolved to the id the challenger ran on
    record = ChampionRecord(
        run_folder=str(challenger.report.folder), flow_run_id=str(state.state_details.flow_run_id), seed=seed,
        config_digest=content_key(config.model_copy(update={"seed": seed, "output_dir": Path(".")})),
        validation_log_prob=challenger.report.metrics["validation_log_prob"],
        heldout_log_prob=challenger.report.metrics["heldout_log_prob"], promoted_at="",
        metrics=challenger.report.metrics, faces_version=ran.data.faces_version,
    )
    logger = get_run_logger()
    for judging in range(1, JUDGINGS + 1):
        # One read: the champion's link resolved once; its record, split and model all come from that folder.
        champion = resolve_champion(models)
        decision, row = judge(challenger, ran, champion, margin, _leaderboard_row(source, seed, challenger, None))
        if not decision.promote:
            publish_leaderboard(append_leaderboard(models, row), decision.reason)
            logger.info(f"kept the champion: {decision.reason}")
            return RetrainResult(False, decision.reason, row, champion.record.to_json() if champion else None)
        pause_point("judged")  # test-only: another promotion may land here
        promoted_at = dataclasses.replace(record, promoted_at=now_utc())
        # Compare and swap: promoted only if the champion is still the one judged against.
        done = promote_champion(challenger.report.folder, promoted_at, row, models, champion.name if champion else None)
        if done.folder is not None:
            publish_leaderboard(leaderboard(models), decision.reason)
            logger.info(f"promoted: {decision.reason}")
            return RetrainResult(True, decision.reason, row, promoted_at.to_json())
        logger.info(f"the champion changed from {champion.name if champion else '(none)'} to {done.moved_to} while "
                    f"this challenger was judged (judging {judging} of {JUDGINGS}): judged again against it")
    reason = f"superseded: the champion changed {JUDGINGS} times while this challenger was judged; not promoted"
    row |= {"promoted": False, "why": reason}
    publish_leaderboard(append_leaderboard(models, row), reason)
    logger.info(reason)
    current = resolve_champion(models)
    return RetrainResult(False, reason, row, current.record.to_json() if current else None)


def judge(challenger: PipelineResult, ran: FaceflowConfig, champion: ChampionFolder | None, margin: float,
          row: dict[str, object]) -> tuple[Decision, dict[str, object]]:
    """The decision on ``challenger`` against ``champion`` (resolved once), and the challenger's leaderboard row.

    Judged in image space (the pixels' log p), so models of different PCA bases compare, on the
    challenger's validation faces that the champion was not fitted on either.
    """
    judged = list(challenger.validation)
    champion_validation = None
    # A champion fitted on faces of a person since forgotten may not be used: not scored, replaced.
    stale = stale_reason(FaceStore(faces_dir()), champion.record.faces_version) if champion is not None else None
    if champion is not None and not stale:
        judged = unseen_by_champion(champion.path, judged, challenger.validation_ids)
        champion_validation = score_champion(champion.path, version_pixels(ran.data.faces_version, judged)) if judged else None
    challenger_validation = validation_image_log_prob(challenger.report.folder, judged) if judged else None
    finite = challenger_validation is not None and math.isfinite(challenger_validation)
    if stale and finite:
        decision = Decision(True, f"the champion is stale ({stale}): replaced whatever the margin")
    elif champion is not None and judged and champion_validation is None and finite:
        decision = Decision(True, "the champion has no image-space figures (promoted before they existed): replaced")
    else:
        decision = decide(math.nan if challenger_validation is None else challenger_validation, champion_validation, margin,
                          faces=len(judged))
    return decision, row | {
        "faces judged": len(judged), "validation pixels": challenger_validation, "champion pixels": champion_validation,
        "judged against": champion.name if champion else None, "promoted": decision.promote, "why": decision.reason,
    }


def publish_leaderboard(rows: list[dict[str, object]], reason: str) -> None:
    """The leaderboard (every challenger, newest first) and this run's decision (or rollback), as artifacts."""
    # Markdown, not a table artifact: a table with the free text (challenger, why, run folder)
    # ran past the UI's artifact panel; the text goes in a list below a table of numbers.
    publish_markdown("faceflow-leaderboard", leaderboard_markdown(rows),
                     "Every challenger, newest first: its log p, promoted or not, and why")
    publish_markdown("faceflow-decision", f"### Retraining decision\n\n{reason}\n", "Why this run's challenger was promoted or not")
