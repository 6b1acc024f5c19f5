from __future__ import annotations

import numpy as np
import pytest

from tasks.generate import interpolate_latent, interpolation_weights, nearest_rms_distance


@pytest.mark.parametrize("method", ["linear", "spherical"])
def test_interpolation_starts_and_ends_at_the_endpoints(method: str) -> None:
    rng = np.random.default_rng(0)
    z_a, z_b = rng.normal(size=16), rng.normal(size=16)
    path = interpolate_latent(z_a, z_b, interpolation_weights(7), method)
    assert path.shape == (7, 16)
    np.testing.assert_allclose(path[0], z_a, atol=1e-12)
    np.testing.assert_allclose(path[-1], z_b, atol=1e-12)


def test_spherical_keeps_the_norm_between_equal_norm_endpoints() -> None:
    z_a, z_b = np.array([3.0, 0.0, 0.0]), np.array([0.0, 3.0, 0.0])
    spherical = interpolate_latent(z_a, z_b, interpolation_weights(5), "spherical")
    linear = interpolate_latent(z_a, z_b, interpolation_weights(5), "linear")
    np.testing.assert_allclose(np.linalg.norm(spherical, axis=1), 3.0)
    assert np.linalg.norm(linear[2]) < 3.0


def test_nearest_rms_distance_finds_the_closest_image() -> None:
    references = np.stack([np.zeros((2, 2)), np.ones((2, 2))])
    index, distance = nearest_rms_distance(np.full((1, 2, 2), 0.9), references)
    assert index.tolist() == [1]
    assert distance[0] == pytest.approx(0.1)


def test_memorisation_distances_compare_pca_reconstructions_on_both_sides(faces) -> None:
    """A held-out face whose PCA coordinates equal a training face's is at distance 0, whatever its raw pixels."""
    import dataclasses

    from faceflow.config import DataConfig, PCAConfig, SampleConfig, TrainConfig
    from tasks.data import split_indices
    from tasks.generate import draw_samples, to_images
    from tasks.pca import fit_pca_on
    from tasks.train import make_batches, train_flow

    split = split_indices(faces, DataConfig())
    pca = fit_pca_on(faces, split, PCAConfig())
    quick = TrainConfig(epochs=1, num_layers=2, hidden_units=8, device="cpu")
    trained = train_flow(make_batches(pca, split, quick, 0), quick, seed=0)
    coords = pca.coords.copy()
    coords[split.heldout[0]] = coords[split.fit[0]]
    copied = dataclasses.replace(pca, coords=coords)
    samples = draw_samples(trained, copied, split, SampleConfig(n_samples=4), seed=0)
    assert samples.heldout_nearest_train_distance[0] == pytest.approx(0.0, abs=1e-6)
    assert np.abs(faces.images[split.heldout[0]] - faces.images[split.fit[0]]).max() > 0.1  # unlike their pixels
    # A sample's distance is to the nearest training face's reconstruction.
    _, expected = nearest_rms_distance(samples.images, to_images(copied, coords[np.concatenate([split.fit, split.validation])]))
    np.testing.assert_allclose(samples.nearest_train_distance, expected)
