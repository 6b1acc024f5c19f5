"""The lab notebook's recipe as a plain script, re-implemented faithfully as the reference.

400 faces -> PCA(64) -> normflows MaskedAffineFlow x8 (hidden 128) + ActNorm, DataLoader
batch 32, Adam 1e-4, StepLR(12, 0.6), 150 epochs; then samples, log-probs and an
interpolation, as the notebook did. Torch's default thread count, as the notebook had.
Prints one JSON line: training seconds, steps, steps per second.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import numpy as np
    import torch
    from sklearn.decomposition import PCA

    from faceflow.settings import data_file_from_environment
    from tasks.olivetti import read_olivetti_mat
    from tasks.lab_recipe import LAB_EPOCHS, train_lab_recipe

    epochs = int(sys.argv[1]) if len(sys.argv) > 1 else LAB_EPOCHS
    images, _ = read_olivetti_mat(data_file_from_environment())  # as the notebook's fetch_olivetti_faces
    faces = images.reshape(len(images), -1)
    coords = PCA(n_components=64, svd_solver="full").fit_transform(faces).astype(np.float32)

    started = time.perf_counter()
    model, steps = train_lab_recipe(torch.from_numpy(coords), seed=0, epochs=epochs)
    train_seconds = time.perf_counter() - started

    with torch.no_grad():
        samples, _ = model.sample(16)
        log_p = model.log_prob(torch.from_numpy(coords[:16]))
        z = model.inverse(torch.from_numpy(coords[[0, 130]]))
        path = torch.stack([(1 - w) * z[0] + w * z[1] for w in torch.linspace(0, 1, 8)])
        model.forward(path)
    print(json.dumps({
        "train_seconds": train_seconds, "steps": steps, "steps_per_second": steps / train_seconds,
        "threads": torch.get_num_threads(), "sample_finite": bool(torch.isfinite(samples).all()),
        "mean_log_prob_of_own_faces": float(log_p.mean()),
    }))


if __name__ == "__main__":
    main()
