"""Reference density models on the same split, so the flow's number means something.

Every baseline is a density of PCA coordinates, exactly as the flow's log p is; its image-space
log p (of the pixels) adds the same probabilistic-PCA residual term (tasks.pca). A baseline with
a hyperparameter (the KDE's bandwidth, the mixture's component count) chooses it on the split's
validation faces; a split without any (``validation_per_person`` 0) chooses it by
cross-validation over the fit faces and refits on all of them. Held-out faces never choose.
Beyond SAMPLE_ABOVE fit faces (not on the Olivetti version), the KDE's kernels, and the faces the
mixture's count is chosen on, are a seeded sample of them: the cost then grows with the faces.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from scipy.special import logsumexp
from scipy.stats import norm
from sklearn.mixture import GaussianMixture

from faceflow.config import BaselineConfig
from faceflow.keys import content_key
from tasks.pca import residual_log_density
from tasks.results import BaselineResult, Baselines, FittedPCA, Split

# Kernel widths in whitened units (each component divided by its std on the fit faces). The
# validation optimum on the default split is 0.70; the grid reaches well past it on both sides.
KDE_BANDWIDTHS = tuple(round(0.30 + 0.05 * step, 2) for step in range(25))  # 0.30 .. 1.50
# Above this many fit faces, a seeded random sample of this many stands in for them where the cost
# would grow faster than the faces: the KDE's kernels (its cost is queries x kernels, so on every
# fit face the square of the faces) and the faces the mixture's component count is chosen on
# (20 counts x 5 folds of fits; the chosen count is then fitted on every fit face). Six times the
# Olivetti version's 326 fit faces, which keep every one; with every one of 3,200 fit faces the
# step took 14x its time on 326 (docs/benchmarks.md).
SAMPLE_ABOVE = 2048
# Queries per block of the KDE's distance matrix (float64, queries x kernels: 16 MB at 2,048 kernels).
KDE_QUERY_BLOCK = 1024
# Draws that sample; apart from the folds' and the mixture's random streams.
_SAMPLE_STREAM = 2
# Folds of the fit faces that stand in for validation faces when a split has none.
SELECTION_FOLDS = 5

LogProb = Callable[[np.ndarray], np.ndarray]
Choice = TypeVar("Choice")


@dataclass(frozen=True)
class FittedBaseline:
    """A fitted baseline: what it is, what was chosen, and its log-density in PCA coordinates."""

    name: str
    detail: str
    log_prob: LogProb
    validation_log_prob: float | None
    train_seconds: float

    def result(self, heldout: np.ndarray, heldout_residual_log_prob: np.ndarray) -> BaselineResult:
        """Judged on ``heldout`` coordinates; their residuals' log-density makes the image-space figure."""
        log_p = np.asarray(self.log_prob(heldout), dtype=np.float64)
        return BaselineResult(
            self.name, float(log_p.mean()), float((log_p + heldout_residual_log_prob).mean()),
            self.validation_log_prob, self.train_seconds, self.detail,
        )


def selection_folds(n: int, seed: int, folds: int = SELECTION_FOLDS) -> list[np.ndarray]:
    """A seeded partition of range(n) into ``folds`` near-equal parts."""
    return np.array_split(np.random.default_rng(seed).permutation(n), folds)


def choose_on_validation(
    fit: np.ndarray,
    validation: np.ndarray,
    candidates: Sequence[Choice],
    fit_candidate: Callable[[np.ndarray, Choice], LogProb],
    seed: int,
) -> tuple[Choice, LogProb, float]:
    """(best candidate, its density fitted on all fit faces, its mean validation log p).

    Scored on the validation faces; without any, on ``SELECTION_FOLDS`` folds of the fit faces
    in turn (each fitted on the rest), then refitted on all of them.
    """
    if len(validation):
        fitted = [fit_candidate(fit, candidate) for candidate in candidates]
        scores = [float(log_prob(validation).mean()) for log_prob in fitted]
        best = int(np.argmax(scores))
        return candidates[best], fitted[best], scores[best]
    folds = selection_folds(len(fit), seed)
    scores = []
    for candidate in candidates:
        fold_scores = []
        for fold in folds:
            rest = np.delete(fit, fold, axis=0)
            fold_scores.append(fit_candidate(rest, candidate)(fit[fold]))
        scores.append(float(np.concatenate(fold_scores).mean()))
    best = int(np.argmax(scores))
    return candidates[best], fit_candidate(fit, candidates[best]), scores[best]


