"""The real flow on the real data, against a real Prefect server: outputs, artifacts, caching."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from uuid import UUID

import numpy as np
import pandas as pd
import pytest
import torch

from artifacts.run_folder import run_folder_problems
from conftest import REPO_ROOT, copy_home
from commands.server import local_server
from support import LIGHT_OPTIONS
from tasks.model import load_checkpoint
from tasks.pca import read_estimator

ALL_TASKS = {
    "fetch_faces", "split_faces", "fit_pca", "build_dataloader", "train_realnvp",
    "fit_baselines", "score_new_people", "sample_faces", "score_log_prob", "interpolate_faces", "report",
}
DOWNSTREAM_OF_SAMPLES = {"sample_faces", "score_log_prob", "report"}
# Read on every run, never served from the cache: "latest" names another version after an ingest.
# Its result's key (the version id) is what keys every later step.
READ_EVERY_RUN = {"fetch_faces"}


def cached_but(computed: set[str]) -> dict[str, str]:
    """Every task Cached but ``computed`` and the reading of the faces."""
    return {name: "Completed" if name in computed | READ_EVERY_RUN else "Cached" for name in ALL_TASKS}
RUN_FILES = {
    "report.md", "samples.png", "explained_variance.png", "loss_curve.png", "log_prob_histogram.png",
    "interpolation.png", "metrics.json", "config.json", "split.json", "scores.csv",
    "training_history.csv", "pca.npz", "model.pt", "manifest.json",
}
QUICK = ["--epochs", "3", "--n-samples", "8", "--steps", "5", *LIGHT_OPTIONS]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, migrated_home: Path) -> Path:
    """This module's PREFECT_HOME: its server's database and its runs' cached results, shared with no other module."""
    return copy_home(migrated_home, tmp_path_factory.mktemp("prefect-server") / "home")


@pytest.fixture(scope="module")
def server(home: Path) -> str:
    with local_server(home, timeout=300, ui=True) as running:
        yield running.api_url


@pytest.fixture(scope="module")
def workdir(home: Path) -> Path:
    """Where this module's runs start and write; beside its home, where faceflow_cli finds it."""
    folder = home.parent / "runs"
    folder.mkdir()
    return folder


def faceflow_cli(
    server: str, workdir: Path, data_file: Path, *arguments: str, code: Path = REPO_ROOT, home: Path | None = None
) -> str:
    """`faceflow run` of the checkout ``code`` in a fresh process against the test server; its stdout.

    Its results are cached in ``home``, by default this module's.
    """
    env = os.environ | {"PREFECT_API_URL": server, "PREFECT_HOME": str(home or workdir.parent / "home"),
                        "FACEFLOW_DATA_FILE": str(data_file), "PYTHONPATH": str(code)}
    result = subprocess.run(
        [sys.executable, "-m", "commands.cli", "run", "--output-dir", str(workdir / "outputs"), *arguments],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def faceflow_run(server: str, workdir: Path, data_file: Path, *arguments: str, **where: Path) -> dict:
    """`faceflow run --json`: the last line of stdout, parsed."""
    return json.loads(faceflow_cli(server, workdir, data_file, "--json", *arguments, **where).strip().splitlines()[-1])


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def artifacts_of(server: str, flow_run_id: str) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server}), get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)]))
        )
    return {artifact.key: artifact for artifact in found}


@pytest.fixture(scope="module")
def first_run(server: str, workdir: Path, data_file: Path) -> dict:
    """The module's first run: every step computed (its home is new), its folder's bytes as first written."""
    run = faceflow_run(server, workdir, data_file, *QUICK)
    return run | {"files": folder_bytes(Path(run["output_dir"]))}


def test_first_run_completes_every_task(first_run: dict) -> None:
    assert first_run["tasks"] == {name: "Completed" for name in ALL_TASKS}


