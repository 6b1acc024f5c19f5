"""Read a version of the face store and split it into fit, validation and held-out parts.

The split is stable under growth: each image's part is decided from a hash of (split seed, image
id), never from its position, so adding images to a version never moves an existing one. A
person with fewer than MIN_IMAGES_TO_SPLIT images is fitted on whole (and counted as such).
Numpy and the standard library only: the CLI checks a config against a version with it before
any server starts.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from faceflow.config import MIN_IMAGES_TO_SPLIT, MIN_KNOWN_PEOPLE, N_PIXELS, DataConfig, FaceflowConfig
from faceflow.keys import array_digest, content_key, file_sha256
from faceflow.settings import DATA_FILE_VARIABLE, data_file_from_environment, download_timeout
from tasks.olivetti import DataFileError, read_olivetti_mat
from tasks.results import Faces, Split

if TYPE_CHECKING:
    from tasks.store import FaceStore, Version

# Tuning judges a recipe on the images of this band after the held-out ones: the validation
# images of a retraining run's split (validation_fraction 0.1).
TUNING_JUDGE_FRACTION = 0.1
# Draws the people of the new-people folds; apart from the split's own hash so that changing the
# fold settings never moves which images of the known people are held out.
_PEOPLE_STREAM = 1


class FacesVersionError(ValueError):
    """A config that the chosen version cannot serve; the message names the field."""


class Labelled(Protocol):
    """What a split needs: image ids and person indices (Faces, or FaceLabels from a manifest)."""

    image_ids: tuple[str, ...]
    target: np.ndarray
    people: tuple[str, ...]


@dataclass(frozen=True)
class FaceLabels:
    """A version's ids and people without its pixels: enough to check a config against it."""

    image_ids: tuple[str, ...]
    target: np.ndarray
    people: tuple[str, ...]

    @classmethod
    def of(cls, image_ids: Sequence[str], people: Sequence[str]) -> FaceLabels:
        names = tuple(sorted(set(people)))
        lookup = {name: i for i, name in enumerate(names)}
        return cls(tuple(image_ids), np.array([lookup[p] for p in people], dtype=np.int64), names)


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
    from tasks.store import image_ids

    key = content_key("faces", array_digest(images), array_digest(target))
    people = tuple(f"olivetti-{int(t):02d}" for t in np.unique(target))
    return Faces(key=key, images=images, target=target, source=source, sha256=sha256,
                 image_ids=tuple(image_ids(images)), people=people)


def resolve_data_file(config: DataConfig) -> Path | None:
    """The data file a run reads: the config's, else FACEFLOW_DATA_FILE's, else none."""
    path = config.data_file or data_file_from_environment()
    if path is not None and not path.is_file():
        raise DataFileError(f"data file {str(path)!r} does not exist or is not a file")
    return path


def open_store(
    root: Path, data_file: Path | None, download: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None
) -> tuple[FaceStore, Version]:
    """The face store at ``root`` and its latest version; on first use the Olivetti faces become version 1.

    Version 1 holds the 400 faces exactly as the pipeline has always read them (the file, else
    scikit-learn's download), people olivetti-00..39. The sources name no path: version 1's id is
    then the same wherever the file lives.
    """
    from tasks.store import FaceStore

    store = FaceStore(root)

    def first() -> tuple[np.ndarray, list[str], list[str]]:
        faces = load_faces(data_file, download or download_olivetti)
        people = [f"olivetti-{int(t):02d}" for t in faces.target]
        return faces.images, people, [f"olivetti[{i}]" for i in range(len(people))]

    return store, store.ensure_first_version(first)


def open_faces(data_file: Path | None, reference: str, root: Path | None = None) -> Faces:
    """The faces of version ``reference`` of the store at ``root`` (FACEFLOW_FACES_DIR); version 1 made on first use.

    A data file, when given, is checked on every run (it is refused naming the file even when the
    store already holds version 1); an unknown version is refused naming ``data.faces_version``.
    """
    from faceflow.settings import faces_dir
    from tasks.store import UnknownVersionError

    if data_file is not None:
        read_olivetti_mat(data_file)  # DataFileError naming the file
    store, _ = open_store(root or faces_dir(), data_file)
    try:
        version = store.resolve(reference)
    except UnknownVersionError as error:
        raise FacesVersionError(f"data.faces_version: {error}") from None
    read = store.read(version)
    labels = FaceLabels.of(read.image_ids, read.people)
    return Faces(
        key=content_key("faces", version.id), images=read.images, target=labels.target,
        source=f"{store.root} version {version.number}", sha256=version.id, image_ids=read.image_ids,
        people=labels.people, version=version.id, version_number=version.number,
    )