def diagonal_gaussian(fit: np.ndarray) -> FittedBaseline:
    """Independent Gaussians per component: what PCA alone implies."""
    started = time.perf_counter()
    mean, std = fit.mean(0), fit.std(0)

    def log_prob(x: np.ndarray) -> np.ndarray:
        return norm.logpdf(x, mean, std).sum(1)

    return FittedBaseline("diagonal Gaussian", "per-component mean and variance", log_prob, None, time.perf_counter() - started)


def whitened_squared_distances(x: np.ndarray, centres: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(queries, centres) squared distances after dividing each component by ``scale``, in float64.

    From ||x||^2 - 2 x.c + ||c||^2, one matrix product: on whitened faces (squared norms about
    the dimension) it agrees with the direct sum of squared differences to about 1e-13.
    """
    xs, cs = x / scale, centres / scale
    squared = (xs**2).sum(1)[:, None] - 2.0 * (xs @ cs.T) + (cs**2).sum(1)[None, :]
    return np.maximum(squared, 0.0)


def kde_log_probs(x: np.ndarray, centres: np.ndarray, scale: np.ndarray, bandwidths: Sequence[float]) -> np.ndarray:
    """(bandwidths, queries): the exact log-density at ``x`` of the KDE at each bandwidth.

    The KDE is an equal-weight mixture of N(centre, diag((bandwidth * scale)**2)). Float64
    throughout, with a log-sum-exp over the centres: scikit-learn's KernelDensity on the float32
    coordinates gave wrong, non-monotone values here. The kernel's covariance carries the
    whitening, so this is a density of the coordinates themselves, whitening Jacobian included.
    The distances do not depend on the bandwidth: computed once per block of queries, for all.
    """
    x, centres, scale = (np.asarray(a, dtype=np.float64) for a in (x, centres, scale))
    log_norms = [np.log(bandwidth * scale).sum() + 0.5 * x.shape[1] * np.log(2 * np.pi) + np.log(len(centres))
                 for bandwidth in bandwidths]
    log_p = np.empty((len(bandwidths), len(x)), dtype=np.float64)
    for start in range(0, len(x), KDE_QUERY_BLOCK):
        squared = whitened_squared_distances(x[start : start + KDE_QUERY_BLOCK], centres, scale)
        for row, (bandwidth, log_norm) in enumerate(zip(bandwidths, log_norms)):
            log_p[row, start : start + KDE_QUERY_BLOCK] = logsumexp(-0.5 * squared / bandwidth**2, axis=1) - log_norm
    return log_p


def kde_log_prob(x: np.ndarray, centres: np.ndarray, scale: np.ndarray, bandwidth: float) -> np.ndarray:
    """Exact log-density at ``x`` of the KDE with kernels on ``centres`` at one bandwidth (kde_log_probs)."""
    return kde_log_probs(x, centres, scale, [bandwidth])[0]


def fit_sample(fit: np.ndarray, seed: int) -> np.ndarray:
    """Every fit face up to SAMPLE_ABOVE of them, else a seeded random sample of SAMPLE_ABOVE, in fit order."""
    if len(fit) <= SAMPLE_ABOVE:
        return fit
    chosen = np.random.default_rng((seed, _SAMPLE_STREAM)).choice(len(fit), SAMPLE_ABOVE, replace=False)
    return fit[np.sort(chosen)]


def _sample_note(sample: np.ndarray, fit: np.ndarray, what: str) -> str:
    return f"; {what} {len(sample):,} of the {len(fit):,} fit faces, drawn at random" if len(sample) < len(fit) else ""


def gaussian_kde(fit: np.ndarray, validation: np.ndarray, seed: int, bandwidths: Sequence[float] = KDE_BANDWIDTHS) -> FittedBaseline:
    """Gaussian kernels on the fit faces (a sample of SAMPLE_ABOVE beyond that) in per-component-whitened coordinates.

    The bandwidth is chosen on the validation faces; without any, on SELECTION_FOLDS folds of the
    kernels' faces in turn, each scored by a KDE on the rest (as ``choose_on_validation`` does).
    """
    started = time.perf_counter()
    kernels = fit_sample(fit, seed)
    if len(validation):
        scores = kde_log_probs(validation, kernels, kernels.std(0), bandwidths).mean(1)
    else:
        scored = []
        for fold in selection_folds(len(kernels), seed):
            rest = np.delete(kernels, fold, axis=0)
            scored.append(kde_log_probs(kernels[fold], rest, rest.std(0), bandwidths))
        scores = np.concatenate(scored, axis=1).mean(1)
    best = int(np.argmax(scores))
    bandwidth, scale = bandwidths[best], kernels.std(0)
    return FittedBaseline(
        "Gaussian KDE",
        f"bandwidth {bandwidth:.2f} (whitened units) of {bandwidths[0]:.2f}..{bandwidths[-1]:.2f}"
        + _sample_note(kernels, fit, "kernels on"),
        lambda x: kde_log_prob(x, kernels, scale, bandwidth), float(scores[best]), time.perf_counter() - started,
    )


def diagonal_mixture(fit: np.ndarray, validation: np.ndarray, max_components: int, seed: int) -> FittedBaseline:
    """Diagonal-covariance GaussianMixture; the component count that scores best on validation.

    The count is chosen on a sample of the fit faces beyond SAMPLE_ABOVE of them (fit_sample),
    then that count is fitted on every fit face.
    """
    started = time.perf_counter()

    def fit_mixture(data: np.ndarray, components: int) -> LogProb:
        return GaussianMixture(components, covariance_type="diag", random_state=seed).fit(data).score_samples

    chooser = fit_sample(fit, seed)
    components, log_prob, score = choose_on_validation(chooser, validation, list(range(1, max_components + 1)), fit_mixture, seed)
    if len(chooser) < len(fit):
        log_prob = fit_mixture(fit, components)
        score = float(log_prob(validation).mean()) if len(validation) else score
    return FittedBaseline(
        "GaussianMixture",
        f"diagonal, {components} of 1..{max_components} components" + _sample_note(chooser, fit, "chosen on"),
        log_prob, score, time.perf_counter() - started,
    )


def lab_recipe(fit: np.ndarray, validation: np.ndarray, seed: int) -> FittedBaseline:
    """The lab notebook's RealNVP recipe, unchanged."""
    from tasks.lab_recipe import LAB_EPOCHS, train_lab_recipe

    started = time.perf_counter()
    model, _ = train_lab_recipe(torch.from_numpy(fit.astype(np.float32)), seed)

    def log_prob(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model.log_prob(torch.from_numpy(x.astype(np.float32))).double().numpy()

    seconds = time.perf_counter() - started
    return FittedBaseline(
        "lab recipe", f"MaskedAffineFlow x8, Adam 1e-4, StepLR(12, 0.6), {LAB_EPOCHS} epochs", log_prob,
        float(log_prob(validation).mean()) if len(validation) else None, seconds,
    )


def fit_baseline_densities(fit: np.ndarray, validation: np.ndarray, config: BaselineConfig, seed: int) -> list[FittedBaseline]:
    """Every configured baseline, fitted on ``fit``; choices made on ``validation`` (or folds of ``fit``)."""
    fitted = [
        diagonal_gaussian(fit),
        diagonal_mixture(fit, validation, config.gmm_max_components, seed),
        gaussian_kde(fit, validation, seed),
    ]
    if config.include_lab_recipe:
        fitted.append(lab_recipe(fit, validation, seed))
    return fitted


def fit_baseline_models(pca: FittedPCA, split: Split, config: BaselineConfig, seed: int) -> Baselines:
    """Every configured baseline, fitted on the fit part and judged on the held-out faces."""
    fit, validation, heldout = (pca.coords[index].astype(np.float64) for index in (split.fit, split.validation, split.heldout))
    residual = residual_log_density(pca.residual_squared[split.heldout], pca.residual_variance, pca.residual_dim)
    results = [model.result(heldout, residual) for model in fit_baseline_densities(fit, validation, config, seed)]
    return Baselines(content_key("baselines", pca, split, config, seed), results)
