"""Training progress, shown in the terminal (tqdm) and in the Prefect UI (a progress artifact)."""

from __future__ import annotations

import sys
from types import TracebackType

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from tqdm import tqdm

from tasks.train import EpochStats

# Updating the artifact costs an API call; about 20 updates per run is smooth enough.
UPDATES_PER_RUN = 20


class TrainingProgress:
    """Context manager fed one EpochStats per epoch."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs
        self.every = max(1, epochs // UPDATES_PER_RUN)
        self.bar = tqdm(total=epochs, desc="train_realnvp", unit="epoch", file=sys.stderr, leave=False)
        self.artifact_id = create_progress_artifact(
            0.0, key="faceflow-training", description="RealNVP training, percent of epochs done"
        )

    def update(self, stats: EpochStats) -> None:
        self.bar.update(1)
        postfix = {"loss": f"{stats.train_loss:.2f}"}
        if stats.validation_log_prob is not None:
            postfix["val_logp"] = f"{stats.validation_log_prob:.2f}"
        self.bar.set_postfix(postfix, refresh=False)
        if stats.epoch % self.every == 0 or stats.epoch == stats.epochs:
            update_progress_artifact(self.artifact_id, 100.0 * stats.epoch / stats.epochs)

    def __enter__(self) -> TrainingProgress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.bar.close()
