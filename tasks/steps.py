"""The pipeline's steps as Prefect tasks: thin wrappers over the logic in tasks/*.py.

Each task is cached on the content keys of its inputs (faceflow.caching), persists its
result, and publishes its own artifact when it computes. A task imports its logic, and with
it torch, scikit-learn and matplotlib, only when it computes: a run whose every step is
cached loads plain results (tasks.results) and needs none of them, which took a cached
re-run from about 5.5 s to about 2 s (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.runtime import flow_run
from prefect.states import State

from artifacts.publish import publish_figure, publish_markdown, publish_table
from faceflow.caching import KEYED_INPUTS, cache_key, checkpoint_folder
from faceflow.config import BaselineConfig, DataConfig, InterpolateConfig, PCAConfig, SampleConfig, TrainConfig
from faceflow.keys import content_key
from faceflow.serializer import RESULTS
from faceflow.settings import checkpoint_seconds, faces_dir, models_dir
from tasks.champion import CHAMPION_VARIABLE, ChampionRecord
from tasks.registry import Champion, Promotion, promote, rollback
from tasks.results import (
    Baselines, FaceBatches, Faces, FittedPCA, GeneratedFaces, Interpolation, ModelScore, NewPeople, ReportInputs, RunReport,
    Scores, Split, TrainedFlow,
)

# Results are stored as arrays and JSON and read back without pickle (faceflow.serializer).
STEP = {"cache_policy": KEYED_INPUTS, "persist_result": True, **RESULTS}

# Flow runs that have failed or been interrupted: their steps still running in other threads
# stop at their next epoch, or the flow would wait for them before it could end.
_STOPPING: set[str] = set()


def stop_steps_of(flow_run_id: str) -> None:
    """Ask the steps of this flow run that run in other threads to stop."""
    _STOPPING.add(flow_run_id)


def _stop_requested() -> Callable[[], bool]:
    flow_run_id = str(flow_run.id)
    return lambda: flow_run_id in _STOPPING


def _is_network_failure(task: object, task_run: TaskRun, state: State) -> bool:
    """Retry only what a retry can fix: a failed download."""
    from tasks.data import DataUnavailableError

    try:
        state.result()
    except DataUnavailableError:
        return True
    except Exception:
        return False
    return False


@task(name="fetch_faces", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_is_network_failure,
      cache_policy=NO_CACHE, persist_result=False)
def fetch_faces(data_file: Path | None, faces_version: str) -> Faces:
    """The faces of version ``faces_version`` of the face store; on first use version 1 is the Olivetti faces.

    Not cached: "latest" names another version after an ingest. Reading a version is a few
    ``np.load`` calls, and the faces' key (from the version id) keys every step after it.
    """
    from tasks.data import open_faces

    faces = open_faces(data_file, faces_version)
    # One row per item, not one wide row: the ids then fit the UI's artifact panel.
    publish_table("faceflow-data", [
        {"item": item, "value": value} for item, value in (
            ("faces version", faces.version_number), ("version id", faces.version),
            ("faces", len(faces.images)), ("people", len(faces.people)), ("image", "64 x 64"), ("source", faces.source),
        )
    ], "The faces this run read")
    return faces


@task(name="split_faces", **STEP)
def split_faces(faces: Faces, config: DataConfig) -> Split:
    """Each image's part from a hash of the split seed and its id: stable when images are added."""
    from tasks.data import split_indices

    split = split_indices(faces, config)
    people = len(faces.people)
    publish_table("faceflow-split", [
        {"part": part, "images": len(index), "per person": len(index) / people, "seen by": seen}
        for part, index, seen in (
            ("fit", split.fit, "PCA and flow"), ("validation", split.validation, "early stopping only"),
            ("held-out", split.heldout, "the report only"),
        )
    ], f"Split seed {config.split_seed}, faces version {faces.version_number}; "
       f"{len(split.fitted_whole)} people with too few images to split are fitted on whole"
       + (f" ({', '.join(split.fitted_whole[:10])})" if split.fitted_whole else ""))
    return split


@task(name="fit_pca", **STEP)
def fit_pca(faces: Faces, split: Split, config: PCAConfig) -> FittedPCA:
    """PCA keeping about the target variance, rounded to a power of two."""
    from artifacts import figures
    from tasks.pca import fit_pca_on, pca_rule

    pca = fit_pca_on(faces, split, config)
    figure = figures.explained_variance(pca.cumulative_variance, pca.variance_target, pca.components_for_target, pca.n_components)
    publish_figure("faceflow-pca", "PCA: cumulative explained variance", figures.png_bytes(figure),
                   "Components kept and why", pca_rule(pca, config)
                   + f" Residual variance (image-space log p's noise model): {pca.residual_variance:.3g} per pixel.")
    return pca


