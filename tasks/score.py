"""log p(x) under the flow for real and generated faces."""

from __future__ import annotations

import math

import normflows as nf
import numpy as np
import torch

from faceflow.keys import content_key
from tasks.model import trained_model
from tasks.pca import image_log_prob, load_estimator, pixel_scores
from tasks.results import Faces, FittedPCA, GeneratedFaces, ModelScore, Scores, Split, TrainedFlow


def bits_per_dim(log_prob: float, dim: int) -> float:
    """Negative log-density per dimension in bits (per pixel, for an image-space log p and dim 4096)."""
    return -log_prob / (dim * math.log(2))


def flow_log_prob(model: nf.NormalizingFlow, coords: np.ndarray) -> np.ndarray:
    """log p of PCA coordinates under a flow, in nats; non-finite values kept as -inf."""
    with torch.no_grad():
        log_p = model.log_prob(torch.from_numpy(np.asarray(coords, dtype=np.float32)))
    values = log_p.double().numpy()
    return np.where(np.isfinite(values), values, -np.inf)


def score_faces(
    trained: TrainedFlow, pca: FittedPCA, faces: Faces, split: Split, samples: GeneratedFaces
) -> Scores:
    """Score every real face by its part of the split, and every generated sample.

    Image-space log p is of a face's pixels: for a real face, its coordinates' log p plus its
    residual's; for a sample, of the image it is shown as (clipped to [0, 1], then projected
    again, so its coordinates move a little and it gains a small residual).
    """
    model = trained_model(trained)
    parts = {"fit": split.fit, "validation": split.validation, "heldout": split.heldout}
    index = np.concatenate([*parts.values(), np.arange(len(samples.coords))])
    real = np.concatenate(list(parts.values()))
    real_log_prob = flow_log_prob(model, pca.coords[real])
    sample_coords, sample_residual = pixel_scores(
        load_estimator(pca), samples.images.reshape(len(samples.images), -1), pca.residual_variance
    )
    sample_image = flow_log_prob(model, sample_coords) + sample_residual if len(sample_coords) else np.empty(0)
    return Scores(
        key=content_key("scores", trained, pca, split, samples),
        part=np.concatenate([np.full(len(i), name) for name, i in parts.items()] + [np.full(len(samples.coords), "sample")]),
        index=index,
        person=np.concatenate([faces.target[real], np.full(len(samples.coords), -1)]),
        log_prob=np.concatenate([real_log_prob, flow_log_prob(model, samples.coords)]),
        dim=pca.n_components,
        image_log_prob=_finite_or_minus_inf(np.concatenate([image_log_prob(pca, real_log_prob, real), sample_image])),
        pixels=pca.n_pixels,
    )


def _finite_or_minus_inf(values: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(values), values, -np.inf)


def _mean(values: np.ndarray) -> float:
    if not len(values):
        return math.nan
    return float(values.mean()) if np.isfinite(values).all() else -math.inf


def model_score(trained: TrainedFlow, pca: FittedPCA, split: Split) -> ModelScore:
    """A model's validation and held-out log p: what a sweep ranks (validation) and reports beside it."""
    model = trained_model(trained)
    validation = flow_log_prob(model, pca.coords[split.validation])
    heldout = flow_log_prob(model, pca.coords[split.heldout])
    return ModelScore(
        key=content_key("model-score", trained, pca, split),
        validation_log_prob=_mean(validation),
        heldout_log_prob=_mean(heldout),
        train_seconds=trained.seconds,
        validation_image_log_prob=_mean(image_log_prob(pca, validation, split.validation)),
        heldout_image_log_prob=_mean(image_log_prob(pca, heldout, split.heldout)),
    )