def test_run_folder_holds_every_output(first_run: dict) -> None:
    folder = Path(first_run["output_dir"])
    assert {p.name for p in folder.iterdir()} == RUN_FILES
    report = (folder / "report.md").read_text()
    for figure in RUN_FILES - {"report.md"}:
        if figure.endswith(".png"):
            assert f"]({figure})" in report
    assert "## Conclusions" in report and "diagonal Gaussian" in report
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging left
    assert json.loads((folder / "metrics.json").read_text()) == pytest.approx(first_run["metrics"])


def test_metrics_are_numbers(first_run: dict) -> None:
    metrics = first_run["metrics"]
    for name in ("heldout_log_prob", "heldout_bits_per_dim", "new_people_log_prob", "train_seconds",
                 "heldout_image_log_prob", "heldout_image_bits_per_pixel", "new_people_image_log_prob",
                 "new_people_image_bits_per_pixel", "baseline_gaussian_kde_heldout_image_log_prob",
                 "baseline_gaussian_kde_new_people_image_log_prob"):
        assert isinstance(metrics[name], float) and np.isfinite(metrics[name])
    assert metrics["n_components"] == 64 and metrics["epochs"] == 3


def test_reported_heldout_log_prob_is_reproducible_from_saved_files(first_run: dict, data_file: Path) -> None:
    from tasks.data import load_faces

    folder = Path(first_run["output_dir"])
    heldout = json.loads((folder / "split.json").read_text())["heldout"]
    pca = read_estimator((folder / "pca.npz").read_bytes(), "pca.npz")
    model, config = load_checkpoint(folder / "model.pt")
    pixels = load_faces(data_file).flat[heldout]
    with torch.no_grad():
        log_p = model.log_prob(torch.from_numpy(pca.transform(pixels).astype(np.float32)))
    assert config["epochs"] == 3
    assert float(log_p.double().mean()) == pytest.approx(first_run["metrics"]["heldout_log_prob"], abs=1e-3)


ARTIFACT_OF_TASK = {
    "fetch_faces": "faceflow-data", "split_faces": "faceflow-split", "fit_pca": "faceflow-pca",
    "build_dataloader": "faceflow-dataloader", "train_realnvp": "faceflow-training-curve",
    "fit_baselines": "faceflow-baselines", "score_new_people": "faceflow-new-people", "sample_faces": "faceflow-samples",
    "score_log_prob": "faceflow-scores", "interpolate_faces": "faceflow-interpolation", "report": "faceflow-report",
}


def test_every_task_publishes_its_own_artifact(server: str, first_run: dict) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    artifacts = artifacts_of(server, first_run["flow_run_id"])
    assert set(ARTIFACT_OF_TASK.values()) | {"faceflow-training", "faceflow-quality", "faceflow-metrics", "faceflow-cache"} <= set(artifacts)
    with temporary_settings({PREFECT_API_URL: server}), get_client(sync_client=True) as client:
        for task, key in ARTIFACT_OF_TASK.items():  # published by that task's run, not by the flow at the end
            task_run = client.read_task_run(artifacts[key].task_run_id)
            assert task_run.name.rsplit("-", 1)[0] == task, key
    assert artifacts["faceflow-cache"].task_run_id is None
    report = artifacts["faceflow-report"]
    assert report.type == "markdown" and report.data.count("data:image/png;base64,") == 5
    assert artifacts["faceflow-training"].type == "progress" and float(artifacts["faceflow-training"].data) == 100.0
    assert "data:image/png;base64," in artifacts["faceflow-training-curve"].data and "3 of 3 epochs" in artifacts["faceflow-training-curve"].data
    quality = json.loads(artifacts["faceflow-quality"].data)
    assert [row["method"] for row in quality][:3] == ["faceflow RealNVP", "diagonal Gaussian", "GaussianMixture"]
    heldout = quality[0]["heldout_log_prob"]
    assert heldout == float(f"{first_run['metrics']['heldout_log_prob']:.4g}")  # rounded for reading
    cache = {row["task"]: row["state"] for row in json.loads(artifacts["faceflow-cache"].data)}
    assert cache == first_run["tasks"]


