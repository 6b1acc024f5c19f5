"""The run's write-up: the numbers it is judged by, its figures, and its folder's files.

``build_report`` only computes; the report task writes the files and publishes the artifacts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from artifacts import figures
from artifacts.markdown import data_uri
from artifacts.report import FIGURES, comparison_table, conclusions, image_comparison_table, report_markdown
from artifacts.tables import json_safe
from tasks.results import (
    Baselines, FittedPCA, GeneratedFaces, Interpolation, NewPeople, ReportInputs, Scores, TrainedFlow,
)
from tasks.score import bits_per_dim


@dataclass(frozen=True)
class BuiltReport:
    """A run's report: its folder's files, the markdown the UI shows (figures embedded), its numbers."""

    files: dict[str, bytes]
    markdown: str
    comparison: pd.DataFrame  # PCA space
    image_comparison: pd.DataFrame  # image space (pixels)
    metrics: dict[str, float]


def run_metrics(
    trained: TrainedFlow, pca: FittedPCA, scores: Scores, samples: GeneratedFaces, baselines: Baselines,
    new_people: NewPeople,
) -> dict[str, float]:
    """Every number the run is judged by, flat, for the CLI, the artifacts and metrics.json."""
    heldout = scores.mean_log_prob("heldout")
    heldout_image = scores.mean_log_prob("heldout", image=True)
    closest_heldout = float(samples.heldout_nearest_train_distance.min())
    metrics = {
        "heldout_log_prob": heldout,
        "heldout_bits_per_dim": bits_per_dim(heldout, scores.dim),
        "heldout_nonfinite": float(scores.nonfinite("heldout")),
        "validation_log_prob": scores.mean_log_prob("validation"),
        "fit_log_prob": scores.mean_log_prob("fit"),
        "sample_log_prob": scores.mean_log_prob("sample"),
        "n_components": float(pca.n_components),
        "components_for_variance_target": float(pca.components_for_target),
        "variance_kept": pca.variance_kept,
        "epochs": float(len(trained.history)),
        "best_epoch": float(trained.best_epoch),
        "nonfinite_steps": float(trained.nonfinite_steps),
        "train_seconds": trained.seconds,
        "resumed_from_epoch": float(trained.resumed_from_epoch),
        "steps_per_second": trained.steps / trained.seconds if trained.seconds else 0.0,
        "sample_nearest_distance_median": float(np.median(samples.nearest_train_distance)),
        "heldout_nearest_distance_median": float(np.median(samples.heldout_nearest_train_distance)),
        "samples_closer_than_any_heldout": float((samples.nearest_train_distance < closest_heldout).mean()),
        "new_people_log_prob": new_people.flow_log_prob,
        "new_people_bits_per_dim": bits_per_dim(new_people.flow_log_prob, scores.dim),
        "new_people_count": float(len(new_people.person_flow_log_prob)),
        "new_people_folds": float(len(new_people.folds)),
        # Image space: log p of the 4096 pixels (PCA-space log p + the residual's under probabilistic PCA).
        "heldout_image_log_prob": heldout_image,
        "heldout_image_bits_per_pixel": bits_per_dim(heldout_image, scores.pixels),
        "validation_image_log_prob": scores.mean_log_prob("validation", image=True),
        "fit_image_log_prob": scores.mean_log_prob("fit", image=True),
        "new_people_image_log_prob": new_people.flow_image_log_prob,
        "new_people_image_bits_per_pixel": bits_per_dim(new_people.flow_image_log_prob, scores.pixels),
        "pca_residual_variance": pca.residual_variance,
    }
    for result in baselines.results:
        name = _metric_name(result.name)
        metrics[f"baseline_{name}_heldout_log_prob"] = result.heldout_log_prob
        metrics[f"baseline_{name}_heldout_image_log_prob"] = result.heldout_image_log_prob
        if result.name in new_people.folds[0].baseline_log_prob:
            metrics[f"baseline_{name}_new_people_log_prob"] = new_people.baseline_log_prob(result.name)
            metrics[f"baseline_{name}_new_people_image_log_prob"] = new_people.baseline_image_log_prob(result.name)
    return metrics


def _metric_name(method: str) -> str:
    return method.replace(" ", "_").lower()


def baseline_frame(baselines: Baselines, dim: int, new_people: NewPeople, pixels: int) -> pd.DataFrame:
    """One row per baseline; the lab recipe has no new-people figure (it is not retrained per fold)."""
    measured = new_people.folds[0].baseline_log_prob
    return pd.DataFrame(
        [
            {
                "method": r.name,
                "heldout_log_prob": r.heldout_log_prob,
                "new_people_log_prob": new_people.baseline_log_prob(r.name) if r.name in measured else float("nan"),
                "bits_per_dim": bits_per_dim(r.heldout_log_prob, dim),
                "train_seconds": r.train_seconds,
                "heldout_image_log_prob": r.heldout_image_log_prob,
                "new_people_image_log_prob": (
                    new_people.baseline_image_log_prob(r.name) if r.name in measured else float("nan")
                ),
                "bits_per_pixel": bits_per_dim(r.heldout_image_log_prob, pixels),
                "detail": r.detail,
            }
            for r in baselines.results
        ]
    )


def render_figures(
    trained: TrainedFlow, pca: FittedPCA, scores: Scores, samples: GeneratedFaces, interpolation: Interpolation
) -> dict[str, bytes]:
    """Figure name -> PNG bytes."""
    history = trained.history
    made = {
        "samples": figures.sample_grid(samples.images, samples.nearest_train_distance, samples.temperature),
        "variance": figures.explained_variance(
            pca.cumulative_variance, pca.variance_target, pca.components_for_target, pca.n_components
        ),
        "loss": figures.loss_curve(history.train_loss, history.validation_log_prob, trained.best_epoch),
        "log_prob": figures.log_prob_histogram({part: scores.of(part) for part in ("fit", "heldout", "sample")}),
        "interpolation": figures.interpolation_strip(
            interpolation.images, interpolation.method, interpolation.index_a, interpolation.index_b
        ),
    }
    return {name: figures.png_bytes(figure) for name, figure in made.items()}


def _csv(rows: list[dict] | dict[str, np.ndarray]) -> bytes:
    return pd.DataFrame(rows).to_csv(index=False).encode()


def build_report(run_name: str, inputs: ReportInputs) -> BuiltReport:
    """The report and every file of the run folder; ``inputs.config`` is recorded as config.json."""
    split, pca, trained, samples, scores = inputs.split, inputs.pca, inputs.trained, inputs.samples, inputs.scores
    interpolation, baselines, new_people, config = inputs.interpolation, inputs.baselines, inputs.new_people, inputs.config
    metrics = run_metrics(trained, pca, scores, samples, baselines, new_people)
    metrics["fit_faces"] = float(len(split.fit))
    metrics["people_fitted_whole"] = float(len(split.fitted_whole))
    baseline_table = baseline_frame(baselines, pca.n_components, new_people, pca.n_pixels)
    comparison = comparison_table(metrics, baseline_table)
    image_comparison = image_comparison_table(metrics, baseline_table)
    findings = conclusions(metrics, baseline_table)
    pngs = render_figures(trained, pca, scores, samples, interpolation)
    # The report names the faces version it was computed on (config.json holds the whole id).
    run_name = f"{run_name}, faces version {config.data.faces_version[:12]}"
    on_disk = report_markdown(metrics, comparison, findings, FIGURES, run_name, image_comparison)
    embedded = report_markdown(
        metrics, comparison, findings, {name: data_uri(png) for name, png in pngs.items()}, run_name, image_comparison
    )
    history = trained.history
    files = {FIGURES[name]: png for name, png in pngs.items()} | {
        "report.md": on_disk.encode(),
        "metrics.json": json.dumps({k: json_safe(v) for k, v in metrics.items()}, indent=1).encode(),
        "config.json": config.model_dump_json(indent=1).encode(),
        "split.json": split.to_json().encode(),
        "scores.csv": _csv(scores.rows()),
        "training_history.csv": _csv({
            "epoch": np.arange(1, len(history) + 1), "train_loss": history.train_loss,
            "validation_log_prob": history.validation_log_prob, "learning_rate": history.learning_rate,
        }),
        "pca.npz": pca.estimator,
        "model.pt": trained.checkpoint,
    }
    return BuiltReport(files, embedded, comparison, image_comparison, metrics)
