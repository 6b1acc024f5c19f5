"""The faceflow pipeline: fetch -> PCA -> dataloader -> RealNVP -> sample, score, interpolate -> report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, tags

from artifacts.publish import publish_table
from artifacts.run_folder import check_output_folder, run_folder_problems
from faceflow.caching import version_tag
from faceflow.interrupts import defer_during_imports
from faceflow.config import FaceflowConfig
from faceflow.confinement import confine_forms
from faceflow.keys import content_key, project_source_digest
from faceflow.serializer import RESULTS, allow_stored
from faceflow.settings import models_dir
from faceflow.threads import limited_threads
from flows.states import TaskStates
from tasks.data import check_config_against, interpolation_endpoints, resolve_data_file, with_endpoints
from tasks.forgetting import forgotten_endpoints
from tasks.devices import resolve_device
from tasks.results import Faces, ReportInputs, RunReport
from tasks.steps import (
    build_dataloader, fetch_faces, fit_baselines, fit_pca, interpolate_faces, report, sample_faces, score_log_prob,
    score_new_people, split_faces, train_realnvp,
)


@dataclass(frozen=True)
class PipelineResult:
    """The run's report and each task's final state in this run (Completed, Cached, ...)."""

    report: RunReport
    task_states: dict[str, str]
    repairs: tuple[str, ...]  # what was wrong with the run folder, which this run wrote again
    config: FaceflowConfig | None = None  # as run: data.faces_version resolved to the version's id
    validation: tuple[int, ...] = ()  # the validation faces' indices into the version (what retraining judges on)
    validation_ids: tuple[str, ...] = ()  # their image ids


def with_version(config: FaceflowConfig, version_id: str) -> FaceflowConfig:
    """``config`` with data.faces_version resolved to an id: "latest" names another version after an ingest."""
    return config.model_copy(update={"data": config.data.model_copy(update={"faces_version": version_id})})


def run_folder_for(config: FaceflowConfig, data_file: Path | None) -> Path:
    """Where this configuration's outputs live: named by what determines them, not by the process."""
    # Neither where outputs go nor in what order the steps compute changes what they are (bit for bit);
    # another thread count changes only the last digits of sums (within 1e-5; tests/test_pipeline.py).
    identity = content_key(
        config.model_copy(update={"output_dir": Path("."), "threads": 1, "parallel": True}), data_file, project_source_digest()
    )
    return config.output_dir / f"run-{identity[:12]}"


allow_stored(PipelineResult, FaceflowConfig)  # its persisted result is read back without pickle


@flow(name="faceflow", persist_result=True, **RESULTS)
def faceflow_pipeline(config: FaceflowConfig = FaceflowConfig()) -> PipelineResult:
    """Learn a RealNVP on PCA-reduced faces of a face store version, then sample, score, interpolate and report."""
    defer_during_imports()  # a Ctrl-C or SIGTERM mid-import is taken after it (faceflow.interrupts)
    (config,) = confine_forms([config])  # from a deployment: output_dir and the data file inside their folders
    device = resolve_device(config.train.device)  # a missing CUDA device fails here, before any work
    data_file = resolve_data_file(config.data)
    check_output_folder(config.output_dir)
    steps = TaskStates()
    with limited_threads(config.threads), steps.stopping_others_on_failure():
        # The version is resolved once, here; every later step, the run folder and config.json see its id.
        faces = steps.run(fetch_faces, data_file, config.data.faces_version)
        forgotten = forgotten_endpoints(models_dir())  # an endpoint naming a forgotten person is refused saying so
        check_config_against(faces, config, forgotten)  # too few people, bad endpoints, too many components: before any work
        config = with_endpoints(faces, with_version(config, faces.version), forgotten)  # config.json says which faces
        run_folder = run_folder_for(config, None)
        with tags(version_tag(faces.version)):  # each step's task run names its version; its cache key is noted
            inputs = _run_tasks(steps, config, faces, device)
            written = steps.run(report, run_folder, inputs)
            # Verified, not trusted: a cached report whose folder has lost or changed a file writes it again.
            repairs = tuple(run_folder_problems(run_folder)) if steps.names["report"] == "Cached" else ()
            if repairs:
                get_run_logger().warning(f"run folder {run_folder}: {'; '.join(repairs)}; writing it again")
                written = steps.run(report.with_options(refresh_cache=True), run_folder, inputs)
    publish_table("faceflow-cache", steps.rows(), "Each task of this run: computed, or served from the cache")
    validation = inputs.split.validation.tolist()
    return PipelineResult(written, steps.names, repairs, config, tuple(validation),
                          tuple(faces.image_ids[index] for index in validation))


def _run_tasks(steps: TaskStates, config: FaceflowConfig, faces: Faces, device: str) -> ReportInputs:
    """Every step after fetching and before the report; returns the report's inputs, by name."""
    split = steps.run(split_faces, faces, config.data)
    # The new-people models need only the faces: with `parallel` they train on another thread
    # (torch releases the GIL; measured 0.56-0.63 of the time of one after the other).
    new_people_arguments = (faces, config.data, config.pca, config.train, config.baselines, config.seed, device)
    pending = steps.submit(score_new_people, *new_people_arguments) if config.parallel else None
    pca = steps.run(fit_pca, faces, split, config.pca)
    batches = steps.run(build_dataloader, pca, split, config.train, config.seed)
    trained = steps.run(train_realnvp, batches, config.train, config.seed, device)
    baselines = steps.run(fit_baselines, pca, split, config.baselines, config.seed)
    samples = steps.run(sample_faces, trained, pca, split, config.sample, config.seed)
    scores = steps.run(score_log_prob, trained, pca, faces, split, samples)
    interpolation = steps.run(interpolate_faces, trained, pca, config.interpolate, *interpolation_endpoints(faces, config))
    new_people = steps.result(pending) if pending else steps.run(score_new_people, *new_people_arguments)
    return ReportInputs(split=split, pca=pca, trained=trained, samples=samples, scores=scores, interpolation=interpolation,
                        baselines=baselines, new_people=new_people, config=config)
