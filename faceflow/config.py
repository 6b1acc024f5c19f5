"""The one config tree of a faceflow run.

Every field has a description and bounds so the same model validates the command line,
the flow's parameters and, later, the Prefect UI's form. Field names are unique across
the tree: the command line exposes each one as ``--field-name``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

N_PIXELS = 64 * 64
# A person with fewer images than this is fitted on whole: a split part of a person this small
# would often be empty or the person's every image. Counted in the split's table.
MIN_IMAGES_TO_SPLIT = 3
# Interpolation needs two people beside the new-people folds' people.
MIN_KNOWN_PEOPLE = 2
# An interpolation endpoint: an image id or a prefix of one (hex), or person:index.
ENDPOINT_PATTERN = r"[0-9a-f]{6,64}|[A-Za-z0-9][A-Za-z0-9._-]{0,63}:[0-9]{1,6}"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Promotion compares validation log p, so a retraining keeps a tenth of the faces for validation.
RETRAIN_VALIDATION_FRACTION = 0.1


class DataConfig(_Section):
    """Where the faces come from and how they are split."""

    data_file: Path | None = Field(
        None,
        description="Local olivettifaces.mat that becomes the face store's version 1 on first use (checked on "
        "every run); when unset, FACEFLOW_DATA_FILE, then scikit-learn's download (and its on-disk cache).",
    )
    faces_version: str = Field(
        "latest", min_length=1, max_length=64,
        description="Version of the face store to run on: 'latest', a number (1, 2, ...) or a version id "
        "(or a prefix of at least 6 hex digits); `faceflow faces` lists them. A run resolves it once, to an id.",
    )
    heldout_fraction: float = Field(
        0.2, gt=0.0, lt=1.0,
        description="Share of each person's images kept out of training for evaluation, decided per image "
        "from a hash of the split seed and the image id: adding images never moves one (a person with fewer "
        "than 3 images is fitted on whole).",
    )
    validation_fraction: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Share of the images set aside (unseen by PCA and flow) for early stopping and the baselines' "
        "choices, decided per image like the held-out ones; 0: PCA and flow fit every training image for exactly "
        "`epochs` (chosen on validation while tuning), and the baselines choose by cross-validation.",
    )
    split_seed: int = Field(0, ge=0, strict=True, description="Seed of the held-out split and of the new people.")
    new_people_per_fold: int = Field(
        4, ge=1, le=20,
        description="People left out of PCA, flow and baselines altogether in each new-people fold; "
        "every image of theirs is scored.",
    )
    new_people_folds: int = Field(
        1, ge=1, le=10,
        description="New-people folds in a run (disjoint people); each one trains the flow once more.",
    )

    @field_validator("data_file")
    @classmethod
    def _data_file_exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"data file {str(path)!r} does not exist or is not a file")
        return path

    @model_validator(mode="after")
    def _fit_images_are_left(self) -> DataConfig:
        if self.heldout_fraction + self.validation_fraction > 0.9:
            raise ValueError(
                f"heldout_fraction ({self.heldout_fraction}) + validation_fraction ({self.validation_fraction}) "
                "must leave at least a tenth of the images for training (sum at most 0.9)"
            )
        return self


class PCAConfig(_Section):
    """The linear reduction from 4096 pixels to the flow's space."""

    variance: float = Field(
        0.90, gt=0.0, le=1.0, description="Fraction of pixel variance the components keep."
    )
    n_components: int | None = Field(
        None, ge=2, description="Explicit component count; overrides the variance target."
    )
    round_to_power_of_two: bool = Field(
        True, description="Round the variance-derived count to the nearest power of two."
    )


