"""A person walks the Prefect UI in a real browser: a custom run from the form, its artifacts, the schedule, the leaderboard.

The screenshots it takes are docs/ui.md's pictures: `make screenshots` runs this test with
FACEFLOW_SCREENSHOTS=docs/ui; otherwise they go to the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from support import RunningUI, assert_no_process_left, client, run_deployment, wait_for_state

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]
FIGURE_ARTIFACTS = {"faceflow-pca", "faceflow-training-curve", "faceflow-samples", "faceflow-interpolation", "faceflow-report"}
TASK_ARTIFACTS = {
    "faceflow-data", "faceflow-split", "faceflow-pca", "faceflow-dataloader", "faceflow-training", "faceflow-training-curve",
    "faceflow-baselines", "faceflow-new-people", "faceflow-samples", "faceflow-scores", "faceflow-interpolation",
    "faceflow-report", "faceflow-quality", "faceflow-metrics", "faceflow-cache",
}
FORM_EPOCHS = "7"


@contextmanager
def browser_page() -> Iterator:
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.is_file(), "Debian's chromium is missing: `make test` installs it (apt-get install chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 1000})
        finally:
            browser.close()


def form_field(page, label: str):
    """The input of the parameter form's property labelled ``label``."""
    container = f"//span[normalize-space()='{label}']/ancestor::div[contains(concat(' ', @class, ' '), ' schema-form-property ')][1]"
    return page.locator(f"xpath=({container}//*[self::input or self::textarea])[1]")


def rendered_image_widths(page) -> list[int]:
    images = page.locator("img[src^='data:image/png;base64,']")
    images.first.wait_for(timeout=60_000)
    page.wait_for_function("() => [...document.images].every(image => image.complete)", timeout=60_000)
    return images.evaluate_all("images => images.map(image => image.naturalWidth)")


def run_from_form(ui: RunningUI, page, shots: Path, outputs: Path) -> UUID:
    """Deployments -> on-demand -> Run -> Custom run -> change Epochs and the output folder -> Submit."""
    page.goto(ui.url + "/deployments", wait_until="networkidle")
    page.screenshot(path=str(shots / "01-deployments.png"))
    page.get_by_role("link", name="on-demand", exact=True).click()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run", exact=True).click()
    page.wait_for_load_state("networkidle")
    form_field(page, "Epochs (Optional)").fill(FORM_EPOCHS)
    form_field(page, "Output Dir (Optional)").fill(str(outputs))
    form_field(page, "Epochs (Optional)").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "02-custom-run.png"))
    with client(ui.api_url) as prefect:
        before = {run.id for run in prefect.read_flow_runs()}
    page.get_by_role("button", name="Submit").click()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with client(ui.api_url) as prefect:
            created = [run for run in prefect.read_flow_runs() if run.id not in before and run.deployment_id]
        submitted = [run for run in created if run.parameters.get("config", {}).get("train", {}).get("epochs") == int(FORM_EPOCHS)]
        if submitted:
            return submitted[0].id
        time.sleep(0.5)
    raise AssertionError("the form's Submit created no flow run with the changed epochs")


@pytest.fixture
def ui(tmp_path: Path, data_file: Path, prefect_home: Path, tag: str) -> Iterator[RunningUI]:
    running = RunningUI(tmp_path, tag, data_file, prefect_home, FACEFLOW_MODELS_DIR=str(tmp_path / "models"))
    yield running
    running.ctrl_c()
    assert_no_process_left(tag)


def test_a_person_walks_the_ui(ui: RunningUI, tmp_path: Path) -> None:
    shots = Path(os.environ.get("FACEFLOW_SCREENSHOTS") or tmp_path / "screenshots").absolute()
    shots.mkdir(parents=True, exist_ok=True)
    with browser_page() as page:
        flow_run_id = run_from_form(ui, page, shots, tmp_path / "outputs")
        assert wait_for_state(ui.api_url, flow_run_id, {"Completed"}, timeout=600) == "Completed"
        with client(ui.api_url) as prefect:
            assert prefect.read_flow_run(flow_run_id).parameters["config"]["train"]["epochs"] == int(FORM_EPOCHS)

        page.goto(f"{ui.url}/runs/flow-run/{flow_run_id}", wait_until="networkidle")
        page.get_by_text("Completed", exact=True).first.wait_for(timeout=60_000)
        page.screenshot(path=str(shots / "03-run.png"))
        page.get_by_text("Artifacts", exact=True).first.click()
        page.locator("a[href*='/artifacts/artifact/']").first.wait_for(timeout=60_000)
        page.screenshot(path=str(shots / "04-run-artifacts.png"), full_page=True)
        with client(ui.api_url) as prefect:
            artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        # Keyed: the unkeyed one is Prefect's record of where the flow's own result is stored.
        published = {artifact.key: artifact.id for artifact in artifacts if artifact.key}
        assert set(published) == TASK_ARTIFACTS  # one per task, and the run's own cache table
        for key, artifact_id in published.items():  # each one listed on the run's Artifacts tab
            assert page.locator(f"a[href='/artifacts/artifact/{artifact_id}']").count() == 1, key

        # Every figure an artifact embeds decodes in the browser.
        for key in sorted(FIGURE_ARTIFACTS):
            page.goto(f"{ui.url}/artifacts/artifact/{published[key]}", wait_until="networkidle")
            widths = rendered_image_widths(page)
            assert widths and all(width > 100 for width in widths), (key, widths)
            if key in {"faceflow-training-curve", "faceflow-samples", "faceflow-report"}:
                page.screenshot(path=str(shots / f"05-{key}.png"), full_page=key != "faceflow-report")

        # The weekly schedule, active, on the retraining deployment's page.
        page.goto(ui.url + "/deployments", wait_until="networkidle")
        page.get_by_role("link", name="weekly-retrain", exact=True).click()
        page.get_by_text("At 03:00 AM, only on Monday").first.wait_for(timeout=60_000)
        page.screenshot(path=str(shots / "06-schedule.png"))

        # A retraining run, then its leaderboard.
        retrain = run_deployment(ui.api_url, "weekly-retrain", {
            "config": {"data": {"validation_per_person": 1}, "train": {"epochs": 5}, "output_dir": str(tmp_path / "outputs")},
        }, flow="faceflow-retrain")
        assert wait_for_state(ui.api_url, retrain, {"Completed"}, timeout=600) == "Completed"
        with client(ui.api_url) as prefect:
            leaderboard = next(a for a in prefect.read_latest_artifacts() if a.key == "faceflow-leaderboard")
        rows = json.loads(leaderboard.data)
        assert len(rows) == 1 and rows[0]["promoted"] is True and rows[0]["why"] == "first champion"
        page.goto(f"{ui.url}/artifacts/artifact/{leaderboard.latest_id}", wait_until="networkidle")
        page.get_by_text("first champion").first.wait_for(timeout=60_000)
        page.screenshot(path=str(shots / "07-leaderboard.png"))
