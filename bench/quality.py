"""Model quality under the tuning protocol (docs/quality.md).

Choices are made on **tuning splits** only, on two kinds of unseen face: the validation images of
known people (``tuning_split_indices``: the held-out images are dropped, never read) and every
image of **new people**, whole people left out of the tuning split in disjoint folds. **Confirmation
splits** are split seeds no choice was ever made on; their held-out images, and the new people of
the first one's folds, are scored once, here.

Every figure is computed for the previous and the new default recipe side by side, with every
baseline fitted on the same faces, and for the new default at each component count (the count is
compared in image space, where models of different PCAs score the same pixels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from joblib import Parallel, delayed

from faceflow.config import BaselineConfig, FaceflowConfig, PCAConfig, TrainConfig
from faceflow.threads import limited_threads
from tasks.baselines import fit_baseline_models
from tasks.data import load_faces, new_people_of_fold, new_people_split, split_indices, tuning_split_indices
from tasks.model import trained_model
from tasks.pca import fit_pca_on, image_log_prob
from tasks.results import Faces, Split
from tasks.score import flow_log_prob
from tasks.train import make_batches, train_flow

TUNING_SPLITS = (0, 1, 2)
CONFIRMATION_SPLITS = (10, 11, 12, 13, 14)
NEW_PEOPLE_FOLDS = 5  # 4 people each: 20 of the 40 people per split, each left out once
COMPONENT_COUNTS = (16, 32, 64, 128)
RULE = "variance rule"  # the seed's rule: 90% of the variance, rounded to the nearest power of two
FLOW = "faceflow RealNVP"
BASELINES = ("diagonal Gaussian", "GaussianMixture", "Gaussian KDE")
# The criterion every choice is made by, on the tuning splits: the best new-people validation figure
# among the candidates whose known-people validation figure is within this many nats per face of
# the previous default's (flow - best baseline for recipes; the flow's image-space log p for counts).
KNOWN_PEOPLE_TOLERANCE = 2.0

# The default before issue 19: one flow of 4 couplings of 256 units, 700 epochs on the fit faces alone, no Gaussian floor, the
# components by the variance rule.
PREVIOUS_DEFAULT = FaceflowConfig(
    train=TrainConfig(epochs=700, num_layers=4, hidden_units=256, members=1, mirror=False, gaussian_weight=0.0),
    pca=PCAConfig(n_components=None),
)
NEW_DEFAULT = FaceflowConfig()
RECIPES = {"previous default": PREVIOUS_DEFAULT, "new default": NEW_DEFAULT}

TARGETS = [  # (figure, target)
    ("new people, new default - best baseline, mean over the confirmation folds (nats)", ">= 2.0"),
    ("new people, new default - best baseline, worst confirmation fold (nats)", ">= -1.0"),
    ("known people, new default - Gaussian KDE, held-out log p, worst confirmation split (nats)", ">= 9.0"),
    ("training seconds, new default / previous default (best of the confirmation splits)", "<= 1.5"),
    ("component count of the default = the count the criterion picks on the tuning splits", "equal"),
]


@dataclass(frozen=True)
class Part:
    """One set of faces to fit and judge: a split's known people, or one fold of its new people."""

    stage: str  # "tuning" (choices are made on it) or "confirmation" (scored once)
    kind: str  # "known": validation (tuning) or held-out (confirmation) images; "new": every image of a fold's people
    split_seed: int
    fold: int | None = None


def parts() -> list[Part]:
    """Every part the quality bench scores: tuning splits with their new-people folds, then confirmation."""
    tuning = [Part("tuning", kind, seed, fold) for seed in TUNING_SPLITS
              for kind, fold in [("known", None), *(("new", f) for f in range(NEW_PEOPLE_FOLDS))]]
    confirmation = [Part("confirmation", "known", seed) for seed in CONFIRMATION_SPLITS]
    confirmation += [Part("confirmation", "new", CONFIRMATION_SPLITS[0], f) for f in range(NEW_PEOPLE_FOLDS)]
    return tuning + confirmation


def part_split(faces: Faces, part: Part) -> tuple[Split, list[int]]:
    """The part's split (what is fitted, what is judged as ``heldout``) and its new people, if any."""
    data = NEW_DEFAULT.data.model_copy(update={"split_seed": part.split_seed})
    tuning = part.stage == "tuning"
    if part.kind == "known":
        return (tuning_split_indices if tuning else split_indices)(faces, data), []
    people = new_people_of_fold(data, part.fold, len(faces.people))
    return new_people_split(faces, data, people, tuning=tuning), people


