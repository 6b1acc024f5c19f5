"""The one config tree of a faceflow run.

Every field has a description and bounds so the same model validates the command line,
the flow's parameters and, later, the Prefect UI's form. Field names are unique across
the tree: the command line exposes each one as ``--field-name``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

IMAGES_PER_PERSON = 10
N_PEOPLE = 40
N_IMAGES = IMAGES_PER_PERSON * N_PEOPLE
N_PIXELS = 64 * 64


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """Where the faces come from and how they are split."""

    data_file: Path | None = Field(
        None,
        description="Local olivettifaces.mat; when unset, FACEFLOW_DATA_FILE, "
        "then scikit-learn's download (and its on-disk cache).",
    )
    heldout_per_person: int = Field(
        2, ge=1, le=8, description="Images per person kept out of training for evaluation."
    )
    validation_per_person: int = Field(
        0,
        ge=0,
        le=8,
        description="Training images per person set aside (unseen by PCA and flow) for early stopping "
        "and the baselines' choices; 0: PCA and flow fit every training image for exactly `epochs` "
        "(chosen on validation while tuning), and the baselines choose by cross-validation.",
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
    def _every_person_keeps_training_images(self) -> DataConfig:
        kept = IMAGES_PER_PERSON - self.heldout_per_person - self.validation_per_person
        if kept < 1:
            raise ValueError(
                f"heldout_per_person ({self.heldout_per_person}) + validation_per_person "
                f"({self.validation_per_person}) must leave each person at least 1 of "
                f"{IMAGES_PER_PERSON} images for training (sum at most {IMAGES_PER_PERSON - 1})"
            )
        return self

    @model_validator(mode="after")
    def _new_people_folds_are_disjoint(self) -> DataConfig:
        if self.new_people_per_fold * self.new_people_folds > N_PEOPLE:
            raise ValueError(
                f"new_people_per_fold ({self.new_people_per_fold}) x new_people_folds ({self.new_people_folds}) "
                f"exceeds the {N_PEOPLE} people: folds hold disjoint people"
            )
        return self

    @property
    def n_fit_images(self) -> int:
        """Images the PCA and the flow are fitted on."""
        per_person = IMAGES_PER_PERSON - self.heldout_per_person - self.validation_per_person
        return per_person * N_PEOPLE

    @property
    def n_fit_images_without_new_people(self) -> int:
        """Images the PCA and the flow of a new-people fold are fitted on."""
        return self.n_fit_images // N_PEOPLE * (N_PEOPLE - self.new_people_per_fold)


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

    epochs: int = Field(700, ge=1, le=100_000, description="Passes over the training faces.")
    batch_size: int = Field(
        320, ge=1, le=4096,
        description="Faces per optimisation step; 320 is every fit face (steps cost little more than at 32).",
    )
    learning_rate: float = Field(5e-3, gt=0.0, le=1.0, description="AdamW peak learning rate.")
    weight_decay: float = Field(0.1, ge=0.0, le=10.0, description="AdamW weight decay.")
    num_layers: int = Field(4, ge=1, le=64, description="Affine coupling layers.")
    hidden_units: int = Field(256, ge=4, le=4096, description="Width of each coupling MLP.")
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
    ema_decay: float = Field(
        0.995, ge=0.0, lt=1.0, description="Decay of the weights' moving average used for evaluation; 0 disables it."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to train: auto picks CUDA when present."
    )


class SampleConfig(_Section):
    """New faces drawn from the flow."""

    n_samples: int = Field(16, ge=1, le=1024, description="Faces to sample.")
    temperature: float = Field(
        0.8, gt=0.0, le=1.0, description="Scale of the base distribution when sampling (0 < T <= 1)."
    )


class InterpolateConfig(_Section):
    """A walk through latent space between two real faces of different people."""

    index_a: int = Field(0, ge=0, lt=N_IMAGES, description="First face (0..399).")
    index_b: int = Field(130, ge=0, lt=N_IMAGES, description="Second face, another person (0..399).")
    steps: int = Field(8, ge=2, le=64, description="Faces along the path, both ends included.")
    method: Literal["linear", "spherical"] = Field(
        "spherical", description="Interpolation in latent space."
    )

    @model_validator(mode="after")
    def _different_people(self) -> InterpolateConfig:
        person_a = self.index_a // IMAGES_PER_PERSON
        person_b = self.index_b // IMAGES_PER_PERSON
        if person_a == person_b:
            raise ValueError(
                f"index_a ({self.index_a}) and index_b ({self.index_b}) are both person "
                f"{person_a}; choose images of two different people (person = index // 10)"
            )
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
    def _components_fit_the_data(self) -> FaceflowConfig:
        # Centred data of n images has rank n - 1; couplings need an even count. The PCA of a
        # new-people fold sees the fewest images.
        limit = min(self.data.n_fit_images_without_new_people - 1, N_PIXELS)
        limit -= limit % 2
        wanted = self.pca.n_components
        if wanted is not None and wanted > limit:
            raise ValueError(
                f"pca.n_components ({wanted}) exceeds what the data allows: at most {limit} "
                f"(the PCA is fitted on {self.data.n_fit_images} images, "
                f"{self.data.n_fit_images_without_new_people} in a new-people fold)"
            )
        if self.pca.n_components is not None and self.pca.n_components % 2:
            raise ValueError(
                f"pca.n_components ({wanted}) must be even: coupling layers split it in halves"
            )
        return self
