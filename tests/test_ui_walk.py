"""A person walks the Prefect UI in a real browser: a custom run from the form, its artifacts, the schedule, the leaderboard.

Every table an artifact shows must end inside the artifact panel, a sweep's ranking included.

The walk starts at the server's root address in a fresh browser profile, as a new user does, and
so in the UI Prefect opens for them: V2 (/v2/) since Prefect 3.9. The screenshots it takes are
docs/ui.md's pictures: `make screenshots` runs this test with FACEFLOW_SCREENSHOTS=docs/ui;
otherwise they go to the test's temporary folder.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

from artifacts.rankings import short_time
from support import RunningUI, assert_no_process_left, client, light_config, run_deployment, wait_for_state

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
UI_WAIT_MS = 60_000  # a page on a loaded 2-core machine
FLOW_RUN_PAGE = re.compile(r"/v2/runs/flow-run/([0-9a-f-]{36})")
# Ranked rows as faces_sweep makes them, with long values and a long error as a random search and a
# diverged configuration give: a real sweep on Dask would take this walk minutes more.
SWEEP_ROWS: list[dict[str, object]] = [
    {"rank": 1, "configuration": 3, "values": "train.learning_rate=0.003, train.num_layers=4, train.input_noise=0.4137, "
     "train.weight_decay=0.08312, train.hidden_units=384", "validation log p": -55.8123, "held-out log p": -57.0211,
     "train seconds": 41.73, "error": ""},
    {"rank": 2, "configuration": 1, "values": "train.learning_rate=0.003, train.num_layers=3, train.input_noise=0.3519, "
     "train.weight_decay=0.2114, train.hidden_units=192", "validation log p": -56.4391, "held-out log p": -56.9804,
     "train seconds": 35.02, "error": ""},
    {"rank": 3, "configuration": 2, "values": "train.learning_rate=0.005, train.num_layers=4, train.input_noise=0.3044, "
     "train.weight_decay=0.01127, train.hidden_units=256", "validation log p": None, "held-out log p": None,
     "train seconds": None, "error": "FloatingPointError: the training loss is not finite at epoch 212: "
     "lower train.learning_rate or raise train.weight_decay"},
]


@contextmanager
def browser_page() -> Iterator:
    """A page in a fresh headless Chromium: no profile, so no saved choice of UI, as a new user's browser."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM.is_file(), "Debian's chromium is missing: `make test` installs it (apt-get install chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(UI_WAIT_MS)
            yield page
        finally:
            browser.close()


def open_ui(ui: RunningUI, page) -> None:
    """The root address, typed as a person would; Prefect sends a browser with no preference to V2."""
    from playwright.sync_api import expect

    page.goto(ui.url + "/")
    expect(page).to_have_url(re.compile(re.escape(ui.url) + "/v2/"), timeout=UI_WAIT_MS)


def rendered_image_widths(page) -> list[int]:
    images = page.locator("img[src^='data:image/png;base64,']")
    images.first.wait_for()
    page.wait_for_function("() => [...document.images].every(image => image.complete)", timeout=UI_WAIT_MS)
    return images.evaluate_all("images => images.map(image => image.naturalWidth)")


def tables_running_over(page) -> list[dict]:
    """Bounding boxes of the artifact's tables that do not fit its panel (so run under the side panel or scroll)."""
    from playwright.sync_api import expect

    panel = page.get_by_role("tabpanel")
    expect(panel).to_be_visible()
    # Measured in one step inside the page: the panel re-renders as the page settles (?tab=...), and
    # a box read by a later call could find it replaced and not shown (bounding_box() is then None).
    return panel.evaluate("""panel => {
        const right = panel.getBoundingClientRect().right;
        return [...panel.querySelectorAll("table")].map(table => table.getBoundingClientRect())
            .filter(box => box.right > right + 1)  // a pixel of rounding
            .map(box => ({x: box.x, y: box.y, width: box.width, height: box.height, panel_right: right}));
    }""")


def open_artifact(ui: RunningUI, page, artifact_id: UUID):
    """The artifact's page, once its content (a table, here) has rendered; returns its panel."""
    from playwright.sync_api import expect

    page.goto(f"{ui.url}/v2/artifacts/artifact/{artifact_id}", wait_until="networkidle")
    panel = page.get_by_role("tabpanel")
    expect(panel).to_be_visible()
    panel.locator("table").first.wait_for()
    return panel


def sweep_fits_the_panel(ui: RunningUI, page) -> None:
    """faces_sweep's own artifact code on rows of a sweep's shape: its table fits, its free text is listed below."""
    from playwright.sync_api import expect
    from prefect import flow

    from commands.runner import recorded_at
    from flows.sweep import publish_ranking

    def publish() -> None:
        # In a flow run, as faces_sweep publishes it: Prefect deprecates artifacts made outside one.
        # Its logs are flushed before the UI stops: logs queued for a stopped server held up the
        # test session's exit.
        with recorded_at(ui.api_url):
            flow(name="walk-sweep-ranking", persist_result=False)(publish_ranking)(SWEEP_ROWS)

    # In a thread of its own: Playwright's event loop runs in this one, and Prefect, seeing a
    # running loop, would hand back an unawaited coroutine instead of running.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(publish).result()
    with client(ui.api_url) as prefect:
        sweep = next(a for a in prefect.read_latest_artifacts() if a.key == "faceflow-sweep")
    panel = open_artifact(ui, page, sweep.latest_id)
    assert not tables_running_over(page), tables_running_over(page)
    expect(panel.get_by_role("row")).to_have_count(1 + len(SWEEP_ROWS))
    expect(panel.get_by_role("listitem").last).to_contain_text(str(SWEEP_ROWS[-1]["error"]))


def run_from_form(ui: RunningUI, page, shots: Path, outputs: Path) -> UUID:
    """Deployments -> on-demand -> Run -> Custom run -> change Epochs and the output folder -> Submit -> the run."""
    page.get_by_role("link", name="Deployments", exact=True).click()
    page.get_by_role("link", name="on-demand", exact=True).wait_for()
    page.wait_for_load_state("networkidle")
    page.screenshot(path=str(shots / "01-deployments.png"))
    page.get_by_role("link", name="on-demand", exact=True).click()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Custom run", exact=True).click()
    epochs = page.get_by_label("Epochs (Optional)", exact=True)
    epochs.fill(FORM_EPOCHS)
    page.get_by_label("Output Dir (Optional)", exact=True).fill(str(outputs))
    epochs.scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "02-custom-run.png"))
    page.get_by_role("button", name="Submit", exact=True).click()
    # Submit leads back to the deployment and says so in a notice whose link opens the new run.
    page.get_by_role("link", name="View run", exact=True).click()
    page.wait_for_url(FLOW_RUN_PAGE)
    return UUID(FLOW_RUN_PAGE.search(page.url).group(1))