@task(name="build_dataloader", **STEP)
def build_dataloader(pca: FittedPCA, split: Split, config: TrainConfig, seed: int) -> FaceBatches:
    """Shuffled, seeded batches of the fit faces' PCA coordinates, and their mirror images' (train.mirror)."""
    from tasks.train import make_batches

    batches = make_batches(pca, split, config, seed)
    publish_table("faceflow-dataloader", [{
        "fit faces": len(split.fit), "mirror images": len(batches.fit) - len(split.fit), "batch size": batches.batch_size, "batches per epoch": batches.batches_per_epoch,
        "validation faces": len(batches.validation), "dimensions": pca.n_components, "shuffle seed": seed,
    }], "What each training epoch iterates")
    return batches


@task(name="train_realnvp", **STEP)
def train_realnvp(batches: FaceBatches, config: TrainConfig, seed: int, device: str) -> TrainedFlow:
    """RealNVP by maximum likelihood, with a progress bar and a live loss curve in the UI.

    ``device`` is the resolved one ("cpu", "cuda"), so a GPU and a CPU run never share a cache key.
    Its whole state is checkpointed every FACEFLOW_CHECKPOINT_SECONDS under PREFECT_HOME, keyed
    like its result, so a killed training resumes there.
    """
    from artifacts.progress import TrainingProgress
    from tasks.train import train_flow

    # Named by the task's own cache key, faceflow's code included: a checkpoint of other code is never resumed.
    resume_key = cache_key("train_realnvp", {"batches": batches, "config": config, "seed": seed, "device": device})
    resume_file = checkpoint_folder() / f"{resume_key}.pt"
    with TrainingProgress(config.epochs) as progress:
        trained = train_flow(
            batches, config, seed, device=device, resume_file=resume_file, checkpoint_every=checkpoint_seconds(),
            on_epoch=lambda stats: progress.update(stats.epoch, stats.train_loss, stats.validation_log_prob),
        )
        progress.finish(trained.history.train_loss, trained.history.validation_log_prob, trained.best_epoch)
    return trained


@task(name="fit_baselines", **STEP)
def fit_baselines(pca: FittedPCA, split: Split, config: BaselineConfig, seed: int) -> Baselines:
    """Diagonal Gaussian, diagonal GaussianMixture, Gaussian KDE and optionally the lab recipe, on the same split."""
    from tasks.baselines import fit_baseline_models

    baselines = fit_baseline_models(pca, split, config, seed)
    # Numbers only, so the table fits the UI's artifact panel; what each chose (free text) is in the description.
    publish_table("faceflow-baselines", [
        {"method": r.name, "held-out": r.heldout_log_prob, "validation": r.validation_log_prob, "seconds": r.train_seconds,
         "held-out pixels": r.heldout_image_log_prob}
        for r in baselines.results
    ], "Baseline densities on the same PCA coordinates, log p in nats per face; 'held-out pixels' is the "
       "image-space log p (PCA residual as an isotropic Gaussian). Chosen on validation: "
       + "; ".join(f"{r.name}: {r.detail}" for r in baselines.results))
    return baselines


@task(name="score_new_people", **STEP)
def score_new_people(
    faces: Faces, data: DataConfig, pca_config: PCAConfig, train: TrainConfig, baselines: BaselineConfig,
    seed: int, device: str,
) -> NewPeople:
    """log p of people held out of PCA and flow altogether, beside the baselines'."""
    from tasks.new_people import evaluate_new_people

    new_people = evaluate_new_people(faces, data, pca_config, train, baselines, seed, device, cancelled=_stop_requested())
    # Numbers only, so the table fits the UI's artifact panel; each fold's people (names) are in the description.
    publish_table("faceflow-new-people", [
        {"fold": number, "flow": fold.flow_log_prob} | {name: value for name, value in fold.baseline_log_prob.items()}
        for number, fold in enumerate(new_people.folds, start=1)
    ], "log p (nats per face) of every image of people neither the PCA nor the flow saw; the people of fold "
       + "; ".join(f"{number}: {', '.join(faces.people[p] for p in fold.people)}" for number, fold in enumerate(new_people.folds, start=1)))
    return new_people