@pytest.mark.parametrize("repetition", range(5))
def test_identical_rerun_is_all_cached(server: str, workdir: Path, data_file: Path, first_run: dict, repetition: int) -> None:
    """The summary comes from the run itself, so it is right every time, not when the API has caught up."""
    again = faceflow_run(server, workdir, data_file, *QUICK)
    assert again["tasks"] == cached_but(set())
    assert again["output_dir"] == first_run["output_dir"]
    assert again["metrics"] == first_run["metrics"]


def test_downstream_change_reruns_only_downstream(server: str, workdir: Path, data_file: Path, first_run: dict) -> None:
    changed = faceflow_run(server, workdir, data_file, "--epochs", "3", "--n-samples", "4", "--steps", "5", *LIGHT_OPTIONS)
    expected = cached_but(DOWNSTREAM_OF_SAMPLES)
    assert changed["tasks"] == expected
    assert changed["output_dir"] != first_run["output_dir"]
    assert changed["metrics"]["heldout_log_prob"] == first_run["metrics"]["heldout_log_prob"]


def test_editing_the_code_invalidates_the_cache(server: str, workdir: Path, data_file: Path, first_run: dict, tmp_path: Path) -> None:
    """A copy of this checkout is served from the cache; the same copy with one line of a task edited computes again."""
    code = tmp_path / "checkout"
    for package in ("faceflow", "tasks", "flows", "artifacts", "commands"):
        shutil.copytree(REPO_ROOT / package, code / package, ignore=shutil.ignore_patterns("__pycache__"))
    unchanged = faceflow_run(server, workdir, data_file, *QUICK, code=code)
    assert unchanged["tasks"] == cached_but(set())  # the copy is the same code
    with (code / "tasks" / "score.py").open("a") as source:
        source.write("\nEDITED = True  # any change to faceflow's code\n")
    edited = faceflow_run(server, workdir, data_file, *QUICK, code=code)
    assert edited["tasks"] == {name: "Completed" for name in ALL_TASKS}
    assert edited["output_dir"] != first_run["output_dir"]


def _without_timings(metrics: dict) -> dict[str, float]:
    """The figures that do not measure time, as numbers (JSON carries NaN as "nan")."""
    return {name: float(value) for name, value in metrics.items() if "second" not in name}


def test_parallel_steps_do_not_change_the_results(
    server: str, workdir: Path, data_file: Path, first_run: dict, tmp_path: Path
) -> None:
    """Computed again from nothing (a new home) with the new-people models trained after the main one: bit for bit the same."""
    again = faceflow_run(server, workdir, data_file, *QUICK, "--no-parallel", "--output-dir", str(tmp_path / "outputs"),
                         home=tmp_path / "home")
    assert set(again["tasks"].values()) == {"Completed"}
    assert Path(again["output_dir"]).name == Path(first_run["output_dir"]).name  # the same run, so the same folder
    # Exactly equal (NaN where there are no validation faces counts as equal to NaN).
    assert _without_timings(again["metrics"]) == pytest.approx(_without_timings(first_run["metrics"]), rel=0, abs=0, nan_ok=True)
    assert (Path(again["output_dir"]) / "model.pt").read_bytes() == first_run["files"]["model.pt"]


def test_two_threads_change_the_results_only_by_rounding(
    server: str, workdir: Path, data_file: Path, first_run: dict, tmp_path: Path
) -> None:
    """BLAS sums in another order on 2 threads: the same run (one folder, one cache entry) to within 1e-4."""
    again = faceflow_run(server, workdir, data_file, *QUICK, "--threads", "2", "--output-dir", str(tmp_path / "outputs"),
                         home=tmp_path / "home")
    assert set(again["tasks"].values()) == {"Completed"}
    assert Path(again["output_dir"]).name == Path(first_run["output_dir"]).name
    # Every figure (log p of every part, the baselines', new people's): the model's weights differ in
    # their last digits, which Adam's first steps amplify, but not what they compute. The samples' log p
    # moves most (samples pass through the inverse flow): 1.2e-5 relative, seen once in CI.
    assert _without_timings(again["metrics"]) == pytest.approx(_without_timings(first_run["metrics"]), rel=1e-4, nan_ok=True)


