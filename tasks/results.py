"""What each pipeline step returns: plain data, addressed by its content ``key``.

Numbers are numpy arrays; a fitted estimator or a trained model is the bytes of its file
(``pca.npz``, ``model.pt``), and the step that needs the object loads it. So a cached
result loads with numpy alone, and a run whose every step is cached never imports torch or
scikit-learn: that is most of what such a re-run would cost. The run folder's files are these
very bytes, so a folder written again from cached results is byte-identical.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from faceflow.config import FaceflowConfig
from faceflow.stored_types import allow_stored


@dataclass(frozen=True)
class Faces:
    """One version's images (float32 in [0, 1]) in manifest order, their ids and people."""

    key: str  # from the version id (the Olivetti arrays' digest when read straight from the file)
    images: np.ndarray  # (n, 64, 64) float32
    target: np.ndarray  # (n,) int: index into ``people``
    source: str  # the face store and version, or the data file / download for a direct read
    sha256: str  # the version id; the data file's sha256 (the arrays' for a download) for a direct read
    image_ids: tuple[str, ...] = ()  # sha256 of each image's float32 bytes (tasks.store.image_id)
    people: tuple[str, ...] = ()  # person names, sorted; target indexes them
    version: str = ""  # the face store version id; "" for a direct read of the Olivetti file
    version_number: int = 0

    def person_of(self, index: int) -> str:
        return self.people[int(self.target[index])]

    @property
    def flat(self) -> np.ndarray:
        return self.images.reshape(len(self.images), -1)


@dataclass(frozen=True)
class Split:
    """Indices into the version's faces: what the models fit on, early-stop on, and are judged on."""

    key: str
    fit: np.ndarray
    validation: np.ndarray
    heldout: np.ndarray
    fitted_whole: tuple[str, ...] = ()  # people with too few images to split: every image of theirs is in ``fit``
    image_ids: tuple[str, ...] = ()  # the version's image ids, which the indices index

    def to_json(self) -> str:
        record: dict[str, object] = {
            "train": sorted(int(i) for i in np.concatenate([self.fit, self.validation])),
            "fit": self.fit.tolist(),
            "validation": self.validation.tolist(),
            "heldout": self.heldout.tolist(),
            "fitted_whole": list(self.fitted_whole),
        }
        if self.image_ids:  # by id too: indices of one version need not index another's images
            record |= {f"{part}_ids": [self.image_ids[i] for i in getattr(self, part)] for part in ("fit", "validation", "heldout")}
        return json.dumps(record, indent=1)


@dataclass(frozen=True)
class FittedPCA:
    """A PCA fitted on the fit part, and every face's coordinates in it."""

    key: str
    estimator: bytes  # the fitted scikit-learn PCA's arrays: pca.npz (tasks.pca.load_estimator)
    coords: np.ndarray  # (400, n_components) float32, as its transform returns them
    mirror_coords: np.ndarray  # (400, n_components) float32: the same of each face mirrored left to right
    cumulative_variance: np.ndarray  # of the full-rank PCA on the fit part
    variance_target: float
    components_for_target: int  # before the power-of-two rounding
    # Probabilistic PCA's noise model for what the basis leaves out (tasks.pca.residual_log_density):
    residual_squared: np.ndarray  # (400,) float64 ||x - reconstruction||^2 of every face, in pixels
    residual_variance: float  # sigma^2: the fit faces' mean squared residual per discarded dimension
    n_pixels: int  # 4096; the residual lives in n_pixels - n_components dimensions

    @property
    def n_components(self) -> int:
        return int(self.coords.shape[1])

    @property
    def residual_dim(self) -> int:
        return self.n_pixels - self.n_components

    @property
    def variance_kept(self) -> float:
        return float(self.cumulative_variance[self.n_components - 1])


@dataclass(frozen=True)
class FaceBatches:
    """What the training DataLoader serves: the fit faces' coordinates, in shuffled, seeded batches.

    tasks.train.face_loader makes the torch DataLoader from it where the training runs.
    """

    key: str
    fit: np.ndarray  # (n_fit, d) float32 PCA coordinates
    validation: np.ndarray  # (n_validation, d), possibly empty
    batch_size: int
    seed: int

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.fit) / self.batch_size)


@dataclass(frozen=True)
class TrainingHistory:
    """One entry per epoch; validation log p is NaN where an epoch was not validated."""

    train_loss: np.ndarray
    validation_log_prob: np.ndarray
    learning_rate: np.ndarray

    def __len__(self) -> int:
        return len(self.train_loss)


@dataclass(frozen=True)
class TrainedFlow:
    """The kept weights as a model.pt checkpoint, and how training went."""

    key: str
    checkpoint: bytes  # model.pt: weights, spec and config (tasks.model.load_checkpoint_bytes)
    history: TrainingHistory
    best_epoch: int
    nonfinite_steps: int
    steps: int
    seconds: float
    resumed_from_epoch: int  # 0 unless a killed training was resumed from its checkpoint


@dataclass(frozen=True)
class BaselineResult:
    name: str
    heldout_log_prob: float  # nats per face, PCA coordinates
    heldout_image_log_prob: float  # nats per face, pixels (PCA-space log p + the residual's; tasks.pca)
    validation_log_prob: float | None  # of the chosen setting; cross-validated on the fit faces without validation faces
    train_seconds: float
    detail: str


