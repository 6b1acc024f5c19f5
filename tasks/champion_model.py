"""The champion at work without a flow run: log p of anyone's faces, and new faces from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tasks.champion import ChampionError, champion_path
from tasks.model import load_checkpoint, seeded
from tasks.olivetti import IMAGE_SHAPE


def load_champion_model(models_dir: Path):
    """(flow, fitted PCA) of the champion; a clear error when there is none."""
    folder = champion_path(models_dir)
    if not (folder / "model.pt").is_file():
        raise ChampionError(f"no champion in {str(models_dir)!r} yet: run the retraining flow (weekly-retrain) first")
    model, _ = load_checkpoint(folder / "model.pt")
    return model, read_champion_pca(folder)


def read_champion_pca(folder: Path):
    """The champion's PCA from its pca.npz, arrays only; a folder that has only the pickled pca.joblib is refused."""
    from tasks.pca import PCAFileError, read_estimator

    path = folder / "pca.npz"
    if not path.is_file():
        if (folder / "pca.joblib").is_file():
            raise ChampionError(f"{folder / 'pca.joblib'}: a pickle, which faceflow no longer loads (it could run code); "
                                "retrain (faceflow retrain, or the weekly-retrain deployment) for a champion with pca.npz, "
                                "or roll back to one that has it")
        raise ChampionError(f"{path}: missing; the champion folder is not whole (faceflow champion --check)")
    try:
        return read_estimator(path.read_bytes(), str(path))
    except PCAFileError as error:
        raise ChampionError(str(error)) from None


def champion_log_prob(models_dir: Path, pixels: np.ndarray) -> np.ndarray:
    """log p (nats per face, in the champion's PCA coordinates) of flattened 64x64 faces in [0, 1]."""
    model, pca = load_champion_model(models_dir)
    coords = pca.transform(np.asarray(pixels, dtype=np.float64).reshape(len(pixels), -1)).astype(np.float32)
    with torch.no_grad():
        return model.log_prob(torch.from_numpy(coords)).double().numpy()


def champion_image_log_prob(models_dir: Path, pixels: np.ndarray) -> np.ndarray | None:
    """log p of the pixels themselves (nats per face): the champion's PCA-space log p plus the residual's.

    sigma^2 is the one its run fitted (``pca_residual_variance`` in its metrics.json); None for a
    champion promoted before image-space log p existed.
    """
    from tasks.pca import pixel_scores

    metrics = champion_path(models_dir) / "metrics.json"
    variance = json.loads(metrics.read_text()).get("pca_residual_variance") if metrics.is_file() else None
    if not isinstance(variance, (int, float)) or not variance > 0:
        return None
    model, pca = load_champion_model(models_dir)
    coords, residual = pixel_scores(pca, pixels, float(variance))
    with torch.no_grad():
        return model.log_prob(torch.from_numpy(coords)).double().numpy() + residual


def champion_samples(models_dir: Path, n: int, temperature: float, seed: int) -> np.ndarray:
    """``n`` new faces (n, 64, 64) in [0, 1] drawn from the champion, no flow run needed."""
    model, pca = load_champion_model(models_dir)
    with seeded(seed), torch.no_grad():
        model.set_temperature(temperature)
        coords, _ = model.sample(n)
    pixels = pca.inverse_transform(coords.double().numpy())
    return np.clip(pixels, 0.0, 1.0).reshape(n, *IMAGE_SHAPE).astype(np.float32)


def read_user_faces(path: Path) -> np.ndarray:
    """Faces from a .npy file: (n, 64, 64) or (n, 4096), finite, in [0, 1]; every problem names the file."""
    name = repr(str(path))
    if not path.is_file():
        raise ChampionError(f"faces file {name} does not exist or is not a file")
    try:
        faces = np.load(path, allow_pickle=False)  # data, never code
    except (ValueError, OSError, EOFError) as error:
        raise ChampionError(f"faces file {name} is not a readable .npy array ({error})") from None
    if not np.issubdtype(faces.dtype, np.number) or np.issubdtype(faces.dtype, np.complexfloating):
        raise ChampionError(f"faces file {name} holds {faces.dtype} values; expected real pixel values in [0, 1]")
    if faces.ndim == 3 and faces.shape[1:] == IMAGE_SHAPE:
        faces = faces.reshape(len(faces), -1)
    if faces.ndim != 2 or faces.shape[1] != IMAGE_SHAPE[0] * IMAGE_SHAPE[1] or len(faces) == 0:
        raise ChampionError(f"faces file {name} has shape {faces.shape}; expected (n, 64, 64) or (n, 4096) with n >= 1")
    if not np.isfinite(faces).all():
        raise ChampionError(f"faces file {name} holds {int((~np.isfinite(faces)).sum())} non-finite values (NaN or inf)")
    if faces.min() < 0.0 or faces.max() > 1.0:
        raise ChampionError(
            f"faces file {name} has values from {faces.min():g} to {faces.max():g}; expected [0, 1], as faceflow's faces are"
        )
    return faces.astype(np.float64)
