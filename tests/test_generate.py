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


def test_blocks_change_nothing_but_memory(faces, monkeypatch) -> None:
    """Reconstructions and nearest faces made a few faces at a time equal those made all at once."""
    import tasks.generate as generate
    from faceflow.config import DataConfig, PCAConfig
    from tasks.data import split_indices
    from tasks.pca import fit_pca_on

    split = split_indices(faces, DataConfig())
    pca = fit_pca_on(faces, split, PCAConfig(n_components=16))
    whole = generate.to_images(pca, pca.coords[:50])
    queries, references = faces.images[:30], faces.images[100:220]
    index, distance = generate.nearest_rms_distance(queries, references)
    monkeypatch.setattr(generate, "FACES_PER_BLOCK", 7)
    np.testing.assert_allclose(generate.to_images(pca, pca.coords[:50]), whole, atol=1e-6)
    blocks = [references[start : start + 7] for start in range(0, len(references), 7)]
    blocked_index, blocked_distance = generate.nearest_among_blocks(queries, blocks)
    np.testing.assert_array_equal(blocked_index, index)
    np.testing.assert_allclose(blocked_distance, distance, rtol=1e-9)


def test_beyond_the_limit_held_out_distances_are_of_a_seeded_sample(monkeypatch) -> None:
    import tasks.generate as generate

    monkeypatch.setattr(generate, "HELDOUT_DISTANCE_FACES", 10)
    heldout = np.arange(100, 180)
    chosen = generate.heldout_distance_faces(heldout, seed=0)
    assert len(chosen) == 10 and set(chosen) <= set(heldout) and np.all(np.diff(chosen) > 0)
    np.testing.assert_array_equal(chosen, generate.heldout_distance_faces(heldout, seed=0))
    np.testing.assert_array_equal(generate.heldout_distance_faces(heldout[:10], seed=0), heldout[:10])
