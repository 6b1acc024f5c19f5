from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA

from faceflow.config import DataConfig, PCAConfig
from tasks.data import split_indices
from tasks.pca import choose_n_components, components_for_variance, fit_pca_on, load_estimator, nearest_power_of_two


@pytest.mark.parametrize(("count", "expected"), [(66, 64), (57, 64), (90, 64), (97, 128), (3, 4), (1, 1)])
def test_nearest_power_of_two(count: int, expected: int) -> None:
    assert nearest_power_of_two(count) == expected


def test_ninety_percent_of_all_400_faces_is_66_then_64(faces) -> None:
    pixels = faces.images.reshape(400, -1)
    cumulative = np.cumsum(PCA(svd_solver="full").fit(pixels).explained_variance_ratio_)
    assert components_for_variance(cumulative, 0.90) == PCA(0.90, svd_solver="full").fit(pixels).n_components_ == 66
    assert choose_n_components(cumulative, PCAConfig(variance=0.90)) == (66, 64)


def test_explicit_count_wins_over_variance() -> None:
    cumulative = np.linspace(0.1, 1.0, 100)
    assert choose_n_components(cumulative, PCAConfig(variance=0.5, n_components=10))[1] == 10


def test_pca_is_fitted_on_the_fit_part_only(faces) -> None:
    split = split_indices(faces, DataConfig())
    fitted = fit_pca_on(faces, split, PCAConfig(n_components=16))
    assert fitted.n_components == 16 and fitted.coords.shape == (400, 16)
    np.testing.assert_allclose(load_estimator(fitted).mean_, faces.flat[split.fit].mean(0), atol=1e-6)
    # Coordinates of the fit faces are centred; unseen faces' are not exactly.
    assert np.abs(fitted.coords[split.fit].mean(0)).max() < 1e-3


def test_the_leading_part_of_a_pca_is_the_pca_of_fewer_components(faces) -> None:
    from tasks.pca import leading_part

    pixels = faces.flat[:300]
    cut = leading_part(PCA(svd_solver="full").fit(pixels), 20)
    fitted = PCA(20, svd_solver="full").fit(pixels)
    for name in ("components_", "explained_variance_", "explained_variance_ratio_", "singular_values_", "mean_"):
        np.testing.assert_allclose(getattr(cut, name), getattr(fitted, name), rtol=1e-4, atol=1e-6)
    assert cut.n_components_ == 20 and cut.noise_variance_ == pytest.approx(fitted.noise_variance_, rel=1e-4)
    np.testing.assert_allclose(cut.transform(faces.flat[300:]), fitted.transform(faces.flat[300:]), atol=1e-4)


def test_above_the_exact_limit_a_randomized_pca_keeps_the_same_count_and_nearly_the_same_basis(faces, monkeypatch) -> None:
    """Past EXACT_PCA_MAX_FACES fit faces the leading components come from a randomized SVD."""
    import tasks.pca as pca_module

    split = split_indices(faces, DataConfig())
    exact = fit_pca_on(faces, split, PCAConfig())
    monkeypatch.setattr(pca_module, "EXACT_PCA_MAX_FACES", 100)
    monkeypatch.setattr(pca_module, "RANDOMIZED_START_COMPONENTS", 64)  # 256 is past a quarter of 326 faces' rank
    randomized = fit_pca_on(faces, split, PCAConfig())
    assert len(randomized.cumulative_variance) == 64  # the leading components only: the target needs 62
    assert randomized.n_components == exact.n_components == 64
    assert abs(randomized.components_for_target - exact.components_for_target) <= 1
    np.testing.assert_allclose(randomized.cumulative_variance, exact.cumulative_variance[:64], atol=2e-3)
    # The same subspace: every exact component lies (almost) within the randomized ones.
    exact_basis, randomized_basis = load_estimator(exact).components_, load_estimator(randomized).components_
    kept = np.linalg.norm(exact_basis[:32] @ randomized_basis.T, axis=1)
    assert kept.min() > 0.99
    np.testing.assert_allclose(randomized.residual_variance, exact.residual_variance, rtol=1e-2)


def test_mirror_coordinates_are_the_pca_of_each_face_flipped_left_to_right_and_train_beside_the_fit_faces(faces) -> None:
    from faceflow.config import TrainConfig
    from tasks.train import make_batches

    split = split_indices(faces, DataConfig())
    fitted = fit_pca_on(faces, split, PCAConfig())
    flipped = faces.images[:, :, ::-1].reshape(len(faces.images), -1)  # columns reversed: left and right swap
    np.testing.assert_allclose(fitted.mirror_coords, load_estimator(fitted).transform(flipped), atol=1e-4)
    assert not np.allclose(fitted.mirror_coords, fitted.coords, atol=1e-2)  # not the faces themselves
    plain = make_batches(fitted, split, TrainConfig(mirror=False), seed=0)
    mirrored = make_batches(fitted, split, TrainConfig(mirror=True), seed=0)
    assert np.array_equal(plain.fit, fitted.coords[split.fit])
    # The fit faces and their mirror images, nothing of the validation or held-out faces.
    assert np.array_equal(mirrored.fit, np.concatenate([fitted.coords[split.fit], fitted.mirror_coords[split.fit]]))
    assert np.array_equal(mirrored.validation, plain.validation) and mirrored.key != plain.key
