"""Maximum-likelihood training of the RealNVP, independent of any orchestrator."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import normflows as nf
import torch
from prefect import task
from torch.optim.swa_utils import get_ema_multi_avg_fn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from faceflow.caching import KEYED_INPUTS, content_key
from faceflow.config import TrainConfig
from tasks.data import Split
from tasks.model import ModelSpec, build_realnvp, rebuild_realnvp, resolve_device, trainable_parameters
from tasks.pca import FittedPCA


VALIDATIONS_PER_RUN = 200


@dataclass(frozen=True)
class FaceBatches:
    """The training faces' PCA coordinates as a shuffled, seeded DataLoader."""

    key: str
    loader: DataLoader
    validation: torch.Tensor  # PCA coordinates of the validation faces (may be empty)


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    epochs: int
    train_loss: float
    validation_log_prob: float | None
    learning_rate: float


@dataclass
class TrainedFlow:
    """The best weights found, with what built them and how training went."""

    key: str
    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    config: dict
    history: list[EpochStats] = field(default_factory=list)
    best_epoch: int = 0
    nonfinite_steps: int = 0
    steps: int = 0
    seconds: float = 0.0

    def model(self, device: str = "cpu") -> nf.NormalizingFlow:
        """A fresh model in eval mode carrying the trained weights."""
        return rebuild_realnvp(self.spec, self.state_dict, device)


def make_optimizer(parameters: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; the fused kernel updates all ~70 small tensors in one call instead of a Python loop."""
    return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True)


class WeightAverage:
    """An exponential moving average of a model's trainable weights, in a copy of the model.

    Uses torch's own EMA update (``get_ema_multi_avg_fn``) on tensor lists gathered once:
    ``AveragedModel.update_parameters`` walks the module tree on every call, which measured
    2 ms a step here, 40% of a step of the lab-shaped model.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model)
        copies = dict(self.module.named_parameters())
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self._live = [p for _, p in trainable]
        self._averaged = [copies[name] for name, _ in trainable]
        self._update = get_ema_multi_avg_fn(decay)

    def update(self) -> None:
        self._update(self._averaged, self._live, None)


