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