@pytest.fixture
def ui(tmp_path: Path, data_file: Path, prefect_home: Path, tag: str) -> Iterator[RunningUI]:
    running = RunningUI(tmp_path, tag, data_file, prefect_home, FACEFLOW_MODELS_DIR=str(tmp_path / "models"))
    yield running
    running.ctrl_c()
    assert_no_process_left(tag)


def test_a_person_walks_the_ui(ui: RunningUI, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    shots = Path(os.environ.get("FACEFLOW_SCREENSHOTS") or tmp_path / "screenshots").absolute()
    shots.mkdir(parents=True, exist_ok=True)
    outputs = tmp_path / "outputs"
    with browser_page() as page:
        open_ui(ui, page)
        sweep_fits_the_panel(ui, page)  # first: it needs no run
        flow_run_id = run_from_form(ui, page, shots, outputs)
        assert wait_for_state(ui.api_url, flow_run_id, {"Completed"}, timeout=600) == "Completed"
        with client(ui.api_url) as prefect:
            config = prefect.read_flow_run(flow_run_id).parameters["config"]
        assert config["train"]["epochs"] == int(FORM_EPOCHS) and config["output_dir"] == str(outputs)
        assert next(outputs.glob("run-*/report.md")).is_file()

        page.reload(wait_until="networkidle")  # the run page as it is now, finished
        expect(page.get_by_text("Completed", exact=True).first).to_be_visible()
        expect(page.get_by_text("11 Task runs", exact=True)).to_be_visible()
        page.screenshot(path=str(shots / "03-run.png"))
        page.get_by_role("tab", name="Artifacts", exact=True).click()
        page.locator("a[href*='/v2/artifacts/artifact/']").first.wait_for()
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(shots / "04-run-artifacts.png"), full_page=True)
        with client(ui.api_url) as prefect:
            artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        # Keyed: the unkeyed one is Prefect's record of where the flow's own result is stored.
        published = {artifact.key: artifact for artifact in artifacts if artifact.key}
        assert set(published) == TASK_ARTIFACTS  # one per task, and the run's own cache table
        for key, artifact in published.items():  # each one listed on the run's Artifacts tab
            expect(page.locator(f"a[href='/v2/artifacts/artifact/{artifact.id}']"), key).to_have_count(1)

        # Each artifact opens; every figure it embeds decodes, and every table fits beside the side panel.
        for key, artifact in sorted(published.items()):
            page.goto(f"{ui.url}/v2/artifacts/artifact/{artifact.id}", wait_until="networkidle")
            expect(page.get_by_role("tabpanel")).to_be_visible()
            if key in FIGURE_ARTIFACTS:
                widths = rendered_image_widths(page)
                assert widths and all(width > 100 for width in widths), (key, widths)
            if artifact.type == "table" or key == "faceflow-report":
                page.get_by_role("tabpanel").locator("table").first.wait_for()
                assert not tables_running_over(page), (key, tables_running_over(page))
            if key in {"faceflow-training-curve", "faceflow-samples", "faceflow-report", "faceflow-quality"}:
                page.screenshot(path=str(shots / f"05-{key}.png"), full_page=key in {"faceflow-training-curve", "faceflow-samples"})

        # The weekly schedule, active, on the retraining deployment's page.
        page.get_by_role("link", name="Deployments", exact=True).click()
        page.get_by_role("link", name="weekly-retrain", exact=True).click()
        # The innermost block holding both the cron's description and a switch: the schedule's own row.
        schedule = page.locator("div").filter(has_text="At 03:00 AM, only on Monday").filter(has=page.get_by_role("switch")).last
        expect(schedule.get_by_role("switch")).to_be_checked()
        page.wait_for_load_state("networkidle")
        page.screenshot(path=str(shots / "06-schedule.png"))

        # A retraining run, then its leaderboard: it fits the panel, and its one row is the first champion.
        retrain = run_deployment(ui.api_url, "weekly-retrain", {
            "config": light_config({"data": {"validation_fraction": 0.1}, "train": {"epochs": 5}, "output_dir": str(outputs)}),
        }, flow="faceflow-retrain")
        assert wait_for_state(ui.api_url, retrain, {"Completed"}, timeout=600) == "Completed"
        rows = json.loads((tmp_path / "models" / "leaderboard.json").read_text())
        assert len(rows) == 1 and rows[0]["promoted"] is True and rows[0]["why"] == "first champion"
        with client(ui.api_url) as prefect:
            leaderboard = next(a for a in prefect.read_latest_artifacts() if a.key == "faceflow-leaderboard")
        panel = open_artifact(ui, page, leaderboard.latest_id)
        assert not tables_running_over(page), tables_running_over(page)
        first = panel.get_by_role("row").nth(1)  # the header is row 0
        expect(first.get_by_role("cell")).to_have_text([
            "1", short_time(rows[0]["time"]), str(rows[0]["seed"]), str(rows[0]["faces judged"]),
            f"{rows[0]['validation pixels']:.2f}", "–", "yes",  # no champion to compare with yet
        ])
        expect(panel.get_by_role("listitem").first).to_have_text(
            f"#1 {rows[0]['challenger']}: first champion; run folder {rows[0]['run folder']}")
        page.screenshot(path=str(shots / "07-leaderboard.png"))
