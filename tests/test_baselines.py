"""Baselines: the KDE is the exact density it claims to be, and choices never look at held-out faces."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from scipy.special import logsumexp
from scipy.stats import multivariate_normal, norm
from sklearn.decomposition import PCA

from faceflow.config import BaselineConfig, DataConfig, PCAConfig
from tasks.baselines import diagonal_mixture, fit_baseline_models, gaussian_kde, kde_log_prob, selection_folds
from tasks.data import split_indices
from tasks.pca import fit_pca_on


def _clusters(n_per: int, seed: int, dim: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0] * dim, [6.0] * dim, [-6.0, 6.0] + [0.0] * (dim - 2)])
    return np.concatenate([c + 0.3 * rng.normal(size=(n_per, dim)) for c in centres])


def test_kde_is_the_mean_of_gaussian_densities_around_the_centres() -> None:
    rng = np.random.default_rng(0)
    centres, queries, scale = rng.normal(size=(5, 3)), rng.normal(size=(4, 3)), np.array([0.5, 1.0, 2.0])
    brute = np.log(np.mean([multivariate_normal(c, np.diag((0.7 * scale) ** 2)).pdf(queries) for c in centres], axis=0))
    np.testing.assert_allclose(kde_log_prob(queries, centres, scale, 0.7), brute, rtol=1e-10)


def test_kde_stays_exact_far_from_every_centre() -> None:
    """Where each kernel's density underflows to zero, the log-sum-exp still gives the right log p."""
    centres, scale = np.zeros((2, 2)), np.ones(2)
    far = np.array([[60.0, 0.0]])
    expected = -0.5 * 3600 - np.log(2 * np.pi)  # N(far; 0, I) in 2-d, bandwidth 1
    np.testing.assert_allclose(kde_log_prob(far, centres, scale, 1.0), [expected], rtol=1e-12)


def test_kde_density_is_in_the_given_coordinates() -> None:
    """Stretching the data by 10 costs log(10) nats per dimension: the whitening's Jacobian is in the density."""
    fit, validation, heldout = _clusters(20, 0), _clusters(5, 1), _clusters(5, 2)
    plain = gaussian_kde(fit, validation, seed=0)
    stretched = gaussian_kde(fit * 10, validation * 10, seed=0)
    assert plain.detail == stretched.detail
    np.testing.assert_allclose(stretched.log_prob(heldout * 10), plain.log_prob(heldout) - 3 * np.log(10), rtol=1e-10)


def test_kde_bandwidth_is_chosen_on_validation_never_on_heldout() -> None:
    fit, validation = _clusters(20, 0), _clusters(5, 1)
    chosen = gaussian_kde(fit, validation, seed=0)
    for heldout in (_clusters(5, 2), _clusters(5, 2) * 3 + 40):
        again = gaussian_kde(fit, validation, seed=0)
        assert again.detail == chosen.detail
        np.testing.assert_array_equal(again.log_prob(heldout), chosen.log_prob(heldout))
    # Validation faces between the clusters call for wider kernels: the choice does follow validation.
    assert gaussian_kde(fit, validation * 0.5, seed=0).detail != chosen.detail


def test_mixture_picks_the_component_count_validation_prefers() -> None:
    fit, validation = _clusters(30, 0), _clusters(10, 1)
    chosen = diagonal_mixture(fit, validation, max_components=6, seed=0)
    assert "diagonal, 3 of 1..6" in chosen.detail
    single = diagonal_mixture(fit, validation, max_components=1, seed=0)
    assert chosen.validation_log_prob > single.validation_log_prob + 5


def test_without_validation_faces_the_choice_is_cross_validated_on_the_fit_faces() -> None:
    fit = _clusters(30, 0)
    chosen = diagonal_mixture(fit, np.empty((0, 3)), max_components=6, seed=0)
    assert "3 of 1..6" in chosen.detail and chosen.validation_log_prob is not None
    folds = selection_folds(len(fit), seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(fit)))


def _direct_kde_log_prob(x: np.ndarray, centres: np.ndarray, scale: np.ndarray, bandwidth: float) -> np.ndarray:
    """Mean of N(centre, diag((bandwidth * scale)**2)) at ``x``, from scipy's distances and log-sum-exp."""
    squared = cdist(x / scale, centres / scale, "sqeuclidean")
    log_norm = np.log(len(centres)) + 0.5 * x.shape[1] * np.log(2 * np.pi) + np.log(bandwidth * scale).sum()
    return logsumexp(-0.5 * squared / bandwidth**2, axis=1) - log_norm


