"""New faces from the flow: samples at a temperature, and latent-space interpolation."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from faceflow.config import InterpolateConfig, SampleConfig
from faceflow.keys import content_key
from tasks.model import seeded, trained_model
from tasks.olivetti import IMAGE_SHAPE
from tasks.pca import to_pixels
from tasks.results import FittedPCA, GeneratedFaces, Interpolation, Split, TrainedFlow


# Faces per block when mapping coordinates back to pixels or searching nearest faces: 40,000
# faces are 1.3 GB as float64 pixels, their distance matrix to 8,000 held-out faces 2.6 GB.
FACES_PER_BLOCK = 4096
# Held-out faces whose nearest training face is the yardstick for the samples' (a seeded sample
# beyond this many): each is compared with every training face, so all of them cost faces²
# (45 s at 40,000 faces, 8,000 held out, on one core). The Olivetti version holds out 74.
HELDOUT_DISTANCE_FACES = 512
# Draws that sample; apart from the sampling's own seeded stream.
_HELDOUT_STREAM = 3


def to_images(pca: FittedPCA, coords: np.ndarray) -> np.ndarray:
    """PCA coordinates back to 64x64 images, clipped to the pixel range; FACES_PER_BLOCK at a time."""
    images = np.empty((len(coords), *IMAGE_SHAPE), dtype=np.float32)
    for start in range(0, len(coords), FACES_PER_BLOCK):
        block = coords[start : start + FACES_PER_BLOCK]
        images[start : start + len(block)] = np.clip(to_pixels(pca, block), 0.0, 1.0).reshape(-1, *IMAGE_SHAPE)
    return images


def nearest_rms_distance(queries: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query image, (index into references, RMS pixel distance) of the closest one."""
    return nearest_among_blocks(queries, [references])


def nearest_among_blocks(queries: np.ndarray, reference_blocks: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """As nearest_rms_distance, for references that arrive in consecutive blocks and are never all in memory.

    Distances in float64 from ||q||^2 - 2 q.r + ||r||^2, FACES_PER_BLOCK queries at a time; a tie
    goes to the earlier reference, as one argmin over all of them would.
    """
    q = queries.reshape(len(queries), -1)
    best = np.full(len(q), np.inf)
    nearest = np.zeros(len(q), dtype=np.int64)
    offset = 0
    for block in reference_blocks:
        r = block.reshape(len(block), -1).astype(np.float64)
        r_squared = (r**2).sum(1)
        for start in range(0, len(q), FACES_PER_BLOCK):
            rows = slice(start, start + FACES_PER_BLOCK)
            q_block = q[rows].astype(np.float64)
            squared = (q_block**2).sum(1)[:, None] - 2 * q_block @ r.T + r_squared[None, :]
            closest = squared.argmin(1)
            value = squared[np.arange(len(q_block)), closest]
            better = value < best[rows]
            best[rows][better] = value[better]
            nearest[rows][better] = closest[better] + offset
        offset += len(r)
    distance = np.sqrt(np.maximum(best, 0.0) / q.shape[1])
    return nearest, distance


def heldout_distance_faces(heldout: np.ndarray, seed: int) -> np.ndarray:
    """The held-out faces whose nearest training face is measured: all, or a seeded sample of HELDOUT_DISTANCE_FACES."""
    if len(heldout) <= HELDOUT_DISTANCE_FACES:
        return heldout
    return np.sort(np.random.default_rng((seed, _HELDOUT_STREAM)).choice(heldout, HELDOUT_DISTANCE_FACES, replace=False))


def draw_samples(
    trained: TrainedFlow, pca: FittedPCA, split: Split, config: SampleConfig, seed: int
) -> GeneratedFaces:
    """Base samples at temperature T -> flow -> inverse PCA; with nearest-training-face distances.

    Samples are PCA reconstructions, so every distance is measured between reconstructions: a
    held-out face's raw pixels carry the detail PCA drops and would sit further from everything.
    The training faces' reconstructions are made and searched a block at a time; the held-out
    faces' distances are of at most HELDOUT_DISTANCE_FACES of them (heldout_distance_faces).
    """
    model = trained_model(trained)
    with seeded(seed), torch.no_grad():
        model.set_temperature(config.temperature)
        coords, _ = model.sample(config.n_samples)
    coords = coords.numpy()
    images = to_images(pca, coords)
    train_index = np.concatenate([split.fit, split.validation])

    def train_images() -> Iterator[np.ndarray]:
        for start in range(0, len(train_index), FACES_PER_BLOCK):
            yield to_images(pca, pca.coords[train_index[start : start + FACES_PER_BLOCK]])

    nearest, distance = nearest_among_blocks(images, train_images())
    heldout = heldout_distance_faces(split.heldout, seed)
    _, heldout_distance = nearest_among_blocks(to_images(pca, pca.coords[heldout]), train_images())
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