def version_pixels(reference: str, indices: Sequence[int], root: Path | None = None) -> np.ndarray:
    """The pixels (n, 4096) of images ``indices`` of a version of the store at ``root`` (FACEFLOW_FACES_DIR)."""
    from faceflow.settings import faces_dir
    from tasks.store import FaceStore

    store = FaceStore(root or faces_dir())
    return store.read(store.resolve(reference)).images[list(indices)].reshape(len(indices), N_PIXELS)


def split_position(split_seed: int, image_id: str) -> float:
    """Where an image falls in [0, 1) for a split seed: its part depends on this and nothing else."""
    digest = hashlib.sha256(f"faceflow-split:{split_seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _positions(faces: Labelled, split_seed: int) -> np.ndarray:
    return np.array([split_position(split_seed, i) for i in faces.image_ids], dtype=np.float64)


def _too_few(faces: Labelled) -> np.ndarray:
    """Per image: its person has fewer than MIN_IMAGES_TO_SPLIT images, so it is fitted on."""
    counts = np.bincount(faces.target, minlength=len(faces.people))
    return counts[faces.target] < MIN_IMAGES_TO_SPLIT


def _split_from(faces: Labelled, fit: np.ndarray, validation: np.ndarray, heldout: np.ndarray) -> Split:
    parts = [np.flatnonzero(mask).astype(np.int64) for mask in (fit, validation, heldout)]
    whole = tuple(sorted({faces.people[t] for t in faces.target[_too_few(faces)]}))
    return Split(content_key("split", *(p.tolist() for p in parts), faces.image_ids), *parts,
                 fitted_whole=whole, image_ids=tuple(faces.image_ids))


def split_indices(faces: Labelled, config: DataConfig) -> Split:
    """Per image, from its hash position: held-out below heldout_fraction, then validation, the rest fitted on."""
    position = _positions(faces, config.split_seed)
    whole = _too_few(faces)
    heldout = (position < config.heldout_fraction) & ~whole
    validation = (position >= config.heldout_fraction) & (position < config.heldout_fraction + config.validation_fraction) & ~whole
    return _split_from(faces, ~heldout & ~validation, validation, heldout)


def tuning_split_indices(faces: Labelled, config: DataConfig) -> Split:
    """The split a recipe is tuned on: the held-out images are dropped, never read.

    The band of TUNING_JUDGE_FRACTION after the held-out images (a retraining run's validation
    images) becomes the tuning judge, returned as the held-out part; the recipe's own validation
    and fit images come from the rest. A recipe is then trained as in a run, a tenth of the images
    short, and scored on faces that no part of the recipe saw, whatever it does with its own
    validation images (early stopping, or none and training on them).
    """
    h, j, v = config.heldout_fraction, TUNING_JUDGE_FRACTION, config.validation_fraction
    if h + j + v > 0.9:
        raise ValueError("tuning needs a judge band and fit images beside the held-out ones: "
                         f"heldout_fraction + {j} + validation_fraction must be at most 0.9")
    position = _positions(faces, config.split_seed)
    whole = _too_few(faces)
    dropped = (position < h) & ~whole
    judge = (position >= h) & (position < h + j) & ~whole
    validation = (position >= h + j) & (position < h + j + v) & ~whole
    fit = ~dropped & ~judge & ~validation
    return _split_from(faces, fit, validation, judge)


def new_people_of_fold(config: DataConfig, fold: int, n_people: int) -> list[int]:
    """The people (indices into the version's people) fold ``fold`` leaves out: disjoint across folds."""
    order = np.random.default_rng((config.split_seed, _PEOPLE_STREAM)).permutation(n_people)
    size = config.new_people_per_fold
    return sorted(int(person) for person in order[fold * size : (fold + 1) * size])


def new_people_split(faces: Labelled, config: DataConfig, people: list[int], tuning: bool = False) -> Split:
    """The run's split without ``people``; their every image becomes the held-out part.

    With ``tuning``, the tuning split's (tuning_split_indices) instead: the held-out images of the
    people who stay are dropped too, so a new-people validation fold never reads a test image.
    """
    known = (tuning_split_indices if tuning else split_indices)(faces, config)
    new = np.isin(faces.target, people)
    parts = [part[~new[part]] for part in (known.fit, known.validation)]
    heldout = np.flatnonzero(new)
    return Split(content_key("new-people-split", *(p.tolist() for p in parts), heldout.tolist(), faces.image_ids),
                 *parts, heldout, fitted_whole=known.fitted_whole, image_ids=tuple(faces.image_ids))


def endpoint_index(faces: Labelled, text: str, field: str, forgotten: Mapping[str, str] | None = None) -> int:
    """The image an interpolation endpoint names: person:index, or an image id or unambiguous id prefix.

    ``forgotten`` maps a forgotten person's label and image ids to the erasure that forgot them,
    so an endpoint naming one is refused saying so.
    """
    forgotten = forgotten or {}
    if ":" in text:
        person, _, number = text.rpartition(":")
        if person not in faces.people:
            if person in forgotten:
                raise FacesVersionError(f"{field}: {person} was {forgotten[person]}; name another person, or leave "
                                        f"{field} unset for the version's default")
            raise FacesVersionError(f"{field}: no person {person!r} in this version ({len(faces.people)} people)")
        images = np.flatnonzero(faces.target == faces.people.index(person))
        if int(number) >= len(images):
            raise FacesVersionError(f"{field}: {person} has {len(images)} images in this version; {text!r} asks for image {number}")
        return int(images[int(number)])
    matches = [i for i, identity in enumerate(faces.image_ids) if identity.startswith(text)]
    if len(matches) != 1:
        erased = [why for identity, why in forgotten.items() if len(identity) == 64 and identity.startswith(text)]
        if not matches and erased:
            raise FacesVersionError(f"{field}: image {text!r} is of a person who was {erased[0]}; name another image, "
                                    f"or leave {field} unset for the version's default")
        problem = "names several images" if matches else "is no image id"
        raise FacesVersionError(f"{field}: {text!r} {problem} of this version")
    return matches[0]


def _first_image_other_than(faces: Labelled, person: int | None) -> int:
    """The first image of the first person (in name order) who is not ``person``."""
    chosen = next(p for p in range(len(faces.people)) if p != person)
    return int(np.flatnonzero(faces.target == chosen)[0])


def interpolation_endpoints(faces: Labelled, config: FaceflowConfig, forgotten: Mapping[str, str] | None = None) -> tuple[int, int]:
    """Both endpoints as image indices, of two different people; FacesVersionError naming the field otherwise.

    An endpoint left unset comes from the version: face_a the first image of its first person,
    face_b the first image of the first other person; so no person is needed by the defaults.
    """
    face_a, face_b = config.interpolate.face_a, config.interpolate.face_b
    a = (endpoint_index(faces, face_a, "interpolate.face_a", forgotten) if face_a is not None
         else _first_image_other_than(faces, None if face_b is None else _person_named(faces, face_b, forgotten)))
    b = (endpoint_index(faces, face_b, "interpolate.face_b", forgotten) if face_b is not None
         else _first_image_other_than(faces, int(faces.target[a])))
    if faces.target[a] == faces.target[b]:
        person = faces.people[int(faces.target[a])]
        raise FacesVersionError(
            f"interpolate.face_a ({face_a}) and interpolate.face_b ({face_b}) "
            f"are both person {person}; choose images of two different people"
        )
    return a, b


def _person_named(faces: Labelled, face_b: str, forgotten: Mapping[str, str] | None) -> int:
    return int(faces.target[endpoint_index(faces, face_b, "interpolate.face_b", forgotten)])


def with_endpoints(faces: Labelled, config: FaceflowConfig, forgotten: Mapping[str, str] | None = None) -> FaceflowConfig:
    """``config`` with both interpolation endpoints resolved to image ids: what the run used, in config.json."""
    a, b = interpolation_endpoints(faces, config, forgotten)
    resolved = config.interpolate.model_copy(update={"face_a": faces.image_ids[a], "face_b": faces.image_ids[b]})
    return config.model_copy(update={"interpolate": resolved})


def check_config_against(faces: Labelled, config: FaceflowConfig, forgotten: Mapping[str, str] | None = None) -> None:
    """What a config needs of the version it runs on; FacesVersionError naming the field, before any work."""
    data = config.data
    needed = data.new_people_per_fold * data.new_people_folds + MIN_KNOWN_PEOPLE
    if len(faces.people) < needed:
        raise FacesVersionError(
            f"data.new_people_per_fold ({data.new_people_per_fold}) x data.new_people_folds ({data.new_people_folds}): "
            f"this version has {len(faces.people)} people; the folds hold disjoint people and {MIN_KNOWN_PEOPLE} more "
            f"must stay, so at least {needed} are needed"
        )
    split = split_indices(faces, data)
    if not len(split.heldout):
        raise FacesVersionError(f"data.heldout_fraction ({data.heldout_fraction}): no image of this version is held out")
    interpolation_endpoints(faces, config, forgotten)
    wanted = config.pca.n_components
    if wanted is not None:
        # Centred data of n images has rank n - 1; couplings need an even count. The PCA of a
        # new-people fold sees the fewest images.
        fewest = min(
            [len(split.fit)]
            + [len(new_people_split(faces, data, new_people_of_fold(data, fold, len(faces.people))).fit)
               for fold in range(data.new_people_folds)]
        )
        limit = min(fewest - 1, N_PIXELS)
        limit -= limit % 2
        if wanted > limit:
            raise FacesVersionError(
                f"pca.n_components ({wanted}) exceeds what the data allows: at most {limit} "
                f"(the PCA is fitted on {len(split.fit)} images, {fewest} in a new-people fold)"
            )
