"""Report pieces on small data: non-finite values are reported, never crash; writes are atomic."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from artifacts import figures
from artifacts.run_folder import write_run_folder
from artifacts.report import (
    FIGURES, comparison_table, conclusions, generalisation_table, image_comparison_table, markdown_table, report_markdown,
)
from artifacts.tables import readable, readable_rows

METRICS = {
    "heldout_log_prob": -40.0, "heldout_bits_per_dim": 0.9, "train_seconds": 5.0, "best_epoch": 90.0,
    "epochs": 100.0, "n_components": 64.0, "heldout_nonfinite": 0.0, "nonfinite_steps": 0.0,
    "sample_nearest_distance_median": 0.10, "heldout_nearest_distance_median": 0.08,
    "samples_closer_than_any_heldout": 0.0, "new_people_log_prob": -60.0, "new_people_count": 4.0, "new_people_folds": 1.0,
    "heldout_image_log_prob": 5300.0, "heldout_image_bits_per_pixel": -1.867, "new_people_image_log_prob": 5100.0,
    "pca_residual_variance": 0.00185, "fit_log_prob": -5.0, "fit_image_log_prob": 5500.0,
}
BASELINES = pd.DataFrame([
    {"method": "diagonal Gaussian", "heldout_log_prob": -56.0, "new_people_log_prob": -70.0, "bits_per_dim": 1.26,
     "train_seconds": 0.0, "heldout_image_log_prob": 5284.0, "new_people_image_log_prob": 5090.0, "bits_per_pixel": -1.861,
     "detail": ""},
    {"method": "GaussianMixture", "heldout_log_prob": -30.0, "new_people_log_prob": -65.5, "bits_per_dim": 0.7,
     "train_seconds": 1.0, "heldout_image_log_prob": 5310.0, "new_people_image_log_prob": 5094.5, "bits_per_pixel": -1.870,
     "detail": ""},
    {"method": "lab recipe", "heldout_log_prob": -50.0, "new_people_log_prob": float("nan"), "bits_per_dim": 1.1,
     "train_seconds": 15.0, "heldout_image_log_prob": 5290.0, "new_people_image_log_prob": float("nan"),
     "bits_per_pixel": -1.863, "detail": ""},
])


def test_conclusions_follow_the_numbers() -> None:
    lines = conclusions(METRICS, BASELINES)
    assert any("beats the diagonal Gaussian (-56.00) by 16.00" in line for line in lines)
    assert any("falls short of the GaussianMixture (-30.00) by 10.00" in line for line in lines)
    assert any("not copies" in line for line in lines)
    assert not any("--include-lab-recipe" in line for line in lines)
    assert any("--include-lab-recipe" in line for line in conclusions(METRICS, BASELINES.iloc[:2]))
    memorised = conclusions(METRICS | {"samples_closer_than_any_heldout": 0.75}, BASELINES)
    assert any("look memorised" in line for line in memorised)


def test_new_people_are_reported_beside_the_known_people_against_the_best_baseline_there() -> None:
    lines = conclusions(METRICS, BASELINES)
    line = next(line for line in lines if "4 people left out" in line)
    assert "1 fold," in line and "-60.00 nats per face, against -40.00" in line
    assert "beats the best baseline, the GaussianMixture (-65.50), by 5.50" in line
    table = markdown_table(comparison_table(METRICS, BASELINES))
    assert table.splitlines()[0].startswith("| method | heldout_log_prob | new_people_log_prob |")
    assert "| lab recipe | -50.00 | n/a |" in table


def test_image_space_figures_are_a_second_narrow_table_beside_the_pca_space_one() -> None:
    pca_table = markdown_table(comparison_table(METRICS, BASELINES).drop(columns="detail"))
    image_table = markdown_table(image_comparison_table(METRICS, BASELINES), decimals={"bits_per_pixel": 4})
    assert "image" not in pca_table.splitlines()[0] and "bits_per_pixel" not in pca_table
    assert image_table.splitlines()[0] == "| method | heldout_image_log_prob | new_people_image_log_prob | bits_per_pixel |"
    assert "| faceflow RealNVP | 5300.00 | 5100.00 | -1.8670 |" in image_table
    assert "| lab recipe | 5290.00 | n/a | -1.8630 |" in image_table
    links = {name: f"{name}.png" for name in FIGURES}
    report = report_markdown(METRICS, comparison_table(METRICS, BASELINES), [], links, "run-x", image_comparison_table(METRICS, BASELINES))
    assert report.index(pca_table) < report.index(image_table)
    line = next(line for line in conclusions(METRICS, BASELINES) if line.startswith("In image space"))
    assert "5300.00 nats per held-out face (-1.867 bits/pixel) and 5100.00 per new person's face" in line


def test_the_report_sets_fit_held_out_and_new_people_side_by_side_with_the_gaps() -> None:
    table = generalisation_table(METRICS)
    assert table.faces.tolist() == ["fit faces", "held-out images of known people", "every image of new people"]
    assert table.log_prob.tolist() == [-5.0, -40.0, -60.0] and table.below_fit.tolist() == [0.0, 35.0, 55.0]
    assert table.image_below_fit.tolist() == [0.0, 200.0, 400.0]
    report = report_markdown(METRICS, comparison_table(METRICS, BASELINES), [], {name: name for name in FIGURES}, "run-x")
    assert "## Generalisation" in report and markdown_table(table) in report
    line = next(line for line in conclusions(METRICS, BASELINES) if line.startswith("Generalisation"))
    assert "35.00 nats of memorisation (fit - held-out), then 20.00 more to new people" in line


def test_non_finite_log_prob_is_shown_not_crashed_on() -> None:
    metrics = METRICS | {"heldout_log_prob": -math.inf, "heldout_nonfinite": 3.0}
    lines = conclusions(metrics, BASELINES)
    assert any("undefined" in line for line in lines) and any("3 held-out faces" in line for line in lines)
    table = markdown_table(comparison_table(metrics, BASELINES))
    assert "| -inf |" in table
    histogram = figures.log_prob_histogram({"heldout": np.array([-40.0, -np.inf, -41.0]), "fit": np.array([-35.0, -36.0])})
    assert figures.png_bytes(histogram).startswith(b"\x89PNG")
    assert "1 non-finite" in histogram.axes[0].get_legend().get_texts()[0].get_text()
    assert readable_rows([{"log_prob": -np.inf}, {"log_prob": -1.5}]) == [{"log_prob": "-inf"}, {"log_prob": -1.5}]


def test_table_numbers_are_rounded_to_four_significant_digits() -> None:
    assert readable(-57.06225485801697) == -57.06 and readable(122.80591844699984) == 122.8
    assert readable(np.float64(0.000123456)) == 0.0001235 and readable(0.0) == 0.0
    assert readable(7) == 7 and readable("GaussianMixture") == "GaussianMixture" and readable(float("nan")) == "nan"


def test_run_folder_is_all_or_nothing(tmp_path: Path) -> None:
    destination = tmp_path / "run-abc"
    with pytest.raises(FileNotFoundError):
        write_run_folder(destination, {"report.md": b"ok", "missing/dir.png": b"boom"})
    assert list(tmp_path.iterdir()) == []
    write_run_folder(destination, {"report.md": b"first"})
    write_run_folder(destination, {"report.md": b"second"})
    assert (destination / "report.md").read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["run-abc"]
    assert sorted(p.name for p in destination.iterdir()) == ["manifest.json", "report.md"]


def test_montage_places_every_image() -> None:
    images = np.stack([np.full((4, 4), value, dtype=np.float32) for value in (0.0, 0.25, 0.5)])
    canvas = figures.montage(images, columns=2, gap=1)
    assert canvas.shape == (9, 9)
    assert canvas[0, 0] == 0.0 and canvas[0, 5] == 0.25 and canvas[5, 0] == 0.5 and canvas[5, 5] == 1.0