@task(name="sample_faces", **STEP)
def sample_faces(trained: TrainedFlow, pca: FittedPCA, split: Split, config: SampleConfig, seed: int) -> GeneratedFaces:
    """N new faces at the configured temperature."""
    from artifacts import figures
    from tasks.generate import draw_samples

    samples = draw_samples(trained, pca, split, config, seed)
    figure = figures.sample_grid(samples.images, samples.nearest_train_distance, samples.temperature)
    publish_figure("faceflow-samples", "Samples", figures.png_bytes(figure), f"{config.n_samples} faces at T={config.temperature:g}")
    return samples


@task(name="score_log_prob", **STEP)
def score_log_prob(trained: TrainedFlow, pca: FittedPCA, faces: Faces, split: Split, samples: GeneratedFaces) -> Scores:
    """log p(x) of fit, validation and held-out faces and of the generated samples."""
    from tasks.score import score_faces

    scores = score_faces(trained, pca, faces, split, samples)
    publish_table("faceflow-scores", [
        {"part": part, "faces": len(values), "mean log p": scores.mean_log_prob(part),
         "lowest": float(values.min()), "highest": float(values.max())}
        for part in ("fit", "validation", "heldout", "sample") if len(values := scores.of(part))
    ], "log p per part (nats per face, PCA coordinates); every face's score, and its image-space log p "
       "(of the pixels), is in the run folder's scores.csv")
    return scores


@task(name="score_model", **STEP)
def score_model(trained: TrainedFlow, pca: FittedPCA, split: Split) -> ModelScore:
    """A trained model's validation and held-out log p, for a sweep's ranking."""
    from tasks.score import model_score

    return model_score(trained, pca, split)


@task(name="interpolate_faces", **STEP)
def interpolate_faces(trained: TrainedFlow, pca: FittedPCA, config: InterpolateConfig, index_a: int, index_b: int) -> Interpolation:
    """A latent-space walk between two real faces of different people (config.face_a and face_b, resolved by the flow)."""
    from artifacts import figures
    from tasks.generate import interpolate_between

    walk = interpolate_between(trained, pca, config, index_a, index_b)
    figure = figures.interpolation_strip(walk.images, walk.method, walk.index_a, walk.index_b)
    publish_figure("faceflow-interpolation", "Interpolation", figures.png_bytes(figure),
                   f"{config.face_a} (face {walk.index_a}) to {config.face_b} (face {walk.index_b})")
    return walk


@task(name="report", **STEP)
def report(run_folder: Path, inputs: ReportInputs) -> RunReport:
    """report.md with figures and the model files in the run folder; the report in the UI."""
    from artifacts.run_folder import write_run_folder
    from tasks.report import build_report

    built = build_report(run_folder.name, inputs)
    write_run_folder(run_folder, built.files)
    publish_markdown("faceflow-report", built.markdown, "faceflow run report")
    # Numbers only, so the table fits the UI's artifact panel; each model's free-text detail is
    # listed below the same table in faceflow-report.
    publish_table("faceflow-quality", built.comparison.drop(columns="detail").to_dict(orient="records"),
                  "Held-out and new-people log p (nats per face, PCA coordinates): flow vs baselines; the same of the "
                  "pixels (image space) and what each model is: faceflow-report")
    publish_table("faceflow-metrics", [{"metric": k, "value": v} for k, v in built.metrics.items()], "Run metrics")
    return RunReport(
        content_key("report", run_folder, inputs.trained, inputs.samples, inputs.scores, inputs.interpolation,
                    inputs.baselines, inputs.new_people),
        run_folder, built.metrics,
    )


@task(name="ingest_faces", cache_policy=NO_CACHE)
def ingest_faces(path: Path, resize: bool, readmit: bool = False, asked_by: str = "user") -> dict[str, object]:
    """Read, check and add a folder, .npz or .mat of faces to the face store; its dataset card in the UI.

    An image of a forgotten person is refused naming the erasure, unless ``readmit`` (then logged).
    """
    from prefect import get_run_logger

    from artifacts.dataset_card import card_markdown
    from faceflow.confinement import from_deployment
    from faceflow.settings import data_file_from_environment, faces_dir, inbox_dir
    from tasks.importers import ingest, summary

    # A deployment's form may name only what is in the inbox; the CLI's user, whatever they can read.
    ingested = ingest(path, resize, faces_dir(), data_file_from_environment(), inbox_dir() if from_deployment() else None,
                      models=models_dir(), readmit=readmit, asked_by=asked_by)
    for note in ingested.notes:
        get_run_logger().info(note)
    done = summary(ingested)
    if done["version"] is not None:
        version = done["version"]
        # The version id in the description: a purge finds the card of a version it deletes by it (flows/forget.py).
        publish_markdown("faceflow-faces", card_markdown(version, done["previous"], ingested.people_counts,
                                                          ingested.new_people, ingested.new_images, ingested.notes),
                         f"Faces version {version['number']} ({version['id'][:12]}): people, images per person, what it added")
    return done


