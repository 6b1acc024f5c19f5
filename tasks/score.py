"""log p(x) under the flow for real and generated faces."""

from __future__ import annotations

import math

import normflows as nf
import numpy as np
import torch

from faceflow.keys import content_key
from tasks.model import trained_model
from tasks.results import Faces, FittedPCA, GeneratedFaces, ModelScore, Scores, Split, TrainedFlow


def bits_per_dim(log_prob: float, dim: int) -> float:
    """Negative log-density per dimension in bits."""
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
    """Score every real face by its part of the split, and every generated sample."""
    model = trained_model(trained)
    parts = {"fit": split.fit, "validation": split.validation, "heldout": split.heldout}
    index = np.concatenate([*parts.values(), np.arange(len(samples.coords))])
    real = np.concatenate(list(parts.values()))
    return Scores(
        key=content_key("scores", trained, pca, split, samples),
        part=np.concatenate([np.full(len(i), name) for name, i in parts.items()] + [np.full(len(samples.coords), "sample")]),
        index=index,
        person=np.concatenate([faces.target[real], np.full(len(samples.coords), -1)]),
        log_prob=np.concatenate([flow_log_prob(model, pca.coords[real]), flow_log_prob(model, samples.coords)]),
        dim=pca.n_components,
    )


def _mean(values: np.ndarray) -> float:
    if not len(values):
        return math.nan
    return float(values.mean()) if np.isfinite(values).all() else -math.inf


def model_score(trained: TrainedFlow, pca: FittedPCA, split: Split) -> ModelScore:
    """A model's validation and held-out log p: what a sweep ranks (validation) and reports beside it."""
    model = trained_model(trained)
    return ModelScore(
        key=content_key("model-score", trained, pca, split),
        validation_log_prob=_mean(flow_log_prob(model, pca.coords[split.validation])),
        heldout_log_prob=_mean(flow_log_prob(model, pca.coords[split.heldout])),
        train_seconds=trained.seconds,
    )
