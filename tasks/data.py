"""Fetch the Olivetti faces and split them into fit, validation and held-out parts."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from prefect import task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from faceflow.caching import KEYED_INPUTS, array_digest, content_key
from faceflow.config import IMAGES_PER_PERSON, DataConfig
from faceflow.settings import DATA_FILE_VARIABLE, data_file_from_environment, download_timeout
from tasks.olivetti import DataFileError, read_olivetti_mat

class DataUnavailableError(ConnectionError):
    """No local data file and the download failed."""


@dataclass(frozen=True)
class Faces:
    """The 400 images (float32 in [0, 1]) and person ids, as scikit-learn returns them."""

    key: str
    images: np.ndarray  # (400, 64, 64) float32
    target: np.ndarray  # (400,) int, person 0..39

    @property
    def flat(self) -> np.ndarray:
        return self.images.reshape(len(self.images), -1)


@dataclass(frozen=True)
class Split:
    """Indices into the 400 faces: what the models fit on, early-stop on, and are judged on."""

    key: str
    fit: np.ndarray
    validation: np.ndarray
    heldout: np.ndarray

    def to_json(self) -> str:
        return json.dumps(
            {
                "train": sorted(int(i) for i in np.concatenate([self.fit, self.validation])),
                "fit": self.fit.tolist(),
                "validation": self.validation.tolist(),
                "heldout": self.heldout.tolist(),
            },
            indent=1,
        )


@contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """Bound every network read in the block: scikit-learn's download sets no timeout and hung for good on a stalled connection."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def download_olivetti() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's download, which keeps its own on-disk cache; the fetch task retries it."""
    from sklearn.datasets import fetch_olivetti_faces

    with socket_timeout(download_timeout()):
        bunch = fetch_olivetti_faces(shuffle=False, n_retries=1)  # its least; the task retries more
    return bunch.images.astype(np.float32), bunch.target


def load_faces(
    data_file: Path | None,
    download: Callable[[], tuple[np.ndarray, np.ndarray]] = download_olivetti,
) -> Faces:
    """Faces from ``data_file`` if given, else from ``download``."""
    if data_file is not None:
        images, target = read_olivetti_mat(data_file)
    else:
        try:
            images, target = download()
        except OSError as error:
            raise DataUnavailableError(
                f"no data file was given and downloading the Olivetti faces failed ({error}). "
                f"Provide a local olivettifaces.mat with --data-file PATH or the environment "
                f"variable {DATA_FILE_VARIABLE}=PATH."
            ) from error
    return Faces(key=content_key("faces", array_digest(images), array_digest(target)), images=images, target=target)


def resolve_data_file(config: DataConfig) -> Path | None:
    """The data file a run reads: the config's, else FACEFLOW_DATA_FILE's, else none."""
    path = config.data_file or data_file_from_environment()
    if path is not None and not path.is_file():
        raise DataFileError(f"data file {str(path)!r} does not exist or is not a file")
    return path


def _person_orders(target: np.ndarray, split_seed: int) -> list[np.ndarray]:
    """Each person's image indices in a seeded order; a split takes its parts from the front."""
    rng = np.random.default_rng(split_seed)
    return [rng.permutation(np.flatnonzero(target == person)) for person in np.unique(target)]


def _split_from(fit: list[int], validation: list[int], heldout: list[int]) -> Split:
    parts = [np.sort(np.asarray(p, dtype=np.int64)) for p in (fit, validation, heldout)]
    return Split(content_key("split", *(p.tolist() for p in parts)), *parts)


def split_indices(target: np.ndarray, config: DataConfig) -> Split:
    """Per person, a seeded choice of held-out and validation images; the rest is fitted on."""
    fit, validation, heldout = [], [], []
    n_held, n_val = config.heldout_per_person, config.validation_per_person
    for order in _person_orders(target, config.split_seed):
        heldout.extend(order[:n_held])
        validation.extend(order[n_held : n_held + n_val])
        fit.extend(order[n_held + n_val :])
    return _split_from(fit, validation, heldout)


def tuning_split_indices(target: np.ndarray, config: DataConfig) -> Split:
    """The split a recipe is tuned on: the held-out images are dropped, never read.

    Per person, the image after the held-out ones (the validation image of the default split)
    becomes the tuning judge, returned as the held-out part; the recipe's own validation and fit
    images come from the rest. A recipe is then trained exactly as in a run, one image per person
    short, and scored on faces that no part of the recipe saw, whatever it does with its own
    validation images (early stopping, or none and training on them).
    """
    fit, validation, judge = [], [], []
    n_held, n_val = config.heldout_per_person, config.validation_per_person
    if IMAGES_PER_PERSON - n_held - n_val < 2:
        raise ValueError("tuning needs each person to keep a judge image and a fit image beside the held-out ones")
    for order in _person_orders(target, config.split_seed):
        judge.append(order[n_held])
        validation.extend(order[n_held + 1 : n_held + 1 + n_val])
        fit.extend(order[n_held + 1 + n_val :])
    return _split_from(fit, validation, judge)


def _is_network_failure(task: object, task_run: TaskRun, state: State) -> bool:
    """Retry only what a retry can fix: a failed download."""
    try:
        state.result()
    except DataUnavailableError:
        return True
    except Exception:
        return False
    return False


@task(
    name="fetch_faces",
    cache_policy=KEYED_INPUTS,
    persist_result=True,
    retries=3,
    retry_delay_seconds=[2, 10, 30],
    retry_condition_fn=_is_network_failure,
)
def fetch_faces(data_file: Path | None) -> Faces:
    """The 400 Olivetti faces from a local file or scikit-learn's download."""
    return load_faces(data_file)


@task(name="split_faces", cache_policy=KEYED_INPUTS, persist_result=True)
def split_faces(faces: Faces, config: DataConfig) -> Split:
    """Seeded held-out / validation / fit split, a fixed number of images per person."""
    return split_indices(faces.target, config)
