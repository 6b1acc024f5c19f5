"""Fetch the Olivetti faces and split them into fit, validation and held-out parts."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from faceflow.keys import array_digest, content_key, file_sha256
from faceflow.config import IMAGES_PER_PERSON, DataConfig
from faceflow.settings import DATA_FILE_VARIABLE, data_file_from_environment, download_timeout
from tasks.olivetti import DataFileError, read_olivetti_mat
from tasks.results import Faces, Split

DOWNLOAD_SOURCE = "scikit-learn's download"


class DataUnavailableError(ConnectionError):
    """No local data file and the download failed."""


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
        source, sha256 = str(data_file), file_sha256(data_file)
    else:
        try:
            images, target = download()
        except OSError as error:
            raise DataUnavailableError(
                f"no data file was given and downloading the Olivetti faces failed ({error}). "
                f"Provide a local olivettifaces.mat with --data-file PATH or the environment "
                f"variable {DATA_FILE_VARIABLE}=PATH."
            ) from error
        source, sha256 = DOWNLOAD_SOURCE, array_digest(images)
    key = content_key("faces", array_digest(images), array_digest(target))
    return Faces(key=key, images=images, target=target, source=source, sha256=sha256)


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
