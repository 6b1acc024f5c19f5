"""New people: whole people left out of PCA, flow and baselines, in disjoint seeded folds."""

from __future__ import annotations

import numpy as np
import pytest

from faceflow.config import BaselineConfig, DataConfig, FaceflowConfig, PCAConfig, TrainConfig
from tasks.data import FaceLabels, FacesVersionError, check_config_against, split_indices
from tasks.new_people import evaluate_new_people, new_people_of_fold, new_people_split

def test_folds_hold_disjoint_people_drawn_from_the_split_seed() -> None:
    config = DataConfig(new_people_per_fold=4, new_people_folds=10)
    folds = [new_people_of_fold(config, fold, 40) for fold in range(10)]
    assert sorted(person for fold in folds for person in fold) == list(range(40))
    assert new_people_of_fold(config.model_copy(update={"new_people_folds": 1}), 0, 40) == folds[0]
    assert new_people_of_fold(DataConfig(split_seed=1), 0, 40) != folds[0]
    # Drawn from the people present: a version of 44 people draws from all 44.
    wide = [new_people_of_fold(DataConfig(new_people_per_fold=11, new_people_folds=4), fold, 44) for fold in range(4)]
    assert sorted(person for fold in wide for person in fold) == list(range(44))


def test_a_version_with_too_few_people_for_the_folds_is_refused_saying_how_many_are_needed(faces) -> None:
    keep = [i for i in range(400) if faces.target[i] < 9]
    labels = FaceLabels.of([faces.image_ids[i] for i in keep], [faces.people[faces.target[i]] for i in keep])
    config = FaceflowConfig(data=DataConfig(new_people_per_fold=4, new_people_folds=2), interpolate={"face_b": "olivetti-08:0"})
    with pytest.raises(FacesVersionError, match=r"data.new_people_per_fold .* 9 people.* at least 10 are needed"):
        check_config_against(labels, config)
    check_config_against(labels, config.model_copy(update={"data": DataConfig(new_people_per_fold=7)}))  # 7 + 2 = 9


def test_new_people_split_leaves_every_image_of_them_out_and_keeps_the_rest_of_the_run_split(faces) -> None:
    TARGET = faces.target
    config = DataConfig()
    people = [3, 17, 22, 39]
    split = new_people_split(faces, config, people)
    run = split_indices(faces, config)
    assert sorted(split.heldout.tolist()) == [i for i in range(400) if TARGET[i] in people]
    assert not np.isin(TARGET[np.concatenate([split.fit, split.validation])], people).any()
    assert np.array_equal(split.fit, run.fit[~np.isin(TARGET[run.fit], people)])
    assert np.array_equal(split.validation, run.validation[~np.isin(TARGET[run.validation], people)])


def test_evaluation_scores_every_image_of_each_new_person(faces) -> None:
    data = DataConfig(new_people_per_fold=3, new_people_folds=2)
    quick = TrainConfig(epochs=2, num_layers=2, hidden_units=16, device="cpu")
    result = evaluate_new_people(faces, data, PCAConfig(), quick, BaselineConfig(gmm_max_components=2), seed=0, device="cpu")
    assert [fold.people for fold in result.folds] == [new_people_of_fold(data, 0, 40), new_people_of_fold(data, 1, 40)]
    assert len(result.person_flow_log_prob) == 6 and np.isfinite(result.person_flow_log_prob).all()
    # Every person has 10 images, so a fold's mean is the mean of its people's means.
    for fold in result.folds:
        assert fold.flow_log_prob == pytest.approx(np.mean(fold.person_flow_log_prob))
    assert set(result.folds[0].baseline_log_prob) == {"diagonal Gaussian", "GaussianMixture", "Gaussian KDE"}
    assert result.baseline_log_prob("Gaussian KDE") == pytest.approx(
        np.mean([fold.baseline_log_prob["Gaussian KDE"] for fold in result.folds])
    )


def test_tuning_new_people_folds_share_no_person_with_the_fit_faces_and_read_no_held_out_image(faces) -> None:
    """The quality bench's new-people validation folds (bench/quality.py) and confirmation folds."""
    from bench.quality import Part, part_split, parts
    from tasks.data import tuning_split_indices

    TARGET = faces.target
    new_parts = [part for part in parts() if part.kind == "new"]
    assert {(part.stage, part.split_seed) for part in new_parts} == {("tuning", 0), ("tuning", 1), ("tuning", 2), ("confirmation", 10)}
    for part in new_parts:
        split, people = part_split(faces, part)
        fitted = np.concatenate([split.fit, split.validation])
        assert len(people) == 4 and not np.isin(TARGET[fitted], people).any()
        assert sorted(split.heldout.tolist()) == np.flatnonzero(np.isin(TARGET, people)).tolist()
        if part.stage == "tuning":  # fitted on the tuning split's training images: no held-out or judge image is read
            tuning = tuning_split_indices(faces, DataConfig(split_seed=part.split_seed))
            assert np.isin(fitted, np.concatenate([tuning.fit, tuning.validation])).all()
    # The folds of one split hold disjoint people, 20 of the 40.
    folds = [part_split(faces, part)[1] for part in new_parts if part.split_seed == 0]
    assert len({person for fold in folds for person in fold}) == 20
    assert part_split(faces, Part("tuning", "known", 0))[1] == []
