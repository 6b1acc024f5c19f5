"""PCA from 4096 pixels to the flow's space, with the lab's power-of-two rule.

Up to EXACT_PCA_MAX_FACES fit faces the PCA is scikit-learn's exact SVD of the whole spectrum.
Above it an exact SVD costs n² x 4096 (10 s at 3,200 faces, minutes at 32,000), so the PCA is
scikit-learn's randomized SVD of the leading components only, enough of them to pass the
variance target; each one's fraction is of the exact total variance. Its cost grows with n, not
n²; the variance curve in the report then ends where those components end.
"""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
from sklearn.decomposition import PCA

from faceflow.arrays import ArchiveError, npz_bytes, read_npz
from faceflow.config import PCAConfig
from faceflow.keys import content_key
from tasks.results import Faces, FittedPCA, Split

# Fit faces up to which the PCA is the exact, full SVD (every run on the 400 Olivetti faces is);
# the exact SVD of 1,024 faces takes about a second on one core.
EXACT_PCA_MAX_FACES = 1024
# Leading components a randomized PCA starts with: the 90% target took 92 and 106 of them at 4,000
# and 40,000 faces of the benchmark's synthetic growth (docs/benchmarks.md). A power of two, so
# the count rounded to a power of two never exceeds it.
RANDOMIZED_START_COMPONENTS = 256
# Rows per block when projecting many faces: 40,000 faces in float64 would be 1.3 GB per copy.
ROWS_PER_BLOCK = 4096


def components_for_variance(cumulative_variance: np.ndarray, target: float) -> int:
    """The fewest components whose explained variance reaches ``target`` (scikit-learn's rule)."""
    count = int(np.searchsorted(cumulative_variance, target, side="right")) + 1
    return min(count, len(cumulative_variance))


def nearest_power_of_two(count: int) -> int:
    """2**round(log2(count)): 66 -> 64, 100 -> 128."""
    return 2 ** round(math.log2(count))


def choose_n_components(cumulative_variance: np.ndarray, config: PCAConfig, rank: int | None = None) -> tuple[int, int]:
    """(components for the variance target, components used), capped at the rank available.

    ``rank`` defaults to what a full spectrum implies: centred data of n images has rank n - 1 at most.
    """
    from_target = components_for_variance(cumulative_variance, config.variance)
    if config.n_components is not None:
        return from_target, config.n_components
    chosen = nearest_power_of_two(from_target) if config.round_to_power_of_two else from_target
    chosen += chosen % 2  # coupling layers split the coordinates in two equal halves
    rank = len(cumulative_variance) - 1 if rank is None else rank
    return from_target, min(chosen, rank - rank % 2)


def leading_components(pixels: np.ndarray, rows: np.ndarray, config: PCAConfig) -> PCA:
    """A randomized PCA of ``pixels[rows]`` with enough leading components to pass the variance target.

    It starts at RANDOMIZED_START_COMPONENTS (or the explicit count) and doubles; past a quarter
    of the rank, the exact spectrum (scikit-learn's full SVD, or the covariance's
    eigendecomposition for more faces than pixels) costs less than more rounds. Each fit gets a
    fresh copy of the rows, which it centres in place: one copy of the fit faces in memory, not two.
    """
    rank = min(len(rows), pixels.shape[1])
    count = max(RANDOMIZED_START_COMPONENTS, config.n_components or 0)
    while count < rank // 4:
        pca = PCA(count, svd_solver="randomized", random_state=0, copy=False).fit(pixels[rows])
        if np.sum(pca.explained_variance_ratio_) > config.variance:
            return pca
        count *= 2
    exact = "full" if len(rows) <= pixels.shape[1] else "covariance_eigh"
    return PCA(svd_solver=exact, copy=False).fit(pixels[rows])


def leading_part(pca: PCA, components: int) -> PCA:
    """``pca`` cut to its first ``components`` components, its attributes as scikit-learn's truncated solvers set them.

    The leading components of a randomized fit of more components are at least as accurate as a
    fit of fewer: one fit serves both the variance curve and the basis.
    """
    cut = copy.deepcopy(pca)
    total_variance = float(pca.explained_variance_[0] / pca.explained_variance_ratio_[0])
    cut.n_components = cut.n_components_ = components
    for name in ("components_", "explained_variance_", "explained_variance_ratio_", "singular_values_"):
        setattr(cut, name, np.array(getattr(pca, name)[:components]))
    rank = min(pca.n_samples_, pca.n_features_in_)
    kept_variance = float(np.sum(cut.explained_variance_))
    cut.noise_variance_ = (total_variance - kept_variance) / (rank - components) if components < rank else 0.0
    return cut


