"""How the model does on people it has never seen: every image of a few people held out of PCA and flow."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from faceflow.config import N_PEOPLE, BaselineConfig, DataConfig, PCAConfig, TrainConfig
from faceflow.keys import content_key
from tasks.baselines import fit_baseline_models
from tasks.data import split_indices
from tasks.model import trained_model
from tasks.pca import fit_pca_on, image_log_prob
from tasks.results import Faces, NewPeople, NewPeopleFold, Split
from tasks.score import flow_log_prob
from tasks.train import make_batches, train_flow

# Draws the people of the folds; apart from the split's own stream so that changing the fold
# settings never moves which images of the known people are held out.
_PEOPLE_STREAM = 1


def new_people_of_fold(config: DataConfig, fold: int) -> list[int]:
    """The people fold ``fold`` leaves out: disjoint across folds, drawn from the split seed."""
    order = np.random.default_rng((config.split_seed, _PEOPLE_STREAM)).permutation(N_PEOPLE)
    size = config.new_people_per_fold
    return sorted(int(person) for person in order[fold * size : (fold + 1) * size])


def new_people_split(target: np.ndarray, config: DataConfig, people: list[int]) -> Split:
    """The run's split without ``people``; their every image becomes the held-out part."""
    known = split_indices(target, config)
    new = np.isin(target, people)
    parts = [part[~new[part]] for part in (known.fit, known.validation)]
    heldout = np.flatnonzero(new)
    return Split(content_key("new-people-split", *(p.tolist() for p in parts), heldout.tolist()), *parts, heldout)


def evaluate_fold(
    faces: Faces, people: list[int], data: DataConfig, pca_config: PCAConfig, train: TrainConfig,
    baselines: BaselineConfig, seed: int, device: str, cancelled: Callable[[], bool] = lambda: False,
) -> NewPeopleFold:
    """PCA, flow and baselines fitted as in the run but without ``people``; then all their images scored."""
    split = new_people_split(faces.target, data, people)
    pca = fit_pca_on(faces, split, pca_config)
    trained = train_flow(make_batches(pca, split, train, seed), train, seed, device=device, cancelled=cancelled)
    log_p = flow_log_prob(trained_model(trained), pca.coords[split.heldout])
    image_log_p = image_log_prob(pca, log_p, split.heldout)  # through this fold's PCA, which never saw them
    heldout_people = faces.target[split.heldout]
    # The lab recipe takes 15 s and is no baseline worth beating; the new-people figure leaves it out.
    fitted = fit_baseline_models(pca, split, baselines.model_copy(update={"include_lab_recipe": False}), seed)
    return NewPeopleFold(
        people=people,
        flow_log_prob=float(log_p.mean()),
        baseline_log_prob={result.name: result.heldout_log_prob for result in fitted.results},
        person_flow_log_prob=[float(log_p[heldout_people == person].mean()) for person in people],
        train_seconds=trained.seconds,
        flow_image_log_prob=float(image_log_p.mean()),
        baseline_image_log_prob={result.name: result.heldout_image_log_prob for result in fitted.results},
    )


def evaluate_new_people(
    faces: Faces, data: DataConfig, pca_config: PCAConfig, train: TrainConfig, baselines: BaselineConfig,
    seed: int, device: str, cancelled: Callable[[], bool] = lambda: False,
) -> NewPeople:
    """``data.new_people_folds`` folds of ``data.new_people_per_fold`` people each; ``cancelled`` stops it early."""
    folds = [
        evaluate_fold(faces, new_people_of_fold(data, fold), data, pca_config, train, baselines, seed, device, cancelled)
        for fold in range(data.new_people_folds)
    ]
    return NewPeople(content_key("new-people", faces, data, pca_config, train, baselines, seed, device), folds)
