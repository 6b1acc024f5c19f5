"""Held-out quality: the default pipeline's model against the baselines, on the same split."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from faceflow.config import FaceflowConfig
from tasks.baselines import best_gaussian_mixture, diagonal_gaussian, lab_recipe
from tasks.data import load_faces, split_indices
from tasks.pca import fit_pca_on
from tasks.score import bits_per_dim, flow_log_prob
from tasks.train import make_batches, train_flow


def quality_table(data_file: Path, seeds: tuple[int, ...] = (0, 1, 2), split_seeds: tuple[int, ...] = (0, 1, 2)) -> list[dict]:
    """One row per method (and seed): held-out log p, bits/dim, training seconds."""
    rows = []
    config = FaceflowConfig()
    faces = load_faces(data_file)
    for split_seed in split_seeds:
        data_config = config.data.model_copy(update={"split_seed": split_seed})
        split = split_indices(faces.target, data_config)
        pca = fit_pca_on(faces, split, config.pca)
        fit, validation, heldout = (pca.coords[i].astype(np.float64) for i in (split.fit, split.validation, split.heldout))
        dim = pca.n_components
        baselines = [diagonal_gaussian(fit, validation, heldout),
                     best_gaussian_mixture(fit, validation, heldout, config.baselines.gmm_max_components, 0),
                     lab_recipe(fit.astype(np.float32), validation.astype(np.float32), heldout.astype(np.float32), 0)]
        for result in baselines:
            rows.append({"method": result.name, "split_seed": split_seed, "seed": 0,
                         "heldout_log_prob": result.heldout_log_prob,
                         "bits_per_dim": bits_per_dim(result.heldout_log_prob, dim),
                         "train_seconds": result.train_seconds})
        for seed in seeds:
            batches = make_batches(pca, split, config.train, seed)
            trained = train_flow(batches, config.train, seed)
            heldout_log_prob = float(flow_log_prob(trained.model(), pca.coords[split.heldout]).mean())
            rows.append({"method": "faceflow default", "split_seed": split_seed, "seed": seed,
                         "heldout_log_prob": heldout_log_prob, "bits_per_dim": bits_per_dim(heldout_log_prob, dim),
                         "train_seconds": trained.seconds})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and range per method over every split and seed."""
    summary = []
    for method in dict.fromkeys(row["method"] for row in rows):
        values = [row["heldout_log_prob"] for row in rows if row["method"] == method]
        seconds = [row["train_seconds"] for row in rows if row["method"] == method]
        summary.append({"method": method, "runs": len(values), "mean_heldout_log_prob": float(np.mean(values)),
                        "worst": float(np.min(values)), "best": float(np.max(values)),
                        "mean_bits_per_dim": float(np.mean([r["bits_per_dim"] for r in rows if r["method"] == method])),
                        "mean_train_seconds": float(np.mean(seconds))})
    return summary
