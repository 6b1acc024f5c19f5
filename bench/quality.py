"""Model quality under the tuning protocol (docs/quality.md).

Recipes are compared on **tuning splits**, scored on validation faces only (``tuning_split_indices``:
the held-out faces are dropped, and the default split's validation image of each person judges).
**Confirmation splits** are split seeds no choice was ever made on; their held-out faces are scored
once, here, for the previous and the new default side by side, with every baseline. **New people**
are whole people left out of PCA, flow and baselines, in disjoint folds on the first confirmation split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from faceflow.config import DataConfig, FaceflowConfig, TrainConfig
from tasks.baselines import fit_baseline_models
from tasks.data import load_faces, split_indices, tuning_split_indices
from tasks.model import trained_model
from tasks.new_people import evaluate_new_people
from tasks.pca import fit_pca_on
from tasks.results import Faces, FittedPCA, Split
from tasks.score import bits_per_dim, flow_log_prob
from tasks.train import make_batches, train_flow

TUNING_SPLITS = (0, 1, 2)
CONFIRMATION_SPLITS = (10, 11, 12, 13, 14)
NEW_PEOPLE_FOLDS = 5  # 4 people each: 20 of the 40 people, each left out once
FLOW = "faceflow RealNVP"

# The recipe before issue 13, as a preset: PCA and flow on 7 images per person, early stopping on
# an eighth, three couplings, every fit face in each batch. Everything else is as today's defaults.
PREVIOUS_DEFAULT = FaceflowConfig(
    data=DataConfig(validation_fraction=0.1),
    train=TrainConfig(num_layers=3, batch_size=280),
)
RECIPES = {"previous default": PREVIOUS_DEFAULT, "new default": FaceflowConfig()}

TARGETS = [  # (figure, target)
    ("new default - previous default, mean held-out log p over the confirmation splits (nats)", ">= 1.0"),
    ("new default - Gaussian KDE, held-out log p, worst confirmation split (nats)", ">= 9.0"),
    ("new default - Gaussian KDE, new-people log p, mean over folds (nats)", "> 0.0"),
    ("new default / previous default training seconds (best of the confirmation splits)", "<= 1.5"),
]


def _with_split_seed(config: FaceflowConfig, split_seed: int) -> DataConfig:
    return config.data.model_copy(update={"split_seed": split_seed})


def train_and_score(faces: Faces, split: Split, config: FaceflowConfig) -> tuple[FittedPCA, dict]:
    """PCA and flow on the split's fit part, as a run fits them; the flow's mean log p of the held-out part."""
    pca = fit_pca_on(faces, split, config.pca)
    trained = train_flow(make_batches(pca, split, config.train, config.seed), config.train, config.seed, device="cpu")
    log_p = float(flow_log_prob(trained_model(trained), pca.coords[split.heldout]).mean())
    return pca, {"log_prob": log_p, "train_seconds": trained.seconds, "best_epoch": trained.best_epoch}


def tuning_rows(faces: Faces, recipes: dict[str, FaceflowConfig] = RECIPES) -> list[dict]:
    """Each recipe on each tuning split, judged on validation faces: the only score a choice may use."""
    rows = []
    for split_seed in TUNING_SPLITS:
        for name, config in recipes.items():
            split = tuning_split_indices(faces, _with_split_seed(config, split_seed))
            _, scored = train_and_score(faces, split, config)
            rows.append({"recipe": name, "split_seed": split_seed, "validation_log_prob": scored["log_prob"],
                         "train_seconds": scored["train_seconds"]})
    return rows


def confirmation_rows(faces: Faces, recipes: dict[str, FaceflowConfig] = RECIPES, lab_recipe: bool = True) -> list[dict]:
    """Each recipe and its baselines (fitted on that recipe's split) on each confirmation split's held-out faces.

    The recipes alternate on every split, so both see the same drifts of a shared machine. The lab
    recipe is trained once per split, on the new default's split.
    """
    rows = []
    for split_seed in CONFIRMATION_SPLITS:
        for name, config in recipes.items():
            split = split_indices(faces, _with_split_seed(config, split_seed))
            pca, scored = train_and_score(faces, split, config)
            rows.append({"recipe": name, "method": FLOW, "split_seed": split_seed, "heldout_log_prob": scored["log_prob"],
                         "bits_per_dim": bits_per_dim(scored["log_prob"], pca.n_components),
                         "train_seconds": scored["train_seconds"], "detail": f"best epoch {scored['best_epoch']}"})
            baselines = config.baselines.model_copy(update={"include_lab_recipe": lab_recipe and name == "new default"})
            for result in fit_baseline_models(pca, split, baselines, config.seed).results:
                rows.append({"recipe": name, "method": result.name, "split_seed": split_seed,
                             "heldout_log_prob": result.heldout_log_prob,
                             "bits_per_dim": bits_per_dim(result.heldout_log_prob, pca.n_components),
                             "train_seconds": result.train_seconds, "detail": result.detail})
    return rows


def new_people_rows(faces: Faces, config: FaceflowConfig = RECIPES["new default"]) -> list[dict]:
    """One row per fold of people on the first confirmation split: flow and baselines on all their images."""
    data = _with_split_seed(config, CONFIRMATION_SPLITS[0]).model_copy(update={"new_people_folds": NEW_PEOPLE_FOLDS})
    result = evaluate_new_people(faces, data, config.pca, config.train, config.baselines, config.seed, "cpu")
    return [
        {"fold": index, "people": fold.people, "flow": fold.flow_log_prob, **fold.baseline_log_prob,
         "flow_minus_kde": fold.flow_log_prob - fold.baseline_log_prob["Gaussian KDE"], "train_seconds": fold.train_seconds}
        for index, fold in enumerate(result.folds)
    ]


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± sd (over confirmation splits) per recipe and method."""
    summary = []
    for recipe, method in dict.fromkeys((row["recipe"], row["method"]) for row in rows):
        picked = [row for row in rows if row["recipe"] == recipe and row["method"] == method]
        values = np.array([row["heldout_log_prob"] for row in picked])
        summary.append({"recipe": recipe, "method": method, "splits": len(values), "mean": float(values.mean()),
                        "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                        "worst": float(values.min()), "best": float(values.max()),
                        "mean_train_seconds": float(np.mean([row["train_seconds"] for row in picked]))})
    return summary


def _by_split(rows: list[dict], recipe: str, method: str) -> dict[int, dict]:
    return {row["split_seed"]: row for row in rows if row["recipe"] == recipe and row["method"] == method}


def check_targets(confirmation: list[dict], new_people: list[dict]) -> list[dict]:
    """The issue's four targets, from this run's numbers."""
    new, previous = _by_split(confirmation, "new default", FLOW), _by_split(confirmation, "previous default", FLOW)
    kde = _by_split(confirmation, "new default", "Gaussian KDE")
    gain = np.mean([row["heldout_log_prob"] for row in new.values()]) - np.mean([row["heldout_log_prob"] for row in previous.values()])
    margins = [new[seed]["heldout_log_prob"] - kde[seed]["heldout_log_prob"] for seed in new]
    unseen = np.array([row["flow_minus_kde"] for row in new_people])
    time_ratio = min(row["train_seconds"] for row in new.values()) / min(row["train_seconds"] for row in previous.values())
    values = [
        (float(gain), gain >= 1.0, ""),
        (float(min(margins)), min(margins) >= 9.0, "per split: " + ", ".join(f"{m:.2f}" for m in margins)),
        (float(unseen.mean()), unseen.mean() > 0.0,
         f"sd over {len(unseen)} folds {unseen.std(ddof=1):.2f}, worst fold {unseen.min():.2f}" if len(unseen) > 1 else ""),
        (float(time_ratio), time_ratio <= 1.5, ""),
    ]
    return [{"figure": figure, "value": value, "target": target, "met": bool(met), "spread": spread}
            for (figure, target), (value, met, spread) in zip(TARGETS, values, strict=True)]


def quality_report(data_file: Path, lab_recipe: bool = True) -> dict[str, list[dict]]:
    """Everything `make bench` reports on quality: tuning, confirmation, new people, targets."""
    faces = load_faces(data_file)
    tuning = tuning_rows(faces)
    confirmation = confirmation_rows(faces, lab_recipe=lab_recipe)
    new_people = new_people_rows(faces)
    return {"tuning": tuning, "confirmation": confirmation, "confirmation_summary": summarise(confirmation),
            "new_people": new_people, "quality_targets": check_targets(confirmation, new_people)}