@dataclass(frozen=True)
class Baselines:
    key: str
    results: list[BaselineResult]


@dataclass(frozen=True)
class NewPeopleFold:
    """One fold: its people, and the mean log p of all their images under each model, in nats per face."""

    people: list[int]
    flow_log_prob: float
    baseline_log_prob: dict[str, float]
    person_flow_log_prob: list[float]  # one mean per person, in the order of ``people``
    train_seconds: float
    # The same in image space (pixels, through the fold's own PCA and its residual variance).
    flow_image_log_prob: float
    baseline_image_log_prob: dict[str, float]


@dataclass(frozen=True)
class NewPeople:
    """Every fold of the new-people evaluation; the means are over all their images."""

    key: str
    folds: list[NewPeopleFold]

    @property
    def flow_log_prob(self) -> float:
        return float(np.mean([fold.flow_log_prob for fold in self.folds]))

    def baseline_log_prob(self, name: str) -> float:
        return float(np.mean([fold.baseline_log_prob[name] for fold in self.folds]))

    @property
    def flow_image_log_prob(self) -> float:
        return float(np.mean([fold.flow_image_log_prob for fold in self.folds]))

    def baseline_image_log_prob(self, name: str) -> float:
        return float(np.mean([fold.baseline_image_log_prob[name] for fold in self.folds]))

    @property
    def person_flow_log_prob(self) -> list[float]:
        return [value for fold in self.folds for value in fold.person_flow_log_prob]


@dataclass(frozen=True)
class GeneratedFaces:
    """Sampled faces, their PCA coordinates and how far each is from any training face."""

    key: str
    temperature: float
    coords: np.ndarray  # (n, d) PCA coordinates
    images: np.ndarray  # (n, 64, 64) in [0, 1]
    nearest_train_index: np.ndarray  # (n,) index into the 400 faces
    nearest_train_distance: np.ndarray  # (n,) RMS pixel distance to the training faces' PCA reconstructions
    # (n_heldout,) the same, for the held-out faces' reconstructions; beyond 512 held-out faces, for a
    # seeded sample of 512 (tasks.generate.heldout_distance_faces)
    heldout_nearest_train_distance: np.ndarray


@dataclass(frozen=True)
class Interpolation:
    key: str
    index_a: int
    index_b: int
    method: str
    weights: np.ndarray  # (steps,) from 0 to 1
    images: np.ndarray  # (steps, 64, 64)


@dataclass(frozen=True)
class Scores:
    """One entry per scored face: its part (fit, validation, heldout, sample), index, person and log p.

    ``log_prob`` is the density of the face's PCA coordinates (``dim`` of them); ``image_log_prob``
    the density of its ``pixels`` pixels: that plus the residual's under probabilistic PCA.
    """

    key: str
    part: np.ndarray  # str
    index: np.ndarray
    person: np.ndarray  # -1 for samples
    log_prob: np.ndarray  # nats; -inf where not finite
    dim: int
    image_log_prob: np.ndarray  # nats; -inf where not finite
    pixels: int

    def of(self, part: str, image: bool = False) -> np.ndarray:
        return (self.image_log_prob if image else self.log_prob)[self.part == part]

    def mean_log_prob(self, part: str, image: bool = False) -> float:
        """Mean in nats per face; -inf when any face's log p is not finite, nan for an empty part."""
        values = self.of(part, image)
        if not len(values):
            return math.nan
        return float(values.mean()) if np.isfinite(values).all() else -math.inf

    def nonfinite(self, part: str) -> int:
        return int((~np.isfinite(self.of(part))).sum())

    def rows(self) -> list[dict[str, object]]:
        return [
            {"part": str(part), "index": int(index), "person": int(person), "log_prob": float(log_prob),
             "image_log_prob": float(image_log_prob)}
            for part, index, person, log_prob, image_log_prob in zip(
                self.part, self.index, self.person, self.log_prob, self.image_log_prob, strict=True
            )
        ]


@dataclass(frozen=True)
class ModelScore:
    """A trained model's mean log p of the validation and held-out faces, in nats per face."""

    key: str
    validation_log_prob: float
    heldout_log_prob: float
    train_seconds: float
    # The same in image space: comparable between models of different PCA component counts.
    validation_image_log_prob: float
    heldout_image_log_prob: float


@dataclass(frozen=True)
class RunReport:
    key: str
    folder: Path
    metrics: dict[str, float]


@dataclass(frozen=True)
class ReportInputs:
    """What a run's report is built from, by name: every step's result after fetching, and the config as run."""

    split: Split
    pca: FittedPCA
    trained: TrainedFlow
    samples: GeneratedFaces
    scores: Scores
    interpolation: Interpolation
    baselines: Baselines
    new_people: NewPeople
    config: FaceflowConfig

    @property
    def key(self) -> str:
        """From the keys of its parts and the config (faceflow.keys): what the report's cache key is made of."""
        from faceflow.keys import content_key

        return content_key(*(getattr(self, part.name) for part in fields(self)))


# What a cached step may hold, and so what faceflow.serializer rebuilds when it reads one back.
allow_stored(Faces, Split, FittedPCA, FaceBatches, TrainingHistory, TrainedFlow, BaselineResult, Baselines, NewPeopleFold,
             NewPeople, GeneratedFaces, Interpolation, Scores, ModelScore, RunReport)