def fit_pca_on(faces: Faces, split: Split, config: PCAConfig) -> FittedPCA:
    """Fit on the fit part only, so validation and held-out faces stay unseen."""
    rank = min(len(split.fit), faces.flat.shape[1]) - 1  # centred data of n images has rank n - 1 at most
    if len(split.fit) <= EXACT_PCA_MAX_FACES:
        train_pixels = faces.flat[split.fit]
        cumulative = np.cumsum(PCA(svd_solver="full").fit(train_pixels).explained_variance_ratio_)
        from_target, chosen = choose_n_components(cumulative, config, rank)
        pca = PCA(n_components=chosen, svd_solver="full").fit(train_pixels)
    else:
        leading = leading_components(faces.flat, split.fit, config)
        cumulative = np.cumsum(leading.explained_variance_ratio_)
        from_target, chosen = choose_n_components(cumulative, config, rank)
        pca = leading_part(leading, chosen)
    coords = pca.transform(faces.flat).astype(np.float32)
    residual_squared = squared_residuals(pca, faces.flat)
    mirror_coords = mirrored_coordinates(pca, faces.images)
    return FittedPCA(
        key=content_key("pca", faces, split, config),
        estimator=estimator_bytes(pca),
        coords=coords,
        mirror_coords=mirror_coords,
        cumulative_variance=cumulative,
        variance_target=config.variance,
        components_for_target=from_target,
        residual_squared=residual_squared,
        residual_variance=residual_variance(residual_squared[split.fit], faces.flat.shape[1] - chosen),
        n_pixels=int(faces.flat.shape[1]),
    )


def mirrored_coordinates(pca: PCA, images: np.ndarray) -> np.ndarray:
    """float32 PCA coordinates of every face mirrored left to right, in blocks of ROWS_PER_BLOCK faces.

    A mirrored face is as plausible a face as the original (faces are near-symmetric, lighting
    and pose are not): training on both is augmentation that teaches the flow about faces rather
    than about the fitted people (docs/quality.md).
    """
    coords = np.empty((len(images), pca.n_components_), dtype=np.float32)
    for start in range(0, len(images), ROWS_PER_BLOCK):
        block = np.ascontiguousarray(images[start : start + ROWS_PER_BLOCK, :, ::-1]).reshape(-1, images[0].size)
        coords[start : start + ROWS_PER_BLOCK] = pca.transform(block)
    return coords


def squared_residuals(pca: PCA, pixels: np.ndarray) -> np.ndarray:
    """||x - reconstruction(x)||^2 per face, in float64: the part of each face the basis leaves out.

    In blocks of ROWS_PER_BLOCK faces, so many faces never need several float64 copies of
    themselves at once; up to ROWS_PER_BLOCK faces it is one block, computed as it always was.
    """
    pixels = np.asarray(pixels).reshape(len(pixels), -1)
    basis = np.asarray(pca.components_, dtype=np.float64)  # orthonormal rows
    mean = np.asarray(pca.mean_, dtype=np.float64)
    squared = np.empty(len(pixels), dtype=np.float64)
    for start in range(0, len(pixels), ROWS_PER_BLOCK):
        centred = np.asarray(pixels[start : start + ROWS_PER_BLOCK], dtype=np.float64) - mean
        residual = centred - (centred @ basis.T) @ basis
        squared[start : start + ROWS_PER_BLOCK] = np.einsum("ij,ij->i", residual, residual)
    return squared


def residual_variance(fit_residual_squared: np.ndarray, residual_dim: int) -> float:
    """Probabilistic PCA's sigma^2: the fit faces' squared residual per face and per discarded dimension."""
    return float(np.sum(fit_residual_squared) / (len(fit_residual_squared) * residual_dim))


def residual_log_density(residual_squared: np.ndarray, variance: float, residual_dim: int) -> np.ndarray:
    """log N(r; 0, variance * I) of residuals r in ``residual_dim`` dimensions, from their squared norms.

    Adding it to the log p of a face's PCA coordinates gives the log p of its pixels: the
    orthonormal basis makes x -> (coordinates, residual) a rotation and shift, Jacobian 1.
    """
    squared = np.asarray(residual_squared, dtype=np.float64)
    return -0.5 * residual_dim * np.log(2 * np.pi * variance) - squared / (2 * variance)


def image_log_prob(fitted: FittedPCA, coord_log_prob: np.ndarray, index: np.ndarray) -> np.ndarray:
    """log p of faces ``index``'s pixels, given the log p of their PCA coordinates: nats per face."""
    residual = residual_log_density(fitted.residual_squared[index], fitted.residual_variance, fitted.residual_dim)
    return np.asarray(coord_log_prob, dtype=np.float64) + residual


