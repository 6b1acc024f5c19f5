"""New faces from the flow: samples at a temperature, and latent-space interpolation."""

from __future__ import annotations

import numpy as np
import torch

from faceflow.config import InterpolateConfig, SampleConfig
from faceflow.keys import content_key
from tasks.model import seeded, trained_model
from tasks.olivetti import IMAGE_SHAPE
from tasks.pca import to_pixels
from tasks.results import FittedPCA, GeneratedFaces, Interpolation, Split, TrainedFlow


def to_images(pca: FittedPCA, coords: np.ndarray) -> np.ndarray:
    """PCA coordinates back to 64x64 images, clipped to the pixel range."""
    return np.clip(to_pixels(pca, coords), 0.0, 1.0).reshape(-1, *IMAGE_SHAPE).astype(np.float32)


def nearest_rms_distance(queries: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query image, (index into references, RMS pixel distance) of the closest one."""
    q = queries.reshape(len(queries), -1).astype(np.float64)
    r = references.reshape(len(references), -1).astype(np.float64)
    squared = (q**2).sum(1)[:, None] - 2 * q @ r.T + (r**2).sum(1)[None, :]
    nearest = squared.argmin(1)
    distance = np.sqrt(np.maximum(squared[np.arange(len(q)), nearest], 0.0) / q.shape[1])
    return nearest, distance


def draw_samples(
    trained: TrainedFlow, pca: FittedPCA, split: Split, config: SampleConfig, seed: int
) -> GeneratedFaces:
    """Base samples at temperature T -> flow -> inverse PCA; with nearest-training-face distances.

    Samples are PCA reconstructions, so every distance is measured between reconstructions: a
    held-out face's raw pixels carry the detail PCA drops and would sit further from everything.
    """
    model = trained_model(trained)
    with seeded(seed), torch.no_grad():
        model.q0.temperature = config.temperature
        coords, _ = model.sample(config.n_samples)
    coords = coords.numpy()
    images = to_images(pca, coords)
    train_index = np.concatenate([split.fit, split.validation])
    train_images = to_images(pca, pca.coords[train_index])
    nearest, distance = nearest_rms_distance(images, train_images)
    _, heldout_distance = nearest_rms_distance(to_images(pca, pca.coords[split.heldout]), train_images)
    return GeneratedFaces(
        key=content_key("samples", trained, pca, config, seed),
        temperature=config.temperature,
        coords=coords,
        images=images,
        nearest_train_index=train_index[nearest],
        nearest_train_distance=distance,
        heldout_nearest_train_distance=heldout_distance,
    )


def interpolation_weights(steps: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, steps)


def interpolate_latent(z_a: np.ndarray, z_b: np.ndarray, weights: np.ndarray, method: str) -> np.ndarray:
    """Points between two latent vectors: straight line, or great circle (slerp)."""
    w = weights[:, None]
    if method == "linear":
        return (1 - w) * z_a + w * z_b
    cos_angle = np.dot(z_a, z_b) / (np.linalg.norm(z_a) * np.linalg.norm(z_b))
    angle = np.arccos(np.clip(cos_angle, -1.0, 1.0))
    if angle < 1e-6:  # parallel vectors: slerp degenerates to the straight line
        return (1 - w) * z_a + w * z_b
    return (np.sin((1 - w) * angle) * z_a + np.sin(w * angle) * z_b) / np.sin(angle)


def interpolate_between(
    trained: TrainedFlow, pca: FittedPCA, config: InterpolateConfig, index_a: int, index_b: int
) -> Interpolation:
    """Map two real faces (``index_a``, ``index_b``: config.face_a and face_b resolved in the version) to latent space, walk between them, map back."""
    model = trained_model(trained)
    endpoints = torch.from_numpy(pca.coords[[index_a, index_b]])
    weights = interpolation_weights(config.steps)
    with torch.no_grad():
        z = model.inverse(endpoints).numpy().astype(np.float64)
        path = interpolate_latent(z[0], z[1], weights, config.method)
        coords = model.forward(torch.from_numpy(path).float()).numpy()
    return Interpolation(
        key=content_key("interpolation", trained, pca, config, index_a, index_b),
        index_a=index_a,
        index_b=index_b,
        method=config.method,
        weights=weights,
        images=to_images(pca, coords),
    )