def _remove(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).unlink()


DAMAGE = {
    "folder deleted": (lambda folder: shutil.rmtree(folder), ["the folder or its manifest.json is missing"]),
    "model.pt deleted": (lambda folder: _remove(folder, "model.pt"), ["model.pt is missing"]),
    "model.pt emptied": (lambda folder: (folder / "model.pt").write_bytes(b""), ["model.pt has changed"]),
    "metrics.json and pca.npz deleted": (lambda folder: _remove(folder, "metrics.json", "pca.npz"),
                                            ["metrics.json is missing", "pca.npz is missing"]),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_run_folder_is_written_again_from_cached_results(
    server: str, workdir: Path, data_file: Path, first_run: dict, damage: str
) -> None:
    harm, reported = DAMAGE[damage]
    folder = Path(first_run["output_dir"])
    harm(folder)
    again = faceflow_run(server, workdir, data_file, *QUICK)
    assert again["repaired"] == reported
    assert again["tasks"] == cached_but({"report"})
    assert run_folder_problems(folder) == []
    assert folder_bytes(folder) == first_run["files"]  # byte for byte the folder first written, not just self-consistent


def test_plain_output_says_where_the_report_is(server: str, workdir: Path, data_file: Path, first_run: dict) -> None:
    stdout = faceflow_cli(server, workdir, data_file, *QUICK)
    assert f"report: {first_run['output_dir']}/report.md" in stdout
    assert f"held-out log p: {first_run['metrics']['heldout_log_prob']:.2f} nats per face" in stdout
    assert all(f"{name}" in stdout for name in ALL_TASKS)


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]


def test_report_artifact_renders_its_figures_in_the_ui(server: str, first_run: dict, tmp_path: Path) -> None:
    """A real browser opens the report artifact in the Prefect UI: every embedded figure decodes."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.is_file(), "Debian's chromium is missing: .ci/run installs it (apt-get install chromium)"
    report = artifacts_of(server, first_run["flow_run_id"])["faceflow-report"]
    page_url = server.removesuffix("/api") + f"/artifacts/artifact/{report.id}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 2400})
            page.goto(page_url, wait_until="networkidle", timeout=60_000)
            figures = page.locator('img[src^="data:image/png;base64,"]')
            figures.first.wait_for(timeout=60_000)
            widths = figures.evaluate_all("images => images.map(image => image.naturalWidth)")
            assert page.get_by_text("Conclusions").count() >= 1
            page.screenshot(path=str(tmp_path / "report-artifact.png"), full_page=True)
        finally:
            browser.close()
    assert len(widths) == 5 and all(width > 100 for width in widths)


def test_a_run_on_version_2_reads_the_4_people_ingested_after_version_1(
    server: str, workdir: Path, data_file: Path, faces, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 1 is Olivetti less 4 people; version 2 adds them (PNG folders) and 2 photos: the run reads all of it."""
    from tasks.store import FaceStore
    from test_versions import grown_store

    store = grown_store(tmp_path, faces)
    monkeypatch.setenv("FACEFLOW_FACES_DIR", str(store))
    run = faceflow_run(server, workdir, data_file, *QUICK, "--faces-version", "2", "--face-b", "olivetti-37:0")
    folder = Path(run["output_dir"])
    second = FaceStore(store).resolve("2")
    assert json.loads((folder / "config.json").read_text())["data"]["faces_version"] == second.id
    assert second.short in (folder / "report.md").read_text()
    split = json.loads((folder / "split.json").read_text())
    assert len(split["fit_ids"]) + len(split["validation_ids"]) + len(split["heldout_ids"]) == 402 == second.images
    scored = pd.read_csv(folder / "scores.csv")
    assert scored[scored["part"] != "sample"]["person"].nunique() == 40  # 36 + the 4 ingested