@task(name="score_champion", cache_policy=NO_CACHE)
def score_champion(champion: Path, pixels: np.ndarray) -> float | None:
    """The mean image-space log p of faces ``pixels`` (n, 4096) under the champion in folder ``champion`` (resolved
    once by the caller, never the link), through its own PCA.

    None for a champion promoted before image-space log p existed: it is replaced (no fair figure).
    """
    from tasks.champion_model import champion_image_log_prob, load_champion_from

    image_log_p = champion_image_log_prob(load_champion_from(champion), pixels)
    return None if image_log_p is None else float(image_log_p.mean())


class ChampionVariable:
    """The registry's alias: the Prefect Variable ``faceflow-champion`` (tasks.registry.Alias)."""

    def get(self) -> dict | None:
        from prefect.variables import Variable

        return Variable.get(CHAMPION_VARIABLE, default=None)

    def set(self, record: dict | None) -> None:
        from prefect.variables import Variable

        if record is None:
            Variable.unset(CHAMPION_VARIABLE)
        else:
            Variable.set(CHAMPION_VARIABLE, record, overwrite=True)


CHAMPION_PROMOTED = "faceflow.champion.promoted"
CHAMPION_ROLLED_BACK = "faceflow.champion.rolled-back"


def announce_champion(event: str, folder: str, record: ChampionRecord, why: str, who: str | None = None) -> None:
    """Emit ``faceflow.champion.promoted`` or ``faceflow.champion.rolled-back`` for the champion now current.

    The "faceflow: champion changed" automation (commands/alerts.py) sends it on as a notification.
    Called after the registry's transaction has ended (tasks/registry.py stays Prefect-free); the
    flow run that made the change, if any, is a related resource.
    """
    from prefect.events import emit_event

    related = []
    if flow_run.id:
        related.append({"prefect.resource.id": f"prefect.flow-run.{flow_run.id}", "prefect.resource.role": "flow-run",
                        "prefect.resource.name": flow_run.name or ""})
    emit_event(
        event=event,
        resource={"prefect.resource.id": f"faceflow.champion.{folder}", "prefect.resource.name": folder},
        related=related,
        payload={"folder": folder, "run_folder": record.run_folder, "flow_run_id": record.flow_run_id,
                 "faces_version": record.faces_version, "seed": record.seed,
                 "validation_log_prob": record.validation_log_prob, "heldout_log_prob": record.heldout_log_prob,
                 "why": why, "who": who},
    )


def roll_back_champion(to: str | None, who: str, why: str) -> tuple[Champion, dict[str, Any]]:
    """The registry's rollback on FACEFLOW_MODELS_DIR, with the Variable as alias, then its event: (champion, row).

    A champion fitted on a forgotten person is refused (tasks.forgetting.stale_reason).
    """
    from tasks.forgetting import stale_reason
    from tasks.store import FaceStore

    store = FaceStore(faces_dir())
    chosen, row = rollback(models_dir(), ChampionVariable(), to, who, why,
                           stale=lambda record: stale_reason(store, record.faces_version))
    announce_champion(CHAMPION_ROLLED_BACK, chosen.folder, chosen.record, row["why"], who=who)
    return chosen, row


@task(name="promote_champion", cache_policy=NO_CACHE)
def promote_champion(run_folder: Path, record: ChampionRecord, row: dict, models: Path, judged_against: str | None) -> Promotion:
    """Make the challenger the champion (its folder, the link, its leaderboard row and the Variable, as one
    transaction) if the champion is still the one it was judged against (folder name) and it was not fitted
    on a version whose person was since forgotten; else ``moved_to`` or ``refused`` says why not."""
    from tasks.forgetting import retired_reason
    from tasks.store import FaceStore

    store = FaceStore(faces_dir())
    done = promote(run_folder, record, row, models, ChampionVariable(), judged_against=judged_against,
                   admit=lambda challenger: retired_reason(store, challenger.faces_version))
    if done.folder is not None:
        announce_champion(CHAMPION_PROMOTED, done.folder.name, record, str(row.get("why") or ""),
                          who=f"flow run {flow_run.name}" if flow_run.name else None)
        publish_table("faceflow-champion", [record.to_json()], "The new champion")
    return done
