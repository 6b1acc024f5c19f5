"""Image-space log p: the density of a face's 4096 pixels, not of its PCA coordinates.

log p(x) = log p_model(coords) + log N(x - reconstruction; 0, sigma^2 I) in the 4096 - d
dimensions the PCA leaves out, sigma^2 the fit faces' squared residual per face and per discarded
dimension. Checked here against a float64 computation from the saved files (pca.npz,
model.pt) that shares no code with faceflow's, and for what it is for: comparing models of
different PCAs, and noticing what the PCA cannot see.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal, norm

from faceflow.config import BaselineConfig, DataConfig, PCAConfig, SampleConfig, TrainConfig
from tasks.baselines import fit_baseline_models
from tasks.data import split_indices
from tasks.generate import draw_samples
from tasks.model import load_checkpoint
from tasks.new_people import evaluate_fold, new_people_of_fold
from tasks.pca import fit_pca_on, pixel_scores, read_estimator, residual_log_density
from tasks.score import flow_log_prob, model_score, score_faces
from tasks.train import make_batches, train_flow

PIXELS = 64 * 64
QUICK = TrainConfig(epochs=2, num_layers=2, hidden_units=16, device="cpu")


@pytest.fixture(scope="module")
def run(faces):
    """A quick run's PCA, flow, split and samples, as the pipeline's steps make them."""
    split = split_indices(faces, DataConfig(validation_fraction=0.1))
    pca = fit_pca_on(faces, split, PCAConfig())
    trained = train_flow(make_batches(pca, split, QUICK, seed=0), QUICK, seed=0, device="cpu")
    samples = draw_samples(trained, pca, split, SampleConfig(n_samples=8), seed=0)
    return split, pca, trained, samples


def _saved(run, tmp_path: Path):
    """The PCA and flow as the run folder holds them, loaded back by their files alone."""
    _, pca, trained, _ = run
    (tmp_path / "pca.npz").write_bytes(pca.estimator)
    (tmp_path / "model.pt").write_bytes(trained.checkpoint)
    model, _ = load_checkpoint(tmp_path / "model.pt")
    return read_estimator((tmp_path / "pca.npz").read_bytes(), "pca.npz"), model


def _direct_image_log_prob(estimator, model, pixels: np.ndarray, fit_pixels: np.ndarray) -> np.ndarray:
    """float64, numpy/scipy only: rotate the pixels into (coordinates, residual coordinates), Jacobian 1."""
    basis = np.asarray(estimator.components_, dtype=np.float64)  # (d, 4096), orthonormal rows
    d = len(basis)
    # An orthonormal basis of what the PCA leaves out: the last 4096 - d columns of a complete QR.
    complement = np.linalg.qr(basis.T, mode="complete")[0][:, d:]
    assert complement.shape == (PIXELS, PIXELS - d)
    mean = np.asarray(estimator.mean_, dtype=np.float64)

    def split_up(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        centred = np.asarray(x, dtype=np.float64) - mean
        return centred @ basis.T, centred @ complement

    _, fit_residual = split_up(fit_pixels)
    sigma2 = float((fit_residual**2).sum() / (len(fit_pixels) * (PIXELS - d)))
    coords, residual = split_up(pixels)
    with torch.no_grad():
        coord_log_p = model.log_prob(torch.from_numpy(coords.astype(np.float32))).double().numpy()
    return coord_log_p + norm.logpdf(residual, 0.0, np.sqrt(sigma2)).sum(1)


def test_residual_term_is_the_isotropic_gaussian_density() -> None:
    rng = np.random.default_rng(0)
    residual = 0.3 * rng.normal(size=(5, 7))
    expected = multivariate_normal(np.zeros(7), 0.04 * np.eye(7)).logpdf(residual)
    np.testing.assert_allclose(residual_log_density((residual**2).sum(1), 0.04, 7), expected, rtol=1e-12)


def test_image_log_prob_equals_a_direct_float64_computation_from_the_saved_files(run, faces, tmp_path: Path) -> None:
    split, pca, trained, samples = run
    estimator, model = _saved(run, tmp_path)
    scores = score_faces(trained, pca, faces, split, samples)
    assert scores.pixels == PIXELS and scores.dim == 64
    real = np.concatenate([split.fit, split.validation, split.heldout])
    direct = _direct_image_log_prob(estimator, model, faces.flat[real], faces.flat[split.fit])
    np.testing.assert_allclose(scores.image_log_prob[scores.part != "sample"], direct, rtol=1e-6)
    # A sample is scored as the image it is shown as: its clipped pixels, projected again.
    shown = samples.images.reshape(len(samples.images), -1)
    direct_samples = _direct_image_log_prob(estimator, model, shown, faces.flat[split.fit])
    np.testing.assert_allclose(scores.of("sample", image=True), direct_samples, rtol=1e-6)
    # Nowhere near the PCA-space figure: it is a density of 4096 variables, not of 64.
    assert abs(scores.mean_log_prob("heldout", image=True) - scores.mean_log_prob("heldout")) > 1000
    score = model_score(trained, pca, split)
    assert score.heldout_image_log_prob == pytest.approx(scores.mean_log_prob("heldout", image=True), rel=1e-12)
    assert score.validation_image_log_prob == pytest.approx(direct[np.isin(real, split.validation)].mean(), rel=1e-6)


def test_a_perturbation_the_pca_cannot_see_costs_image_space_log_p(run, faces, tmp_path: Path) -> None:
    split, pca, _, _ = run
    estimator, model = _saved(run, tmp_path)
    face = faces.flat[split.heldout[:4]].astype(np.float64)
    basis = estimator.components_.astype(np.float64)
    noise = np.random.default_rng(1).normal(size=face.shape)
    noise -= (noise @ basis.T) @ basis  # orthogonal to the PCA subspace: coordinates unchanged
    noise *= 0.1 * np.sqrt(PIXELS) / np.linalg.norm(noise, axis=1, keepdims=True)  # RMS 0.1 per pixel
    (coords, residual), (coords_noisy, residual_noisy) = (
        pixel_scores(estimator, x, pca.residual_variance) for x in (face, face + noise)
    )
    np.testing.assert_allclose(coords_noisy, coords, atol=1e-4)
    np.testing.assert_allclose(flow_log_prob(model, coords_noisy), flow_log_prob(model, coords), atol=1e-2)
    # ~0.01 * 4096 / (2 sigma^2) ~ 10^4 nats lower in pixel space, where PCA space saw nothing.
    assert (residual_noisy < residual - 5000).all()


def test_models_of_different_component_counts_score_the_same_pixels_comparably(faces) -> None:
    split = split_indices(faces, DataConfig())
    config = BaselineConfig(gmm_max_components=1)
    gaussian = {}
    for components in (16, 64):
        pca = fit_pca_on(faces, split, PCAConfig(n_components=components))
        assert pca.n_components == components and pca.residual_dim == PIXELS - components
        gaussian[components] = next(
            r for r in fit_baseline_models(pca, split, config, seed=0).results if r.name == "diagonal Gaussian"
        )
        # The diagonal Gaussian in image space, computed directly from pca.npz in float64.
        estimator = read_estimator(pca.estimator, "pca.npz")
        pixels = faces.flat.astype(np.float64)
        coords = estimator.transform(pixels)
        residual = pixels - estimator.inverse_transform(coords)
        sigma2 = (residual[split.fit] ** 2).sum() / (len(split.fit) * (PIXELS - components))
        fit, heldout = coords[split.fit], coords[split.heldout]
        # The residual has 4096 pixel entries but lives in 4096 - d dimensions: that many Gaussian factors.
        squared = (residual[split.heldout] ** 2).sum(1)
        residual_log_p = -0.5 * (PIXELS - components) * np.log(2 * np.pi * sigma2) - squared / (2 * sigma2)
        direct = norm.logpdf(heldout, fit.mean(0), fit.std(0)).sum(1) + residual_log_p
        assert gaussian[components].heldout_image_log_prob == pytest.approx(direct.mean(), rel=1e-6)
    small, large = gaussian[16], gaussian[64]
    assert np.isfinite([small.heldout_image_log_prob, large.heldout_image_log_prob]).all()
    # In PCA space the two are densities of different variables (16 vs 64 numbers per face): the
    # 16-d one looks ~30 nats better. Of the same pixels, the 64-component model is the better one.
    assert small.heldout_log_prob > large.heldout_log_prob + 20
    assert large.heldout_image_log_prob > small.heldout_image_log_prob + 100
    assert abs(large.heldout_image_log_prob - small.heldout_image_log_prob) < 0.2 * abs(large.heldout_image_log_prob)


def _fold_residual_log_density(faces, people: list[int], split_seed: int, heldout_fraction: float) -> float:
    """The mean residual term of the fold's new people, from docs/data.md's rules and numpy alone.

    The fold's PCA is fitted on the images of everyone else that the split puts in the fit part
    (sha256 position at or above the held-out fraction); its component count is the 90% variance
    rule rounded to the nearest power of two.
    """
    def position(image_id: str) -> float:
        digest = hashlib.sha256(f"faceflow-split:{split_seed}:{image_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2.0**64

    pixels = faces.images.reshape(len(faces.images), -1).astype(np.float64)
    new = np.isin(faces.target, people)
    fit = ~new & np.array([position(i) >= heldout_fraction for i in faces.image_ids])
    mean = pixels[fit].mean(0)
    _, singular, vt = np.linalg.svd(pixels[fit] - mean, full_matrices=False)
    explained = np.cumsum(singular**2) / np.sum(singular**2)
    d = 2 ** round(math.log2(int(np.argmax(explained >= 0.9)) + 1))
    basis = vt[:d]

    def squared_residual(x: np.ndarray) -> np.ndarray:
        centred = x - mean
        return ((centred - (centred @ basis.T) @ basis) ** 2).sum(1)

    k = PIXELS - d
    sigma2 = squared_residual(pixels[fit]).sum() / (fit.sum() * k)
    return float(np.mean(-0.5 * k * np.log(2 * np.pi * sigma2) - squared_residual(pixels[new]) / (2 * sigma2)))


def test_new_people_are_scored_in_pixels_through_their_folds_own_pca(faces) -> None:
    data = DataConfig(new_people_per_fold=3)
    people = new_people_of_fold(data, 0, len(faces.people))
    fold = evaluate_fold(faces, people, data, PCAConfig(), QUICK, BaselineConfig(gmm_max_components=1), seed=0, device="cpu")
    assert fold.people == people and len(people) == 3
    residual = _fold_residual_log_density(faces, people, data.split_seed, data.heldout_fraction)
    assert fold.flow_image_log_prob - fold.flow_log_prob == pytest.approx(residual, rel=1e-7)
    assert set(fold.baseline_image_log_prob) == set(fold.baseline_log_prob)
    for name, value in fold.baseline_image_log_prob.items():
        assert value - fold.baseline_log_prob[name] == pytest.approx(residual, rel=1e-7)
