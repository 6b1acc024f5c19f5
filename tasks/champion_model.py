"""The champion at work without a flow run: log p of anyone's faces, and new faces from it.

Each use opens the champion once (``open_champion``: the link resolved once, every file read
from the folder it named), so a promotion in between never pairs one champion's flow with
another's PCA.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tasks.champion import ChampionError, pause_point, resolve_champion
from tasks.model import load_checkpoint, seeded
from tasks.olivetti import IMAGE_SHAPE


@dataclass(frozen=True)
class LoadedChampion:
    """A champion's model, PCA and residual variance, every file read from one folder."""

    folder: Path
    model: Any
    pca: Any
    residual_variance: float | None  # None for a champion promoted before image-space log p existed


def load_pca(folder: Path) -> Any:
    """The fitted PCA in a champion (or run) folder."""
    return read_champion_pca(folder)


def load_champion_from(folder: Path) -> LoadedChampion:
    """The champion in ``folder`` (a resolved champion folder, never the link): model, PCA, residual variance."""
    pca = load_pca(folder)
    pause_point("champion-read")  # test-only: a promotion may swap the link here; the next reads stay in ``folder``
    model, _ = load_checkpoint(folder / "model.pt")
    metrics = folder / "metrics.json"
    variance = json.loads(metrics.read_text()).get("pca_residual_variance") if metrics.is_file() else None
    usable = isinstance(variance, (int, float)) and variance > 0
    return LoadedChampion(folder, model, pca, float(variance) if usable else None)


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


def open_champion(models_dir: Path) -> LoadedChampion:
    """The current champion, its link resolved once; a clear error when there is none."""
    champion = resolve_champion(models_dir)
    if champion is None:
        raise ChampionError(f"no champion in {str(models_dir)!r} yet: run the retraining flow (weekly-retrain) first")
    return load_champion_from(champion.path)


def champion_log_prob(champion: LoadedChampion, pixels: np.ndarray) -> np.ndarray:
    """log p (nats per face, in the champion's PCA coordinates) of flattened 64x64 faces in [0, 1]."""
    coords = champion.pca.transform(np.asarray(pixels, dtype=np.float64).reshape(len(pixels), -1)).astype(np.float32)
    with torch.no_grad():
        return champion.model.log_prob(torch.from_numpy(coords)).double().numpy()


def champion_image_log_prob(champion: LoadedChampion, pixels: np.ndarray) -> np.ndarray | None:
    """log p of the pixels themselves (nats per face): the champion's PCA-space log p plus the residual's.

    sigma^2 is the one its run fitted (``pca_residual_variance`` in its metrics.json); None for a
    champion promoted before image-space log p existed.
    """
    from tasks.pca import pixel_scores

    if champion.residual_variance is None:
        return None
    coords, residual = pixel_scores(champion.pca, pixels, champion.residual_variance)
    with torch.no_grad():
        return champion.model.log_prob(torch.from_numpy(coords)).double().numpy() + residual


def champion_samples(champion: LoadedChampion, n: int, temperature: float, seed: int) -> np.ndarray:
    """``n`` new faces (n, 64, 64) in [0, 1] drawn from the champion, no flow run needed."""
    with seeded(seed), torch.no_grad():
        champion.model.set_temperature(temperature)
        coords, _ = champion.model.sample(n)
    pixels = champion.pca.inverse_transform(coords.double().numpy())
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
