"""Retraining promotes a challenger exactly when its validation log p beats the champion's; the champion at work."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from commands.runner import flush_to_api
from commands.server import local_server
from conftest import copy_home
from support import LIGHT_TRAIN, client, faceflow

# (epochs, promotion margin): a first champion; a challenger better on validation but by less than
# its (huge) margin; the same recipe again with the usual margin, which it clears.
CHALLENGERS = ((40, 0.5), (250, 100.0), (250, 0.5))


@pytest.fixture(scope="module")
def retrained(tmp_path_factory: pytest.TempPathFactory, data_file: Path, migrated_home: Path) -> dict:
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.variables import Variable

    from flows.retrain import RETRAIN_CONFIG, faceflow_retrain
    from tasks.champion import CHAMPION_VARIABLE

    root = tmp_path_factory.mktemp("retrain")
    models = root / "models"
    previous = os.environ.get("FACEFLOW_MODELS_DIR")
    os.environ["FACEFLOW_MODELS_DIR"] = str(models)
    try:
        home = copy_home(migrated_home, root / "home")
        with local_server(home, timeout=300) as server, temporary_settings({PREFECT_API_URL: server.api_url}):
            results, variables = [], []
            for epochs, margin in CHALLENGERS:
                config = RETRAIN_CONFIG.model_copy(update={
                    "output_dir": root / "outputs", "data": RETRAIN_CONFIG.data.model_copy(update={"data_file": data_file}),
                    "train": RETRAIN_CONFIG.train.model_copy(update={"epochs": epochs, **LIGHT_TRAIN}),
                    "sample": RETRAIN_CONFIG.sample.model_copy(update={"n_samples": 4}),
                })
                results.append(faceflow_retrain(config=config, promotion_margin=margin))
                variables.append(Variable.get(CHAMPION_VARIABLE))
            with client(server.api_url) as prefect:
                leaderboard = prefect.read_latest_artifacts()
            flush_to_api()  # the flows' last logs reach the server before it stops
            yield {"results": results, "variables": variables, "models": models, "api_url": server.api_url,
                   "artifacts": {artifact.key: artifact for artifact in leaderboard}}
    finally:
        if previous is None:
            os.environ.pop("FACEFLOW_MODELS_DIR", None)
        else:
            os.environ["FACEFLOW_MODELS_DIR"] = previous


def test_the_champion_changes_exactly_when_validation_improves_by_the_margin(retrained: dict) -> None:
    results = retrained["results"]
    assert [r.promoted for r in results] == [True, False, True], [r.reason for r in results]
    validation = [r.challenger["validation pixels"] for r in results]
    assert validation[0] < validation[1]  # the rejected challenger was better, just not by its margin
    assert results[0].reason == "first champion" and "not more than the 100-nat margin" in results[1].reason
    assert results[1].champion == results[0].champion  # a rejected challenger leaves the champion untouched
    for result, (_, margin) in zip(results[1:], CHALLENGERS[1:], strict=True):
        row = result.challenger
        gain = row["validation pixels"] - row["champion pixels"]
        assert result.promoted == (gain > margin)
        assert f"{row['validation pixels']:.2f}" in result.reason and f"{row['champion pixels']:.2f}" in result.reason


def _validation_image_log_p(folder: Path, faces, faces_of: Path | None = None) -> float:
    """Mean log p of the pixels, under the model in run folder ``folder``, of the validation faces of run ``faces_of``
    (default: its own): its PCA coordinates' log p plus the residual's isotropic Gaussian, from the folders' files alone.
    """
    import torch

    from tasks.model import load_checkpoint
    from tasks.pca import read_estimator

    validation = json.loads(((faces_of or folder) / "split.json").read_text())["validation"]
    model, _ = load_checkpoint(folder / "model.pt")
    pca = read_estimator((folder / "pca.npz").read_bytes(), "pca.npz")
    variance = json.loads((folder / "metrics.json").read_text())["pca_residual_variance"]
    pixels = faces.flat[validation].astype(np.float64)
    coords = pca.transform(pixels)
    residual = pixels - pca.inverse_transform(coords)
    with torch.no_grad():
        coord_log_p = model.log_prob(torch.from_numpy(coords.astype(np.float32))).double().numpy()
    residual_dim = pixels.shape[1] - coords.shape[1]
    residual_log_p = -0.5 * residual_dim * np.log(2 * np.pi * variance) - (residual**2).sum(1) / (2 * variance)
    return float((coord_log_p + residual_log_p).mean())


def test_the_champion_is_judged_in_image_space_on_validation_faces_neither_model_fitted(retrained: dict, faces) -> None:
    """Both figures each decision compared: the pixels' log p of the challenger's validation faces, recomputed from files."""
    first, second, third = (Path(r.challenger["run folder"]) for r in retrained["results"])
    results = retrained["results"]
    assert _validation_image_log_p(first, faces) == pytest.approx(results[0].challenger["validation pixels"], rel=1e-6)
    champion_split = json.loads((first / "split.json").read_text())
    champion_fit, champion_fit_ids = set(champion_split["fit"]), set(champion_split["fit_ids"])
    # The champion (the first model) re-scored on each later challenger's validation faces.
    for challenger_folder, result in ((second, results[1]), (third, results[2])):
        split = json.loads((challenger_folder / "split.json").read_text())
        validation = split["validation"]
        assert not champion_fit & set(validation) and not champion_fit_ids & set(split["validation_ids"])
        assert result.challenger["faces judged"] == len(validation) > 30  # a tenth of 400, by hash: not exactly 40
        assert result.challenger["faces version"] == json.loads((challenger_folder / "config.json").read_text())["data"]["faces_version"]
        champion_on_them = _validation_image_log_p(first, faces, faces_of=challenger_folder)
        assert result.challenger["champion pixels"] == pytest.approx(champion_on_them, rel=1e-6)
        assert result.challenger["validation pixels"] == pytest.approx(_validation_image_log_p(challenger_folder, faces), rel=1e-6)


def test_faces_the_champion_was_fitted_on_never_judge_it(tmp_path: Path) -> None:
    """A challenger split another way shares faces with the champion's fit part: those are left out of the judging."""
    from tasks.champion import decide, unseen_by_champion

    folder = tmp_path / "champion-x"
    folder.mkdir()
    (folder / "split.json").write_text(json.dumps({"fit": [1, 2, 3], "validation": [4], "heldout": [5]}))
    assert unseen_by_champion(folder, [2, 4, 7]) == [4, 7]
    assert not decide(-1.0, -50.0, 0.5, faces=0).promote  # nothing left to judge on: the champion stays


