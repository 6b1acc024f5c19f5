"""The champion: the model in use, replaced only by a challenger that is better on validation faces.

The champion lives in ``models/champion``, a link to ``models/champion-<run>/`` holding
model.pt, pca.joblib, split.json, metrics.json and champion.json (this record). A promotion
writes the new folder whole, then swaps the link in one rename, so a reader sees the old
champion or the new one, never a mix. Held-out faces never decide anything here: they stay
for the report, so the champion's held-out figure remains an honest estimate.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import joblib
import numpy as np
import torch

from tasks.model import load_checkpoint, seeded
from tasks.olivetti import IMAGE_SHAPE

CHAMPION_FILES = ("model.pt", "pca.joblib", "split.json", "metrics.json")
RECORD = "champion.json"
LEADERBOARD = "leaderboard.json"


class ChampionError(ValueError):
    """The champion, or input meant for it, cannot be used."""


@dataclass(frozen=True)
class ChampionRecord:
    """Who the champion is and how good: mirrored in the Prefect Variable ``faceflow-champion``."""

    run_folder: str
    flow_run_id: str
    seed: int
    config_digest: str
    validation_log_prob: float
    heldout_log_prob: float
    promoted_at: str
    metrics: dict[str, float]

    def to_json(self) -> dict[str, object]:
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(challenger_validation: float, champion_validation: float | None, margin: float) -> Decision:
    """Promote when there is no champion, or the challenger's validation log p beats the champion's by ``margin``."""
    if not math.isfinite(challenger_validation):
        return Decision(False, f"challenger's validation log p is {challenger_validation}: not a model to use")
    if champion_validation is None:
        return Decision(True, "first champion")
    gain = challenger_validation - champion_validation
    if gain > margin:
        return Decision(True, f"validation log p {challenger_validation:.2f} beats the champion's {champion_validation:.2f} by {gain:.2f} > {margin:g} nats")
    return Decision(
        False, f"validation log p {challenger_validation:.2f} against the champion's {champion_validation:.2f}: "
        f"{gain:+.2f}, not more than the {margin:g}-nat margin",
    )


def champion_path(models_dir: Path) -> Path:
    return models_dir / "champion"


def read_champion(models_dir: Path) -> ChampionRecord | None:
    """The current champion's record, or None before the first promotion."""
    record = champion_path(models_dir) / RECORD
    if not record.is_file():
        return None
    return ChampionRecord(**json.loads(record.read_text()))


def install_champion(run_folder: Path, record: ChampionRecord, models_dir: Path) -> Path:
    """Copy the run's model files into models/champion-<run>/, then point models/champion at it atomically."""
    models_dir.mkdir(parents=True, exist_ok=True)
    target = models_dir / f"champion-{run_folder.name.removeprefix('run-')}-{record.seed}"
    staging = Path(tempfile.mkdtemp(dir=models_dir, prefix=f".{target.name}.", suffix=".partial"))
    try:
        for name in CHAMPION_FILES:
            shutil.copy2(run_folder / name, staging / name)
        (staging / RECORD).write_text(json.dumps(record.to_json(), indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    link = champion_path(models_dir)
    temporary_link = models_dir / f".champion.{os.getpid()}.link"
    temporary_link.unlink(missing_ok=True)
    temporary_link.symlink_to(target.name)
    os.replace(temporary_link, link)  # one rename: readers see the old champion or the new one
    return target


def append_leaderboard(models_dir: Path, row: dict[str, object]) -> list[dict[str, object]]:
    """Add one challenger's row to models/leaderboard.json (written whole, atomically); returns every row."""
    models_dir.mkdir(parents=True, exist_ok=True)
    path = models_dir / LEADERBOARD
    rows = json.loads(path.read_text()) if path.is_file() else []
    rows.append(row)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(rows, indent=1))
    os.replace(temporary, path)
    return rows


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def load_champion_model(models_dir: Path):
    """(flow, fitted PCA) of the champion; a clear error when there is none."""
    folder = champion_path(models_dir)
    if not (folder / "model.pt").is_file():
        raise ChampionError(f"no champion in {str(models_dir)!r} yet: run the retraining flow (weekly-retrain) first")
    model, _ = load_checkpoint(folder / "model.pt")
    pca = joblib.load(folder / "pca.joblib")
    return model, pca


def champion_log_prob(models_dir: Path, pixels: np.ndarray) -> np.ndarray:
    """log p (nats per face, in the champion's PCA coordinates) of flattened 64x64 faces in [0, 1]."""
    model, pca = load_champion_model(models_dir)
    coords = pca.transform(np.asarray(pixels, dtype=np.float64).reshape(len(pixels), -1)).astype(np.float32)
    with torch.no_grad():
        return model.log_prob(torch.from_numpy(coords)).double().numpy()


def champion_samples(models_dir: Path, n: int, temperature: float, seed: int) -> np.ndarray:
    """``n`` new faces (n, 64, 64) in [0, 1] drawn from the champion, no flow run needed."""
    model, pca = load_champion_model(models_dir)
    with seeded(seed), torch.no_grad():
        model.q0.temperature = temperature
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


def figure_path_bytes(images: np.ndarray) -> bytes:
    """A montage of ``images`` as PNG bytes."""
    from artifacts import figures

    return figures.png_bytes(figures.sample_grid(images, np.full(len(images), np.nan), temperature=float("nan")))


def save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    path.write_bytes(buffer.getvalue())