class TrainConfig(_Section):
    """RealNVP architecture and optimisation."""

    epochs: int = Field(350, ge=1, le=100_000, description="Passes over the training faces (and their mirror images).")
    batch_size: int = Field(
        512, ge=1, le=4096,
        description="Faces per optimisation step; the Olivetti version's fit faces and their mirror images (about 640) "
        "make two batches of 512 an epoch (steps cost little more than at 32).",
    )
    learning_rate: float = Field(5e-3, gt=0.0, le=1.0, description="AdamW peak learning rate.")
    weight_decay: float = Field(0.1, ge=0.0, le=10.0, description="AdamW weight decay.")
    num_layers: int = Field(3, ge=1, le=64, description="Affine coupling layers of each flow.")
    members: int = Field(
        3, ge=1, le=8,
        description="Flows trained side by side from different initialisations, their densities mixed (an "
        "ensemble; the last is the short member); samples come from each by its share, latent walks from the first.",
    )
    short_member_epochs: int = Field(
        100, ge=0, le=100_000,
        description="With members > 1, the last member trains only this many epochs (at most epochs; 0 = every "
        "member trains them all): an early-stopped, smoother flow for faces unlike any fit face (its weight "
        "average still holds much of its starting point: 37% after 200 steps at the default decay).",
    )
    short_member_weight: float = Field(
        0.3, gt=0.0, lt=1.0,
        description="With members > 1, the short member's share of the ensemble's density; the others share the "
        "rest (equal shares when no member is shorter).",
    )
    hidden_units: int = Field(192, ge=4, le=4096, description="Width of each coupling MLP.")
    input_noise: float = Field(
        0.4, ge=0.0, le=5.0, description="Gaussian noise std added to whitened training inputs."
    )
    noise_exponent: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Noise shape: 0 = input_noise in whitened units for every component; "
        "1 = the same absolute noise in every component.",
    )
    noise_draws: int = Field(
        1, ge=1, le=64, description="Independent noise draws of each face per step (a larger, smoother batch)."
    )
    mirror: bool = Field(
        True,
        description="Also train the flow on every fit face mirrored left to right (twice the faces per epoch): "
        "augmentation that helps most on people the flow never saw.",
    )
    gaussian_weight: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Weight of a diagonal Gaussian (the fit faces' per-component mean and std) mixed with the flow "
        "in every log p: a floor under faces unlike any fit face; 0 = the flow alone (the default: beside the short "
        "member the floor gained nothing on unseen people). Training, samples and latent walks use the flow.",
    )
    ema_decay: float = Field(
        0.995, ge=0.0, lt=1.0, description="Decay of the weights' moving average used for evaluation; 0 disables it."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to train: auto picks CUDA when present."
    )

    def member_epochs(self) -> list[int]:
        """Epochs each member of the ensemble trains: ``epochs``, and the short member's last."""
        if self.members == 1:
            return [self.epochs]
        short = min(self.short_member_epochs or self.epochs, self.epochs)
        return [self.epochs] * (self.members - 1) + [short]

    def member_weights(self) -> list[float]:
        """Each member's share of the density: the short member's weight last, the rest shared; equal with no short one."""
        epochs = self.member_epochs()
        if len(set(epochs)) == 1:  # one flow, or no member shorter than the others
            return [1.0 / self.members] * self.members
        others = (1.0 - self.short_member_weight) / (self.members - 1)
        return [others] * (self.members - 1) + [self.short_member_weight]


class SampleConfig(_Section):
    """New faces drawn from the flow."""

    n_samples: int = Field(16, ge=1, le=1024, description="Faces to sample.")
    temperature: float = Field(
        0.8, gt=0.0, le=1.0, description="Scale of the base distribution when sampling (0 < T <= 1)."
    )


class InterpolateConfig(_Section):
    """A walk through latent space between two real faces of different people."""

    face_a: str | None = Field(
        None, pattern=f"^({ENDPOINT_PATTERN})$",
        description="First face: person:index (the index-th image of that person in the version) or an image id "
        "(or a prefix of at least 6 hex digits of one); unset: the first image of the version's first person (in name order), so forgetting anyone never leaves it pointing nowhere.",
    )
    face_b: str | None = Field(
        None, pattern=f"^({ENDPOINT_PATTERN})$",
        description="Second face, another person; unset: the first image of the first person (in name order) other than face_a's.",
    )
    steps: int = Field(8, ge=2, le=64, description="Faces along the path, both ends included.")
    method: Literal["linear", "spherical"] = Field(
        "spherical", description="Interpolation in latent space."
    )

    @model_validator(mode="after")
    def _two_faces(self) -> InterpolateConfig:
        if self.face_a is not None and self.face_a == self.face_b:
            raise ValueError(f"face_a and face_b are both {self.face_a!r}; choose images of two different people")
        return self


class BaselineConfig(_Section):
    """Reference density models fitted on the same split."""

    gmm_max_components: int = Field(
        20, ge=1, le=64,
        description="Diagonal GaussianMixture: best of 1..this many components on validation.",
    )
    include_lab_recipe: bool = Field(
        False, description="Also train the lab's original recipe (about 15 s more)."
    )


class FaceflowConfig(_Section):
    """Everything that determines a faceflow run."""

    seed: int = Field(0, ge=0, strict=True, description="Seed of model init, batches and sampling.")
    output_dir: Path = Field(Path("outputs"), description="Folder that receives run folders.")
    threads: int = Field(
        1, ge=1, le=256,
        description="CPU threads for torch and BLAS in each step. These small networks train as fast on 1 as on 2, "
        "and more threads than free cores made training up to 100x slower.",
    )
    parallel: bool = Field(
        True,
        description="Train the new-people models beside the main one (a second core); "
        "--no-parallel when other work shares the cores. Results are the same either way.",
    )
    data: DataConfig = DataConfig()
    pca: PCAConfig = PCAConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    interpolate: InterpolateConfig = InterpolateConfig()
    baselines: BaselineConfig = BaselineConfig()

    @model_validator(mode="after")
    def _components_are_even(self) -> FaceflowConfig:
        # Whether the data allows this many is checked at run start, against the version's fit images.
        wanted = self.pca.n_components
        if wanted is not None and wanted % 2:
            raise ValueError(f"pca.n_components ({wanted}) must be even: coupling layers split it in halves")
        if wanted is not None and wanted > N_PIXELS:
            raise ValueError(f"pca.n_components ({wanted}) exceeds the {N_PIXELS} pixels")
        return self
