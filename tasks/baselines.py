"""Reference density models on the same split, so the flow's number means something."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from prefect import task
from scipy.stats import norm
from sklearn.mixture import GaussianMixture

from faceflow.caching import KEYED_INPUTS, content_key
from faceflow.config import BaselineConfig
from tasks.data import Split
from tasks.pca import FittedPCA


@dataclass(frozen=True)
class BaselineResult:
    name: str
    heldout_log_prob: float
    validation_log_prob: float | None
    train_seconds: float
    detail: str


@dataclass(frozen=True)
class Baselines:
    key: str
    results: list[BaselineResult]


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def diagonal_gaussian(fit: np.ndarray, validation: np.ndarray, heldout: np.ndarray) -> BaselineResult:
    """Independent Gaussians per component: what PCA alone implies."""
    started = time.perf_counter()
    mean, std = fit.mean(0), fit.std(0)
    def log_p(x: np.ndarray) -> np.ndarray:
        return norm.logpdf(x, mean, std).sum(1)
    return BaselineResult(
        "diagonal Gaussian", float(log_p(heldout).mean()), _mean_or_none(log_p(validation)),
        time.perf_counter() - started, "per-component mean and variance",
    )


def best_gaussian_mixture(
    fit: np.ndarray, validation: np.ndarray, heldout: np.ndarray, max_components: int, seed: int
) -> BaselineResult:
    """Full-covariance GaussianMixture; the component count that scores best on validation (BIC without one)."""
    started = time.perf_counter()
    candidates = [
        GaussianMixture(k, covariance_type="full", random_state=seed).fit(fit)
        for k in range(1, max_components + 1)
    ]
    if len(validation):
        best = max(candidates, key=lambda m: m.score(validation))
    else:
        best = min(candidates, key=lambda m: m.bic(fit))
    return BaselineResult(
        "GaussianMixture", float(best.score_samples(heldout).mean()),
        float(best.score(validation)) if len(validation) else None,
        time.perf_counter() - started, f"{best.n_components} of 1..{max_components} components",
    )


def lab_recipe(fit: np.ndarray, validation: np.ndarray, heldout: np.ndarray, seed: int) -> BaselineResult:
    """The lab notebook's RealNVP recipe, unchanged."""
    from tasks.lab_recipe import LAB_EPOCHS, train_lab_recipe

    started = time.perf_counter()
    model, _ = train_lab_recipe(torch.from_numpy(fit), seed)
    with torch.no_grad():
        heldout_lp = model.log_prob(torch.from_numpy(heldout)).double().mean().item()
        val_lp = model.log_prob(torch.from_numpy(validation)).double().mean().item() if len(validation) else None
    return BaselineResult(
        "lab recipe", heldout_lp, val_lp, time.perf_counter() - started,
        f"MaskedAffineFlow x8, Adam 1e-4, StepLR(12, 0.6), {LAB_EPOCHS} epochs",
    )


def fit_baseline_models(pca: FittedPCA, split: Split, config: BaselineConfig, seed: int) -> Baselines:
    """Every configured baseline, fitted on the fit part and judged on the held-out faces."""
    fit, validation, heldout = (pca.coords[index].astype(np.float64) for index in (split.fit, split.validation, split.heldout))
    results = [
        diagonal_gaussian(fit, validation, heldout),
        best_gaussian_mixture(fit, validation, heldout, config.gmm_max_components, seed),
    ]
    if config.include_lab_recipe:
        results.append(lab_recipe(fit.astype(np.float32), validation.astype(np.float32), heldout.astype(np.float32), seed))
    return Baselines(content_key("baselines", pca, split, config, seed), results)


@task(name="fit_baselines", cache_policy=KEYED_INPUTS, persist_result=True)
def fit_baselines(pca: FittedPCA, split: Split, config: BaselineConfig, seed: int) -> Baselines:
    """Diagonal Gaussian, GaussianMixture and optionally the lab recipe, on the same split."""
    return fit_baseline_models(pca, split, config, seed)
