"""How the model does on people it has never seen: every image of a few people held out of PCA and flow.

The folds are drawn from the people of the run's version (tasks.data.new_people_of_fold).
"""

from __future__ import annotations

from collections.abc import Callable


from faceflow.config import BaselineConfig, DataConfig, PCAConfig, TrainConfig
from faceflow.keys import content_key
from tasks.baselines import fit_baseline_models
from tasks.data import new_people_of_fold, new_people_split
from tasks.model import trained_model
from tasks.pca import fit_pca_on, image_log_prob
from tasks.results import Faces, NewPeople, NewPeopleFold
from tasks.score import flow_log_prob
from tasks.train import make_batches, train_flow

def evaluate_fold(
    faces: Faces, people: list[int], data: DataConfig, pca_config: PCAConfig, train: TrainConfig,
    baselines: BaselineConfig, seed: int, device: str, cancelled: Callable[[], bool] = lambda: False,
) -> NewPeopleFold:
    """PCA, flow and baselines fitted as in the run but without ``people``; then all their images scored."""
    split = new_people_split(faces, data, people)
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
        evaluate_fold(faces, new_people_of_fold(data, fold, len(faces.people)), data, pca_config, train, baselines, seed, device, cancelled)
        for fold in range(data.new_people_folds)
    ]
    return NewPeople(content_key("new-people", faces, data, pca_config, train, baselines, seed, device), folds)