def test_real_split_with_validation_faces_kde_and_mixture(faces) -> None:
    """On split 0 with a tenth of the images for validation: the KDE's bandwidth and held-out log p are those a direct
    computation (scikit-learn's PCA, scipy's KDE sum) chooses and gives, and the KDE beats the diagonal models."""
    split = split_indices(faces, DataConfig(validation_fraction=0.1))
    pca = fit_pca_on(faces, split, PCAConfig())
    results = {r.name: r for r in fit_baseline_models(pca, split, BaselineConfig(), seed=0).results}
    assert list(results) == ["diagonal Gaussian", "GaussianMixture", "Gaussian KDE"]
    # The same densities, computed apart from faceflow's code: 64 components (the 90% rule rounded to a power of two).
    direct_pca = PCA(n_components=64, svd_solver="full").fit(faces.flat[split.fit])
    coords = direct_pca.transform(faces.flat).astype(np.float32).astype(np.float64)
    fit, validation, heldout = coords[split.fit], coords[split.validation], coords[split.heldout]
    scale = fit.std(0)
    grid = np.round(np.arange(0.30, 1.50 + 1e-9, 0.05), 2)  # the grid the detail names, 0.30..1.50
    on_validation = [_direct_kde_log_prob(validation, fit, scale, b).mean() for b in grid]
    best = int(np.argmax(on_validation))
    assert 0 < best < len(grid) - 1  # an optimum inside the grid: it reaches past it on both sides
    kde = results["Gaussian KDE"]
    assert kde.detail.startswith(f"bandwidth {grid[best]:.2f} (whitened units) of 0.30..1.50")
    assert kde.validation_log_prob == pytest.approx(on_validation[best], rel=1e-9)
    assert kde.heldout_log_prob == pytest.approx(_direct_kde_log_prob(heldout, fit, scale, grid[best]).mean(), rel=1e-9)
    diagonal = norm.logpdf(heldout, fit.mean(0), fit.std(0)).sum(1).mean()
    assert results["diagonal Gaussian"].heldout_log_prob == pytest.approx(diagonal, rel=1e-9)
    assert kde.heldout_log_prob > results["GaussianMixture"].heldout_log_prob
    assert results["GaussianMixture"].heldout_log_prob > results["diagonal Gaussian"].heldout_log_prob


def test_kde_scores_every_bandwidth_as_the_direct_sum_would_in_blocks_of_queries(monkeypatch) -> None:
    """One distance matrix per block serves every bandwidth; blocks change nothing but memory."""
    import tasks.baselines as baselines

    rng = np.random.default_rng(3)
    centres, queries, scale = rng.normal(size=(40, 5)), rng.normal(size=(25, 5)), rng.uniform(0.5, 2.0, size=5)
    bandwidths = [0.4, 0.8, 1.2]
    direct = [
        np.log(np.mean([multivariate_normal(c, np.diag((b * scale) ** 2)).pdf(queries) for c in centres], axis=0))
        for b in bandwidths
    ]
    monkeypatch.setattr(baselines, "KDE_QUERY_BLOCK", 7)
    np.testing.assert_allclose(baselines.kde_log_probs(queries, centres, scale, bandwidths), direct, rtol=1e-10)


def test_beyond_the_sample_size_the_kde_kernels_and_the_mixture_choice_use_a_seeded_sample(monkeypatch) -> None:
    """Above SAMPLE_ABOVE fit faces: the KDE is the KDE of a seeded sample; the mixture chooses on it and fits on all."""
    import tasks.baselines as baselines

    monkeypatch.setattr(baselines, "SAMPLE_ABOVE", 40)
    fit, validation, heldout = _clusters(30, 0), _clusters(10, 1), _clusters(5, 2)
    sample = baselines.fit_sample(fit, seed=0)
    assert len(sample) == 40 and np.array_equal(sample, baselines.fit_sample(fit, seed=0))
    assert {tuple(row) for row in sample} <= {tuple(row) for row in fit}
    kde = gaussian_kde(fit, validation, seed=0)
    assert "kernels on 40 of the 90 fit faces" in kde.detail
    bandwidth = float(kde.detail.split()[1])
    np.testing.assert_array_equal(kde.log_prob(heldout), kde_log_prob(heldout, sample, sample.std(0), bandwidth))
    mixture = diagonal_mixture(fit, validation, max_components=6, seed=0)
    assert "3 of 1..6" in mixture.detail and "chosen on 40 of the 90 fit faces" in mixture.detail
    from sklearn.mixture import GaussianMixture

    on_all = GaussianMixture(3, covariance_type="diag", random_state=0).fit(fit)
    np.testing.assert_allclose(mixture.log_prob(heldout), on_all.score_samples(heldout))
    assert mixture.validation_log_prob == pytest.approx(on_all.score_samples(validation).mean())