def input_noise_scale(std: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Per-component std of the training noise, in PCA units.

    With exponent 0 the noise is ``input_noise`` in whitened units for every component; larger
    exponents move it towards the same absolute noise everywhere, i.e. relatively more noise
    on the low-variance components, where held-out faces differ most from the fit faces.
    """
    return config.input_noise * std * (std.mean() / std) ** config.noise_exponent


def face_loader(coords: torch.Tensor, batch_size: int, seed: int) -> DataLoader:
    """Shuffled, seeded batches of ``coords``, a new order every pass.

    The sampler yields a whole batch of indices at once and the dataset is indexed once per
    batch, with no per-item collation: item by item, collating cost more than the small
    networks' compute.
    """
    dataset = TensorDataset(coords)
    order = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return DataLoader(dataset, sampler=BatchSampler(order, batch_size, drop_last=False), batch_size=None)


def make_batches(pca: FittedPCA, split: Split, config: TrainConfig, seed: int) -> FaceBatches:
    """DataLoader over the fit faces' coordinates: batch size from config, shuffled, seeded."""
    loader = face_loader(torch.from_numpy(pca.coords[split.fit]), config.batch_size, seed)
    validation = torch.from_numpy(pca.coords[split.validation])
    return FaceBatches(content_key("batches", pca, split, config.batch_size, seed), loader, validation)


def mean_log_prob(model: nf.NormalizingFlow, coords: torch.Tensor) -> float:
    """Mean log-density in nats; -inf if any face's is not finite. Leaves the model's mode as it was."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        log_p = model.log_prob(coords)
    model.train(was_training)
    return float(log_p.mean()) if bool(torch.isfinite(log_p).all()) else -math.inf


def train_flow(
    batches: FaceBatches,
    config: TrainConfig,
    seed: int,
    on_epoch: Callable[[EpochStats], None] = lambda stats: None,
    device: str | None = None,
) -> TrainedFlow:
    """Fit by maximum likelihood on the loader's batches; keep the weights with the best validation log p."""
    device = torch.device(device) if device else resolve_device(config.device)
    # A copy: iterating advances the sampler's generator, and the loader may be a cached result
    # shared by later runs in this process, which must see the same batches.
    loader = copy.deepcopy(batches.loader)
    fit = loader.dataset.tensors[0].to(device)  # for the whitening statistics and ActNorm's initialisation
    validation = batches.validation.to(device)
    clean = fit[torch.isfinite(fit).all(1)]
    mean, std = clean.mean(0), clean.std(0)
    spec = ModelSpec(dim=fit.shape[1], num_layers=config.num_layers, hidden_units=config.hidden_units)

    torch.manual_seed(seed)
    model = build_realnvp(spec, mean.cpu().numpy(), std.cpu().numpy()).to(device)
    optimizer = make_optimizer(trainable_parameters(model), config)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * len(loader))
    noise_scale = input_noise_scale(std, config)
    with torch.no_grad():  # ActNorm's data-dependent init on the fit faces as training sees them: noisy
        model.log_prob(clean + noise_scale * torch.randn_like(clean))
    # Weight averaging smooths the last, noisy steps; evaluation and the kept state use it.
    averaged = WeightAverage(model, config.ema_decay) if config.ema_decay > 0 else None
    evaluated = averaged.module if averaged is not None else model

    # About 200 validations a run: enough to pick a good epoch, cheap next to training.
    validate_every = max(1, config.epochs // VALIDATIONS_PER_RUN)
    best_state, best_score, best_epoch = None, -math.inf, 0
    history: list[EpochStats] = []
    nonfinite = steps = 0
    started = time.perf_counter()
    model.train()
    for epoch in range(1, config.epochs + 1):
        epoch_loss, finite_batches = 0.0, 0
        for (batch,) in loader:
            batch = batch.to(device)
            if config.noise_draws > 1:
                batch = batch.repeat(config.noise_draws, 1)
            batch = batch + noise_scale * torch.randn_like(batch)
            loss = -model.log_prob(batch).mean()
            loss_value = loss.item()  # one read of the loss per step, for the check and the mean
            steps += 1
            optimizer.zero_grad(set_to_none=True)
            if math.isfinite(loss_value):
                loss.backward()
                optimizer.step()
                if averaged is not None:
                    averaged.update()
                epoch_loss += loss_value
                finite_batches += 1
            else:
                nonfinite += 1
            scheduler.step()
        validating = len(validation) and (epoch % validate_every == 0 or epoch == config.epochs)
        validation_score = mean_log_prob(evaluated, validation) if validating else None
        stats = EpochStats(
            epoch=epoch,
            epochs=config.epochs,
            train_loss=epoch_loss / finite_batches if finite_batches else math.nan,
            validation_log_prob=validation_score,
            learning_rate=scheduler.get_last_lr()[0],
        )
        history.append(stats)
        on_epoch(stats)
        if validation_score is not None and validation_score > best_score:
            best_state, best_score, best_epoch = copy.deepcopy(evaluated.state_dict()), validation_score, epoch
    if best_state is None:  # no validation faces, or no finite validation score: the last weights
        best_state, best_epoch = copy.deepcopy(evaluated.state_dict()), config.epochs

    return TrainedFlow(
        key="",
        spec=spec,
        state_dict={k: v.cpu() for k, v in best_state.items()},
        config=config.model_dump(mode="json") | {"seed": seed},
        history=history,
        best_epoch=best_epoch,
        nonfinite_steps=nonfinite,
        steps=steps,
        seconds=time.perf_counter() - started,
    )


@task(name="build_dataloader", cache_policy=KEYED_INPUTS, persist_result=True)
def build_dataloader(pca: FittedPCA, split: Split, config: TrainConfig, seed: int) -> FaceBatches:
    """Shuffled, seeded batches of the fit faces' PCA coordinates."""
    return make_batches(pca, split, config, seed)


@task(name="train_realnvp", cache_policy=KEYED_INPUTS, persist_result=True)
def train_realnvp(batches: FaceBatches, config: TrainConfig, seed: int, device: str) -> TrainedFlow:
    """RealNVP by maximum likelihood, with a terminal progress bar and a Prefect progress artifact.

    ``device`` is the resolved one ("cpu", "cuda"), so a GPU and a CPU run never share a cache key.
    """
    from artifacts.progress import TrainingProgress

    with TrainingProgress(config.epochs) as progress:
        trained = train_flow(batches, config, seed, on_epoch=progress.update, device=device)
    return dataclasses.replace(trained, key=content_key("trained", batches, config, seed, device))
