"""The run's write-up: metrics, figures, report.md and the saved model, published and written once."""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import torch
from prefect import task

from artifacts import figures
from artifacts.publish import json_safe, publish_artifacts
from artifacts.run_folder import write_run_folder
from artifacts.report import FIGURES, comparison_table, conclusions, report_markdown
from faceflow.caching import KEYED_INPUTS, content_key
from faceflow.config import FaceflowConfig
from tasks.baselines import Baselines
from tasks.data import Split
from tasks.generate import GeneratedFaces, Interpolation
from tasks.model import checkpoint_payload
from tasks.new_people import NewPeople
from tasks.pca import FittedPCA
from tasks.score import Scores, bits_per_dim
from tasks.train import TrainedFlow


@dataclass(frozen=True)
class RunReport:
    key: str
    folder: Path
    metrics: dict[str, float]


@dataclass(frozen=True)
class RenderedReport:
    """The report as the Prefect UI shows it: markdown with embedded figures, and the quality table."""

    markdown: str
    comparison: pd.DataFrame


def run_metrics(
    trained: TrainedFlow, pca: FittedPCA, scores: Scores, samples: GeneratedFaces, baselines: Baselines,
    new_people: NewPeople,
) -> dict[str, float]:
    """Every number the run is judged by, flat, for the CLI, the artifacts and metrics.json."""
    heldout = scores.mean_log_prob("heldout")
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
        "variance_kept": float(pca.cumulative_variance[pca.n_components - 1]),
        "epochs": float(len(trained.history)),
        "best_epoch": float(trained.best_epoch),
        "nonfinite_steps": float(trained.nonfinite_steps),
        "train_seconds": trained.seconds,
        "steps_per_second": trained.steps / trained.seconds if trained.seconds else 0.0,
        "sample_nearest_distance_median": float(np.median(samples.nearest_train_distance)),
        "heldout_nearest_distance_median": float(np.median(samples.heldout_nearest_train_distance)),
        "samples_closer_than_any_heldout": float((samples.nearest_train_distance < closest_heldout).mean()),
        "new_people_log_prob": new_people.flow_log_prob,
        "new_people_bits_per_dim": bits_per_dim(new_people.flow_log_prob, scores.dim),
        "new_people_count": float(len(new_people.person_flow_log_prob)),
        "new_people_folds": float(len(new_people.folds)),
    }
    for result in baselines.results:
        name = _metric_name(result.name)
        metrics[f"baseline_{name}_heldout_log_prob"] = result.heldout_log_prob
        if result.name in new_people.folds[0].baseline_log_prob:
            metrics[f"baseline_{name}_new_people_log_prob"] = new_people.baseline_log_prob(result.name)
    return metrics


def _metric_name(method: str) -> str:
    return method.replace(" ", "_").lower()


def baseline_frame(baselines: Baselines, dim: int, new_people: NewPeople) -> pd.DataFrame:
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
                "detail": r.detail,
            }
            for r in baselines.results
        ]
    )


def render_figures(
    trained: TrainedFlow, pca: FittedPCA, scores: Scores, samples: GeneratedFaces,
    interpolation: Interpolation, config: FaceflowConfig,
) -> dict[str, bytes]:
    """Figure name -> PNG bytes."""
    table = scores.table
    made = {
        "samples": figures.sample_grid(samples.images, samples.nearest_train_distance, config.sample.temperature),
        "variance": figures.explained_variance(
            pca.cumulative_variance, config.pca.variance, pca.components_for_target, pca.n_components
        ),
        "loss": figures.loss_curve(
            [s.train_loss for s in trained.history], [s.validation_log_prob for s in trained.history], trained.best_epoch
        ),
        "log_prob": figures.log_prob_histogram(
            {part: table.loc[table["part"] == part, "log_prob"].to_numpy() for part in ("fit", "heldout", "sample")}
        ),
        "interpolation": figures.interpolation_strip(
            interpolation.images, interpolation.method, interpolation.index_a, interpolation.index_b
        ),
    }
    return {name: figures.png_bytes(figure) for name, figure in made.items()}


def _joblib_bytes(value: object) -> bytes:
    buffer = io.BytesIO()
    joblib.dump(value, buffer)
    return buffer.getvalue()


def _checkpoint_bytes(trained: TrainedFlow) -> bytes:
    buffer = io.BytesIO()
    torch.save(checkpoint_payload(trained.state_dict, trained.spec, trained.config), buffer)
    return buffer.getvalue()


def write_report(
    run_folder: Path, split: Split, pca: FittedPCA, trained: TrainedFlow, samples: GeneratedFaces,
    scores: Scores, interpolation: Interpolation, baselines: Baselines, new_people: NewPeople, config: FaceflowConfig,
) -> tuple[RunReport, RenderedReport]:
    """Build the report and write the run folder; returns what the artifacts show."""
    metrics = run_metrics(trained, pca, scores, samples, baselines, new_people)
    baseline_table = baseline_frame(baselines, pca.n_components, new_people)
    comparison = comparison_table(metrics, baseline_table)
    findings = conclusions(metrics, baseline_table)
    pngs = render_figures(trained, pca, scores, samples, interpolation, config)
    on_disk = report_markdown(metrics, comparison, findings, FIGURES, run_folder.name)
    embedded = report_markdown(
        metrics, comparison, findings, {name: figures.data_uri(png) for name, png in pngs.items()}, run_folder.name
    )
    files = {FIGURES[name]: png for name, png in pngs.items()} | {
        "report.md": on_disk.encode(),
        "metrics.json": json.dumps({k: json_safe(v) for k, v in metrics.items()}, indent=1).encode(),
        "config.json": config.model_dump_json(indent=1).encode(),
        "split.json": split.to_json().encode(),
        "scores.csv": scores.table.to_csv(index=False).encode(),
        "training_history.csv": pd.DataFrame([asdict(s) for s in trained.history]).to_csv(index=False).encode(),
        "pca.joblib": _joblib_bytes(pca.pca),
        "model.pt": _checkpoint_bytes(trained),
    }
    write_run_folder(run_folder, files)
    result = RunReport(
        content_key("report", run_folder, trained, samples, scores, interpolation, baselines, new_people), run_folder, metrics
    )
    return result, RenderedReport(embedded, comparison)


@task(name="report", cache_policy=KEYED_INPUTS, persist_result=True)
def report(
    run_folder: Path, split: Split, pca: FittedPCA, trained: TrainedFlow, samples: GeneratedFaces,
    scores: Scores, interpolation: Interpolation, baselines: Baselines, new_people: NewPeople, config: FaceflowConfig,
) -> RunReport:
    """report.md with figures, artifacts in Prefect, and the model files in the run folder."""
    result, rendered = write_report(
        run_folder, split, pca, trained, samples, scores, interpolation, baselines, new_people, config
    )
    publish_artifacts(rendered.markdown, rendered.comparison, scores.table, result.metrics)
    return result