def score_part(faces: Faces, part: Part, lab_recipe: bool = True) -> list[dict]:
    """Flow(s) and baselines at every component count on one part: one row per model, PCA and image space.

    Both recipes are trained at the previous default's count (the variance rule); the new default
    alone at the others. The rule's count is one of the listed ones on the Olivetti splits; its
    rows then repeat that count's numbers instead of training the same models again.
    """
    with limited_threads(NEW_DEFAULT.threads):
        split, people = part_split(faces, part)
        where = {"stage": part.stage, "kind": part.kind, "split_seed": part.split_seed, "fold": part.fold, "people": people}
        rows: list[dict] = []
        by_count: dict[int, list[dict]] = {}
        for components in (RULE, *COMPONENT_COUNTS):
            pca = fit_pca_on(faces, split, PCAConfig(n_components=None if components == RULE else components))
            label = {"components": str(components), "n_components": pca.n_components}
            if components != RULE and pca.n_components in by_count and by_count[pca.n_components]:
                rows += [row | label for row in by_count[pca.n_components]]  # the rule's models, already trained
                continue
            recipes = RECIPES if components == RULE else {"new default": NEW_DEFAULT}
            made = []
            for name, config in recipes.items():
                trained = train_flow(make_batches(pca, split, config.train, config.seed), config.train, config.seed, device="cpu")
                log_p = flow_log_prob(trained_model(trained), pca.coords[split.heldout])
                made.append({"recipe": name, "method": FLOW, "log_prob": float(log_p.mean()),
                             "image_log_prob": float(image_log_prob(pca, log_p, split.heldout).mean()),
                             "train_seconds": trained.seconds, "detail": f"best epoch {trained.best_epoch}"})
            with_lab = lab_recipe and components == RULE and part == Part("confirmation", "known", part.split_seed)
            baselines = BaselineConfig(include_lab_recipe=with_lab)
            for result in fit_baseline_models(pca, split, baselines, NEW_DEFAULT.seed).results:
                made.append({"recipe": "", "method": result.name, "log_prob": result.heldout_log_prob,
                             "image_log_prob": result.heldout_image_log_prob, "train_seconds": result.train_seconds,
                             "detail": result.detail})
            made = [where | row for row in made]
            rows += [row | label for row in made]
            if components == RULE:
                by_count[pca.n_components] = [row for row in made if row["recipe"] != "previous default"]
        return rows


def all_rows(faces: Faces, lab_recipe: bool = True, jobs: int = 2) -> pd.DataFrame:
    """Every part scored, ``jobs`` parts at a time (each in its own process, on one thread)."""
    scored = Parallel(n_jobs=jobs)(delayed(score_part)(faces, part, lab_recipe) for part in parts())
    return pd.DataFrame([row for rows in scored for row in rows])


def _gaps(rows: pd.DataFrame, recipe: str) -> pd.DataFrame:
    """Per part and component count: the flow's figures, each baseline's, and flow - best baseline.

    The best baseline is the one with the best mean over the parts of each stage, kind and count;
    gaps are against it on every part (so "the worst fold" is against that same baseline).
    """
    keys = ["stage", "kind", "split_seed", "fold", "components"]
    flow = rows[(rows.method == FLOW) & (rows.recipe == recipe)].set_index(keys)
    table = flow[["log_prob", "image_log_prob", "train_seconds", "n_components"]].copy()
    for name in BASELINES:
        table[name] = rows[rows.method == name].set_index(keys)["log_prob"]
        table[f"{name} image"] = rows[rows.method == name].set_index(keys)["image_log_prob"]
    table = table.reset_index()
    best = table.groupby(["stage", "kind", "components"])[list(BASELINES)].mean().idxmax(axis=1).rename("best_baseline")
    table = table.join(best, on=["stage", "kind", "components"])
    table["best_baseline_log_prob"] = [row[row.best_baseline] for _, row in table.iterrows()]
    table["flow_minus_best"] = table.log_prob - table.best_baseline_log_prob
    table["flow_minus_kde"] = table.log_prob - table["Gaussian KDE"]
    table.insert(0, "recipe", recipe)
    return table


def summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean over parts, per recipe, stage, kind and count: the figures choices and targets read."""
    frames = [_gaps(rows, recipe) for recipe in RECIPES]
    table = pd.concat(frames, ignore_index=True)
    grouped = table.groupby(["recipe", "stage", "kind", "components"], sort=False)
    out = grouped.agg(
        parts=("log_prob", "size"), n_components=("n_components", "first"), flow=("log_prob", "mean"),
        flow_image=("image_log_prob", "mean"), best_baseline=("best_baseline", "first"),
        best_baseline_log_prob=("best_baseline_log_prob", "mean"), flow_minus_best=("flow_minus_best", "mean"),
        worst_flow_minus_best=("flow_minus_best", "min"), flow_minus_kde=("flow_minus_kde", "mean"),
        worst_flow_minus_kde=("flow_minus_kde", "min"), train_seconds=("train_seconds", "mean"),
        best_train_seconds=("train_seconds", "min"),
        **{f"{name} image": (f"{name} image", "mean") for name in BASELINES},
    )
    return out.reset_index()


def chosen_count(summary_table: pd.DataFrame) -> str:
    """The component count (of COMPONENT_COUNTS) the criterion picks on the tuning splits, in image space.

    The best new-people image-space log p of the new default's flow among the counts whose
    known-people validation figure is within KNOWN_PEOPLE_TOLERANCE of the previous default's.
    """
    tuning = summary_table[(summary_table.stage == "tuning") & (summary_table.components != RULE)]
    new = tuning[(tuning.recipe == "new default") & (tuning.kind == "new")].set_index("components").flow_image
    known = tuning[(tuning.recipe == "new default") & (tuning.kind == "known")].set_index("components").flow_image
    reference = summary_table[(summary_table.stage == "tuning") & (summary_table.recipe == "previous default")
                              & (summary_table.kind == "known")].flow_image.iloc[0]
    allowed = known.index[known >= float(reference) - KNOWN_PEOPLE_TOLERANCE]
    return str(new[allowed].idxmax())


def default_counts(rows: pd.DataFrame) -> list[int]:
    """The component counts the default PCA settings gave on the parts (the variance rule's, unless pinned)."""
    if NEW_DEFAULT.pca.n_components is not None:
        return [NEW_DEFAULT.pca.n_components]
    return sorted(set(int(count) for count in rows[rows.components == RULE].n_components))


def check_targets(summary_table: pd.DataFrame, rows: pd.DataFrame) -> list[dict]:
    """The issue's targets, from this run's numbers (the default recipe at the default count)."""
    count = RULE if NEW_DEFAULT.pca.n_components is None else str(NEW_DEFAULT.pca.n_components)
    new_default = _gaps(rows, "new default")
    new_default = new_default[(new_default.stage == "confirmation") & (new_default.components == count)]
    folds = new_default[new_default.kind == "new"]
    known = new_default[new_default.kind == "known"]
    confirmation = summary_table[(summary_table.stage == "confirmation") & (summary_table.kind == "known")]
    seconds = confirmation.set_index(["recipe", "components"]).best_train_seconds
    ratio = seconds[("new default", count)] / seconds[("previous default", RULE)]
    picked, defaults = chosen_count(summary_table), default_counts(rows)
    values = [
        (float(folds.flow_minus_best.mean()), folds.flow_minus_best.mean() >= 2.0,
         f"against the {folds.best_baseline.iloc[0]}; per fold: " + ", ".join(f"{v:+.2f}" for v in folds.flow_minus_best)),
        (float(folds.flow_minus_best.min()), folds.flow_minus_best.min() >= -1.0, ""),
        (float(known.flow_minus_kde.min()), known.flow_minus_kde.min() >= 9.0,
         "per split: " + ", ".join(f"{v:.2f}" for v in known.flow_minus_kde)),
        (float(ratio), ratio <= 1.5, f"{seconds[('new default', count)]:.2f} s / {seconds[('previous default', RULE)]:.2f} s"),
        (", ".join(map(str, defaults)), [int(picked)] == defaults,
         f"the criterion picks {picked}; the default ({count}) gave {', '.join(map(str, defaults))} on every part"),
    ]
    return [{"figure": figure, "value": value, "target": target, "met": bool(met), "spread": spread}
            for (figure, target), (value, met, spread) in zip(TARGETS, values, strict=True)]


def quality_report(data_file: Path, lab_recipe: bool = True, jobs: int = 2) -> dict[str, list[dict]]:
    """Everything `make bench` reports on quality: every part's rows, the summary, the targets."""
    faces = load_faces(data_file)
    rows = all_rows(faces, lab_recipe, jobs)
    table = summary(rows)
    columns = ["recipe", "stage", "kind", "components", "n_components", "parts", "flow", "flow_image", "best_baseline",
               "flow_minus_best", "worst_flow_minus_best", "flow_minus_kde", "worst_flow_minus_kde", "train_seconds"]
    return {
        "quality_rows": rows.to_dict("records"),
        "quality_summary": table[columns].to_dict("records"),
        "component_counts": table[table.recipe == "new default"][
            ["stage", "kind", "components", "n_components", "flow_image", *(f"{name} image" for name in BASELINES)]
        ].to_dict("records"),
        "chosen_components": [{"criterion": f"best new-people image-space log p, known people within "
                               f"{KNOWN_PEOPLE_TOLERANCE} nats of the previous default", "picked": chosen_count(table),
                               "default": ", ".join(map(str, default_counts(rows)))}],
        "quality_targets": check_targets(table, rows),
    }
