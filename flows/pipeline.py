"""The faceflow pipeline: fetch -> PCA -> dataloader -> RealNVP -> sample, score, interpolate -> report."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from faceflow.caching import content_key, project_source_digest
from faceflow.config import FaceflowConfig
from faceflow.threads import limited_threads
from tasks.baselines import fit_baselines
from tasks.data import fetch_faces, resolve_data_file, split_faces
from tasks.generate import interpolate_faces, sample_faces
from tasks.model import resolve_device
from tasks.new_people import score_new_people
from tasks.pca import fit_pca
from tasks.report import RunReport, report
from tasks.score import score_log_prob
from tasks.train import build_dataloader, train_realnvp


def run_folder_for(config: FaceflowConfig, data_file: Path | None) -> Path:
    """Where this configuration's outputs live: named by what determines them, not by the process."""
    # Neither where outputs go nor how many threads compute them changes what they are.
    identity = content_key(config.model_copy(update={"output_dir": Path("."), "threads": 1}), data_file, project_source_digest())
    return config.output_dir / f"run-{identity[:12]}"


@flow(name="faceflow", persist_result=True)
def faceflow_pipeline(config: FaceflowConfig = FaceflowConfig()) -> RunReport:
    """Learn a RealNVP on PCA-reduced Olivetti faces, then sample, score, interpolate and report."""
    device = resolve_device(config.train.device).type  # a missing CUDA device fails here, before any work
    data_file = resolve_data_file(config.data)
    run_folder = run_folder_for(config, data_file)
    with limited_threads(config.threads):
        return _run_tasks(config, data_file, run_folder, device)


def _run_tasks(config: FaceflowConfig, data_file: Path | None, run_folder: Path, device: str) -> RunReport:
    faces = fetch_faces(data_file)
    split = split_faces(faces, config.data)
    pca = fit_pca(faces, split, config.pca)
    batches = build_dataloader(pca, split, config.train, config.seed)
    trained = train_realnvp(batches, config.train, config.seed, device)
    baselines = fit_baselines(pca, split, config.baselines, config.seed)
    new_people = score_new_people(faces, config.data, config.pca, config.train, config.baselines, config.seed, device)
    samples = sample_faces(trained, pca, split, config.sample, config.seed)
    scores = score_log_prob(trained, pca, faces, split, samples)
    interpolation = interpolate_faces(trained, pca, config.interpolate)
    # A deleted run folder must be written again even though the report is cached.
    write_report = report.with_options(refresh_cache=not (run_folder / "report.md").is_file())
    return write_report(run_folder, split, pca, trained, samples, scores, interpolation, baselines, new_people, config)
