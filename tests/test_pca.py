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
