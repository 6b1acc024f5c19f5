"""Training progress, in the terminal (tqdm) and in the Prefect UI: a progress bar and a live loss curve."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from types import TracebackType

from tqdm import tqdm

from artifacts import figures
from artifacts.markdown import figure_markdown
from artifacts.publish import publish_markdown, start_progress, update_markdown, update_progress

# Each update is an API call: about 20 for the bar, and the curve no more often than this.
UPDATES_PER_RUN = 20
CURVE_SECONDS = 3.0
CURVE_TITLE = "RealNVP training: loss and validation"


class TrainingProgress:
    """Context manager fed one epoch's numbers at a time; never publishes per step."""

    def __init__(self, epochs: int, first_epoch: int = 1) -> None:
        self.epochs = epochs
        self.every = max(1, epochs // UPDATES_PER_RUN)
        self.train_loss: list[float] = []
        self.validation_log_prob: list[float] = []
        self.bar = tqdm(total=epochs, initial=first_epoch - 1, desc="train_realnvp", unit="epoch", file=sys.stderr, leave=False)
        self.bar_id = start_progress("faceflow-training", "RealNVP training, percent of epochs done")
        self.curve_id = publish_markdown(
            "faceflow-training-curve", f"### {CURVE_TITLE}\n\nstarting ...\n", "Training loss and validation log p, live"
        )
        self._curve_published = time.monotonic()

    def update(self, epoch: int, train_loss: float, validation_log_prob: float | None) -> None:
        self.bar.update(1)
        self.train_loss.append(train_loss)
        self.validation_log_prob.append(math.nan if validation_log_prob is None else validation_log_prob)
        postfix = {"loss": f"{train_loss:.2f}"}
        if validation_log_prob is not None:
            postfix["val_logp"] = f"{validation_log_prob:.2f}"
        self.bar.set_postfix(postfix, refresh=False)
        if epoch % self.every == 0 or epoch == self.epochs:
            update_progress(self.bar_id, 100.0 * epoch / self.epochs)
        if time.monotonic() - self._curve_published >= CURVE_SECONDS:
            self.publish_curve()

    def publish_curve(self, best_epoch: int | None = None) -> None:
        self._publish(self.train_loss, self.validation_log_prob, best_epoch)

    def finish(self, train_loss: Sequence[float], validation_log_prob: Sequence[float], best_epoch: int) -> None:
        """The whole training's curve (a resumed one's too), with the epoch whose weights were kept."""
        self._publish(train_loss, validation_log_prob, best_epoch)

    def _publish(self, train_loss: Sequence[float], validation_log_prob: Sequence[float], best_epoch: int | None) -> None:
        figure = figures.loss_curve(train_loss, validation_log_prob, best_epoch)
        caption = f"{len(train_loss)} of {self.epochs} epochs"
        update_markdown(self.curve_id, figure_markdown(CURVE_TITLE, figures.png_bytes(figure), caption))
        self._curve_published = time.monotonic()

    def __enter__(self) -> TrainingProgress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.bar.close()