def pixel_scores(pca: PCA, pixels: np.ndarray, variance: float) -> tuple[np.ndarray, np.ndarray]:
    """(float32 PCA coordinates, residual log-density) of any flattened faces, under a fitted PCA and sigma^2."""
    pixels = np.asarray(pixels, dtype=np.float64).reshape(len(pixels), -1)
    coords = pca.transform(pixels).astype(np.float32)
    residual_dim = pixels.shape[1] - pca.n_components_
    return coords, residual_log_density(squared_residuals(pca, pixels), variance, residual_dim)


def pca_rule(fitted: FittedPCA, config: PCAConfig) -> str:
    """Why the PCA kept as many components as it did, in a sentence."""
    reached = f"{fitted.variance_target:.0%} of the variance takes {fitted.components_for_target} components"
    if config.n_components is not None:
        return f"{reached}; {fitted.n_components} were asked for explicitly (keeping {fitted.variance_kept:.1%})."
    rounding = "; rounded to the nearest power of two" if config.round_to_power_of_two else ""
    return f"{reached}{rounding}: {fitted.n_components} kept ({fitted.variance_kept:.1%} of the variance)."


# What pca.npz holds: the fitted attributes scikit-learn's transform and inverse_transform use, and
# what describes the fit. Arrays only: the file is read with allow_pickle=False, never unpickled.
PCA_ARRAYS = ("components_", "mean_", "explained_variance_", "explained_variance_ratio_", "singular_values_")
PCA_NUMBERS = ("n_components_", "n_samples_", "n_features_in_", "noise_variance_")
# A PCA of 64x64 faces: 4096 pixels, at most 4096 components; the file is refused beyond this.
PCA_MAX_BYTES = 2 * 4096 * 4096 * 8


class PCAFileError(ValueError):
    """A pca.npz that is not a fitted PCA of faceflow's; the message names the file."""


def estimator_bytes(pca: PCA) -> bytes:
    """The fitted PCA as pca.npz's bytes: its arrays, never a pickle."""
    arrays = {name: np.asarray(getattr(pca, name), dtype=np.float64) for name in PCA_ARRAYS}
    numbers = {name: np.asarray(getattr(pca, name)) for name in PCA_NUMBERS}
    return npz_bytes(arrays | numbers | {"whiten": np.asarray(bool(pca.whiten))})


def read_estimator(source: bytes, name: str) -> PCA:
    """A scikit-learn PCA rebuilt from pca.npz's arrays; PCAFileError naming ``name`` when they are not one."""
    try:
        stored = read_npz(source, name, PCA_MAX_BYTES)
    except ArchiveError as error:
        raise PCAFileError(str(error)) from None
    missing = [key for key in (*PCA_ARRAYS, *PCA_NUMBERS, "whiten") if key not in stored]
    if missing:
        raise PCAFileError(f"{name}: not a fitted PCA (no {', '.join(missing)})")
    components, mean = stored["components_"], stored["mean_"]
    count = components.shape[0] if components.ndim == 2 else -1
    problems = [
        components.ndim != 2 and f"components_ has shape {components.shape}",
        mean.shape != components.shape[1:] and f"mean_ has shape {mean.shape}, components_ {components.shape}",
        *(stored[key].shape != (count,) and f"{key} has shape {stored[key].shape}, not ({count},)"
          for key in PCA_ARRAYS[2:]),
        int(stored["n_components_"]) != count and f"n_components_ is {int(stored['n_components_'])}, components_ has {count} rows",
        not all(np.isfinite(stored[key]).all() for key in PCA_ARRAYS) and "non-finite values",
    ]
    problems = [problem for problem in problems if problem]
    if problems:
        raise PCAFileError(f"{name}: not a fitted PCA ({'; '.join(problems)})")
    pca = PCA(n_components=count, whiten=bool(stored["whiten"]))
    for key in PCA_ARRAYS:
        setattr(pca, key, stored[key])
    pca.n_components_ = count
    pca.n_samples_, pca.n_features_in_ = int(stored["n_samples_"]), int(stored["n_features_in_"])
    pca.noise_variance_ = float(stored["noise_variance_"])
    return pca


def load_estimator(fitted: FittedPCA) -> PCA:
    """The fitted scikit-learn PCA behind ``fitted`` (read-only: it is shared between callers)."""
    return _read_estimator(fitted.estimator)


@functools.lru_cache(maxsize=2)
def _read_estimator(estimator: bytes) -> PCA:
    # Sampling maps three sets of coordinates back to pixels: one read, not three.
    return read_estimator(estimator, "the fitted PCA (pca.npz)")


def to_pixels(fitted: FittedPCA, coords: np.ndarray) -> np.ndarray:
    """PCA coordinates back to flattened pixels (the PCA's own inverse transform)."""
    return load_estimator(fitted).inverse_transform(np.asarray(coords, dtype=np.float64))