def test_the_variable_and_the_champion_folder_agree(retrained: dict) -> None:
    from tasks.champion import champion_path, read_champion

    models = retrained["models"]
    record = read_champion(models)
    assert record.to_json() == retrained["variables"][-1] == retrained["results"][-1].champion
    assert retrained["variables"][0] == retrained["variables"][1]  # unchanged by the rejected challenger
    folder = champion_path(models).resolve()
    assert folder.name.startswith("champion-") and {p.name for p in folder.iterdir()} >= {
        "model.pt", "pca.npz", "split.json", "metrics.json", "champion.json"}
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["validation_log_prob"] == pytest.approx(record.validation_log_prob)
    assert (Path(record.run_folder) / "model.pt").read_bytes() == (folder / "model.pt").read_bytes()


def _table_and_list(markdown: str) -> tuple[list[list[str]], list[str]]:
    """A markdown artifact's table rows (cells, header and rule left out) and its list items, in order."""
    lines = markdown.splitlines()
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    return table[2:], [line.removeprefix("- ") for line in lines if line.startswith("- ")]


def test_the_leaderboard_lists_every_challenger(retrained: dict) -> None:
    """The artifact shows every row of models/leaderboard.json, newest first: its numbers in the table, its text below."""
    artifact = retrained["artifacts"]["faceflow-leaderboard"]
    saved = json.loads((retrained["models"] / "leaderboard.json").read_text())
    assert len(saved) == 3 and [row["promoted"] for row in saved] == [True, False, True]  # the file: oldest first
    assert all(row["why"] and row["seed"] for row in saved) and len({row["seed"] for row in saved}) == 3
    table, items = _table_and_list(artifact.data)
    assert artifact.type == "markdown" and len(table) == len(items) == 3
    for cells, item, (number, row) in zip(table, items, list(enumerate(saved, start=1))[::-1], strict=True):
        # The expected cells from the raw numbers, not through the artifact's formatters: a UTC time to the
        # minute, nats to two decimals, no champion to compare the first challenger with.
        day, minute = re.fullmatch(r"(\d{4}-\d\d-\d\d)T(\d\d:\d\d):\d\d\+00:00", row["time"]).groups()
        champion = row["champion pixels"]
        assert (champion is None) == (number == 1) and (champion is None or math.isfinite(champion))
        assert cells == [str(number), f"{day} {minute}", str(row["seed"]), str(row["faces judged"]),
                         f"{row['validation pixels']:.2f}", "–" if champion is None else f"{champion:.2f}",
                         "yes" if row["promoted"] else "no"]
        assert item == f"**#{number}** {row['challenger']}: {row['why']}; run folder `{row['run folder']}`"


