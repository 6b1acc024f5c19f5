"""PCA from 4096 pixels to the flow's space, with the lab's power-of-two rule."""

from __future__ import annotations

import functools
import io
import math

import joblib
import numpy as np
from sklearn.decomposition import PCA

from faceflow.config import PCAConfig
from faceflow.keys import content_key
from tasks.results import Faces, FittedPCA, Split


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
        estimator=estimator_bytes(pca),
        coords=coords,
        cumulative_variance=cumulative,
        variance_target=config.variance,
        components_for_target=from_target,
    )


def pca_rule(fitted: FittedPCA, config: PCAConfig) -> str:
    """Why the PCA kept as many components as it did, in a sentence."""
    reached = f"{fitted.variance_target:.0%} of the variance takes {fitted.components_for_target} components"
    if config.n_components is not None:
        return f"{reached}; {fitted.n_components} were asked for explicitly (keeping {fitted.variance_kept:.1%})."
    rounding = "; rounded to the nearest power of two" if config.round_to_power_of_two else ""
    return f"{reached}{rounding}: {fitted.n_components} kept ({fitted.variance_kept:.1%} of the variance)."


def estimator_bytes(pca: PCA) -> bytes:
    """The fitted PCA as pca.joblib's bytes."""
    buffer = io.BytesIO()
    joblib.dump(pca, buffer)
    return buffer.getvalue()


def load_estimator(fitted: FittedPCA) -> PCA:
    """The fitted scikit-learn PCA behind ``fitted`` (read-only: it is shared between callers)."""
    return _read_estimator(fitted.estimator)


@functools.lru_cache(maxsize=2)
def _read_estimator(estimator: bytes) -> PCA:
    # Sampling maps three sets of coordinates back to pixels: one joblib load, not three.
    return joblib.load(io.BytesIO(estimator))


def to_pixels(fitted: FittedPCA, coords: np.ndarray) -> np.ndarray:
    """PCA coordinates back to flattened pixels (the PCA's own inverse transform)."""
    return load_estimator(fitted).inverse_transform(np.asarray(coords, dtype=np.float64))
