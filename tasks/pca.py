"""PCA from 4096 pixels to the flow's space, with the lab's power-of-two rule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from prefect import task
from sklearn.decomposition import PCA

from faceflow.caching import KEYED_INPUTS, content_key
from faceflow.config import PCAConfig
from tasks.data import Faces, Split


@dataclass(frozen=True)
class FittedPCA:
    """A PCA fitted on the fit part, and every face's coordinates in it."""

    key: str
    pca: PCA
    coords: np.ndarray  # (400, n_components) float32, as pca.transform returns them
    cumulative_variance: np.ndarray  # of the full-rank PCA on the fit part
    components_for_target: int  # before the power-of-two rounding

    @property
    def n_components(self) -> int:
        return int(self.pca.n_components_)


def components_for_variance(cumulative_variance: np.ndarray, target: float) -> int:
    """The fewest components whose explained variance reaches ``target`` (scikit-learn's rule)."""
    count = int(np.searchsorted(cumulative_variance, target, side="right")) + 1
    return min(count, len(cumulative_variance))


def nearest_power_of_two(count: int) -> int:
    """2**round(log2(count)): 66 -> 64, 100 -> 128."""
    return 2 ** round(math.log2(count))


def choose_n_components(cumulative_variance: np.ndarray, config: PCAConfig) -> tuple[int, int]:
    """(components for the variance target, components used), capped at the rank available."""
    from_target = components_for_variance(cumulative_variance, config.variance)
    if config.n_components is not None:
        return from_target, config.n_components
    chosen = nearest_power_of_two(from_target) if config.round_to_power_of_two else from_target
    chosen += chosen % 2  # coupling layers split the coordinates in two equal halves
    rank = len(cumulative_variance) - 1  # centred data of n images has rank n - 1 at most
    return from_target, min(chosen, rank - rank % 2)


def fit_pca_on(faces: Faces, split: Split, config: PCAConfig) -> FittedPCA:
    """Fit on the fit part only, so validation and held-out faces stay unseen."""
    train_pixels = faces.flat[split.fit]
    full = PCA(svd_solver="full").fit(train_pixels)
    cumulative = np.cumsum(full.explained_variance_ratio_)
    from_target, chosen = choose_n_components(cumulative, config)
    pca = PCA(n_components=chosen, svd_solver="full").fit(train_pixels)
    coords = pca.transform(faces.flat).astype(np.float32)
    return FittedPCA(
        key=content_key("pca", faces, split, config),
        pca=pca,
        coords=coords,
        cumulative_variance=cumulative,
        components_for_target=from_target,
    )


@task(name="fit_pca", cache_policy=KEYED_INPUTS, persist_result=True)
def fit_pca(faces: Faces, split: Split, config: PCAConfig) -> FittedPCA:
    """PCA keeping about the target variance, rounded to a power of two."""
    return fit_pca_on(faces, split, config)