def _run(*arguments: str, models: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"FACEFLOW_MODELS_DIR": str(models)}
    return subprocess.run(faceflow(*arguments), env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_faceflow_champion_prints_it(retrained: dict, tmp_path: Path) -> None:
    shown = _run("champion", "--json", models=retrained["models"], cwd=tmp_path)
    assert shown.returncode == 0 and json.loads(shown.stdout) == retrained["variables"][-1] | {"stale": None}


def test_faceflow_sample_draws_from_the_champion(retrained: dict, tmp_path: Path) -> None:
    drawn = _run("sample", "--n", "5", "--out", str(tmp_path / "out"), models=retrained["models"], cwd=tmp_path)
    assert drawn.returncode == 0, drawn.stderr
    faces = np.load(tmp_path / "out" / "samples.npy")
    assert faces.shape == (5, 64, 64) and 0.0 <= faces.min() and faces.max() <= 1.0
    assert (tmp_path / "out" / "samples.png").read_bytes().startswith(b"\x89PNG")


def test_faceflow_score_gives_log_p_of_your_faces(retrained: dict, tmp_path: Path, faces) -> None:
    """Real faces score far higher than their photographic negatives, which PCA maps far from any face."""
    real, negative = tmp_path / "real.npy", tmp_path / "negative.npy"
    np.save(real, faces.images[:6])
    np.save(negative, 1.0 - faces.images[:6].reshape(6, -1))
    scored = [json.loads(_run("score", str(path), "--json", models=retrained["models"], cwd=tmp_path).stdout)
              for path in (real, negative)]
    # The margin depends on the retraining's seed (it folds in the flow run id): 47.8 nats at its lowest
    # seen (CI, 2026-12-06) for this light model; a scorer that ignored its input would give 0.
    assert len(scored[0]["log_prob"]) == 6 and scored[0]["mean"] > scored[1]["mean"] + 20, scored


def _save(path: Path, array: np.ndarray, allow_pickle: bool = False) -> Path:
    np.save(path, array, allow_pickle=allow_pickle)
    return path


BAD_FACES = {
    "wrong shape": (lambda d: _save(d / "small.npy", np.zeros((3, 32, 32))), "shape (3, 32, 32)"),
    "NaN": (lambda d: _save(d / "nan.npy", np.full((2, 64, 64), np.nan)), "non-finite"),
    "out of range": (lambda d: _save(d / "bytes.npy", np.full((2, 4096), 200.0)), "expected [0, 1]"),
    "not a file": (lambda d: d / "absent.npy", "does not exist"),
    "a pickle": (lambda d: _save(d / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True), "not a readable"),
    "text": (lambda d: (d / "notes.npy").write_text("faces") and d / "notes.npy", "not a readable"),
}


@pytest.mark.parametrize("case", list(BAD_FACES))
def test_faceflow_score_refuses_bad_faces_naming_the_file(case: str, tmp_path: Path) -> None:
    make, reason = BAD_FACES[case]
    path = make(tmp_path)
    refused = _run("score", str(path), models=tmp_path / "no-models", cwd=tmp_path)
    assert refused.returncode == 2 and str(path) in refused.stderr and reason in refused.stderr, refused.stderr


def test_without_a_champion_sample_says_how_to_get_one(tmp_path: Path) -> None:
    missing = _run("sample", "--out", str(tmp_path / "out"), models=tmp_path / "empty", cwd=tmp_path)
    assert missing.returncode == 1 and "no champion" in missing.stderr and "retrain" in missing.stderr
