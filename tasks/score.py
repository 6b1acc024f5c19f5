"""log p(x) under the flow for real and generated faces, and the run's quality metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass

import normflows as nf
import numpy as np
import pandas as pd
import torch
from prefect import task

from faceflow.caching import KEYED_INPUTS, content_key
from tasks.data import Faces, Split
from tasks.generate import GeneratedFaces
from tasks.pca import FittedPCA
from tasks.train import TrainedFlow


@dataclass(frozen=True)
class Scores:
    """One row per scored face: part (fit, validation, heldout, sample), index, person, log_prob."""

    key: str
    table: pd.DataFrame
    dim: int

    def mean_log_prob(self, part: str) -> float:
        """Mean in nats per face; -inf when any face's log p is not finite, nan for an empty part."""
        values = self.table.loc[self.table["part"] == part, "log_prob"].to_numpy()
        if not len(values):
            return math.nan
        return float(values.mean()) if np.isfinite(values).all() else -math.inf

    def nonfinite(self, part: str) -> int:
        values = self.table.loc[self.table["part"] == part, "log_prob"].to_numpy()
        return int((~np.isfinite(values)).sum())


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
    model = trained.model()
    frames = []
    for part, index in (("fit", split.fit), ("validation", split.validation), ("heldout", split.heldout)):
        frames.append(
            pd.DataFrame(
                {
                    "part": part,
                    "index": index,
                    "person": faces.target[index],
                    "log_prob": flow_log_prob(model, pca.coords[index]),
                }
            )
        )
    frames.append(
        pd.DataFrame(
            {
                "part": "sample",
                "index": np.arange(len(samples.coords)),
                "person": -1,
                "log_prob": flow_log_prob(model, samples.coords),
            }
        )
    )
    table = pd.concat(frames, ignore_index=True)
    return Scores(content_key("scores", trained, pca, split, samples), table, pca.n_components)


@task(name="score_log_prob", cache_policy=KEYED_INPUTS, persist_result=True)
def score_log_prob(
    trained: TrainedFlow, pca: FittedPCA, faces: Faces, split: Split, samples: GeneratedFaces
) -> Scores:
    """log p(x) of fit, validation and held-out faces and of the generated samples."""
    return score_faces(trained, pca, faces, split, samples)
