"""Maximum-likelihood training of the RealNVP, independent of any orchestrator.

The loop iterates a torch DataLoader over the fit faces, keeps the weights with the best
validation log p (the last ones without validation faces), refuses to return a diverged
model, and can write its whole state every few seconds so that a killed training resumes
where it stopped and ends with the same weights.
"""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import normflows as nf
import numpy as np
import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from faceflow.config import TrainConfig
from faceflow.keys import content_key
from tasks.devices import resolve_device
from tasks.model import (
    FlowEnsemble, FlowWithGaussianFloor, ModelSpec, build_realnvp, checkpoint_bytes, checkpoint_payload, members_of,
    save_checkpoint, seeded, trainable_parameters,
)
from tasks.results import FaceBatches, FittedPCA, Split, TrainedFlow, TrainingHistory

VALIDATIONS_PER_RUN = 200
# Training has diverged once more than half of this many recent steps had a non-finite loss.
DIVERGENCE_WINDOW = 20


class TrainingDiverged(RuntimeError):
    """The loss or the kept model's log p went non-finite: a result not worth keeping or caching."""


class TrainingCancelled(RuntimeError):
    """Stopped on request: the run it belonged to has failed or was interrupted."""


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    epochs: int
    train_loss: float
    validation_log_prob: float | None
    learning_rate: float


def make_optimizer(parameters: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; the fused kernel updates all ~70 small tensors in one call instead of a Python loop."""
    return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True)


class WeightAverage:
    """An exponential moving average of a model's trainable weights, in a copy of the model.

    Uses torch's own EMA update (``get_ema_multi_avg_fn``) on tensor lists gathered once:
    ``AveragedModel.update_parameters`` walks the module tree on every call, which measured
    2 ms a step here, 40% of a step of the lab-shaped model.
    """

    def __init__(self, model: FlowWithGaussianFloor | FlowEnsemble, decay: float) -> None:
        self.module = copy.deepcopy(model)
        self._members = []  # per member: its live trainable weights and their averages
        for live, copied in zip(members_of(model), members_of(self.module), strict=True):
            copies = dict(copied.named_parameters())
            trainable = [(name, p) for name, p in live.named_parameters() if p.requires_grad]
            self._members.append(([p for _, p in trainable], [copies[name] for name, _ in trainable]))
        self._update = get_ema_multi_avg_fn(decay)

    def update(self, members: list[int]) -> None:
        """Average the weights of the ``members`` (indices) still training; the others' averages stay."""
        for member in members:
            live, averaged = self._members[member]
            self._update(averaged, live, None)


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


def loader_settings(config: TrainConfig) -> tuple[int, bool]:
    """The training settings make_batches reads: runs that agree on them (and on PCA, split and seed) share a loader."""
    return config.batch_size, config.mirror


def make_batches(pca: FittedPCA, split: Split, config: TrainConfig, seed: int) -> FaceBatches:
    """What the DataLoader serves: the fit faces' coordinates (and their mirror images'), batch size from config, seeded shuffling."""
    fit = pca.coords[split.fit]
    if config.mirror:
        fit = np.concatenate([fit, pca.mirror_coords[split.fit]])
    return FaceBatches(
        key=content_key("batches", pca, split, *loader_settings(config), seed),
        fit=np.ascontiguousarray(fit),
        validation=np.ascontiguousarray(pca.coords[split.validation]),
        batch_size=config.batch_size,
        seed=seed,
    )


def mean_log_prob(model: nf.NormalizingFlow, coords: torch.Tensor) -> float:
    """Mean log-density in nats; -inf if any face's is not finite. Leaves the model's mode as it was."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        log_p = model.log_prob(coords)
    model.train(was_training)
    return float(log_p.mean()) if bool(torch.isfinite(log_p).all()) else -math.inf


def _diverged(cause: str, config: TrainConfig) -> TrainingDiverged:
    return TrainingDiverged(
        f"training diverged: {cause}; lower train.learning_rate (--learning-rate, now {config.learning_rate:g})"
    )


@dataclass
class _Progress:
    """Everything the loop has learned so far: what a resumable checkpoint holds besides the modules."""

    epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    best_score: float = -math.inf
    best_epoch: int = 0
    train_loss: list[float] | None = None
    validation_log_prob: list[float] | None = None
    learning_rate: list[float] | None = None
    nonfinite: int = 0
    steps: int = 0

    def __post_init__(self) -> None:
        self.train_loss = self.train_loss or []
        self.validation_log_prob = self.validation_log_prob or []
        self.learning_rate = self.learning_rate or []


class Checkpointer:
    """Writes the training's whole state to ``path`` every ``every`` seconds, atomically; reads it back.

    The state is the model, its weight average, each member's optimiser and schedule, the best weights so
    far, the history, and the random generators (the noise's and the loader's): resumed from it, the
    rest of the training draws the same noise and batches as an uninterrupted one.
    """

    def __init__(self, path: Path | None, every: float, identity: str) -> None:
        self.path, self.every, self.identity = path, every, identity
        self._last = time.monotonic()

    def load(self) -> dict | None:
        if self.path is None or not self.path.is_file():
            return None
        state = torch.load(self.path, weights_only=True)
        return state if state.get("identity") == self.identity else None

    def maybe_save(self, state: Callable[[], dict]) -> None:
        if self.path is not None and time.monotonic() - self._last >= self.every:
            save_checkpoint(self.path, state() | {"identity": self.identity})
            self._last = time.monotonic()

    def discard(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def train_flow(
    batches: FaceBatches,
    config: TrainConfig,
    seed: int,
    on_epoch: Callable[[EpochStats], None] = lambda stats: None,
    device: str | None = None,
    resume_file: Path | None = None,
    checkpoint_every: float = math.inf,
    cancelled: Callable[[], bool] = lambda: False,
) -> TrainedFlow:
    """Fit by maximum likelihood on the loader's batches; keep the weights with the best validation log p.

    With ``resume_file``, the whole training state is written there every ``checkpoint_every``
    seconds, a training killed part-way resumes from it, and it is removed at the end.
    Raises TrainingDiverged when most recent steps' losses, or the kept model's log p, are not
    finite; TrainingCancelled at the first epoch after ``cancelled()`` turns true.
    """
    device = torch.device(device or resolve_device(config.device))
    fit = torch.from_numpy(batches.fit).to(device)  # for the whitening statistics and ActNorm's initialisation
    validation = torch.from_numpy(batches.validation).to(device)
    loader = face_loader(torch.from_numpy(batches.fit), batches.batch_size, batches.seed)
    loader_generator = loader.sampler.sampler.generator
    clean = fit[torch.isfinite(fit).all(1)]
    mean, std = clean.mean(0), clean.std(0)
    spec = ModelSpec(
        dim=fit.shape[1], num_layers=config.num_layers, hidden_units=config.hidden_units,
        gaussian_weight=config.gaussian_weight, members=config.members,
        member_weights=tuple(config.member_weights()),
    )
    member_epochs = config.member_epochs()
    full_length = member_epochs.count(config.epochs)  # the members that train every epoch come first

    with seeded(seed):
        model = build_realnvp(spec, mean.cpu().numpy(), std.cpu().numpy()).to(device)
    # The input noise draws from the training's own generator: reproducible however many trainings run at once.
    noise = torch.Generator(device=device).manual_seed(seed)
    members = members_of(model)
    # Each member its own optimiser and cosine schedule: the short member's ends at its last epoch, then it rests.
    optimizers = [make_optimizer(trainable_parameters(member), config) for member in members]
    schedulers = [
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(loader))
        for optimizer, epochs in zip(optimizers, member_epochs, strict=True)
    ]
    noise_scale = input_noise_scale(std, config)
    with torch.no_grad():  # ActNorm's data-dependent init on the fit faces as training sees them: noisy
        noisy = clean + noise_scale * torch.randn(clean.shape, generator=noise, device=device)
        for member in members:
            member.flow_log_prob(noisy)
    # Weight averaging smooths the last, noisy steps; evaluation and the kept state use it.
    averaged = WeightAverage(model, config.ema_decay) if config.ema_decay > 0 else None
    evaluated = averaged.module if averaged is not None else model

    checkpoints = Checkpointer(resume_file, checkpoint_every, content_key("training", batches, config, seed, str(device)))
    progress = _Progress()
    if (saved := checkpoints.load()) is not None:
        model.load_state_dict(saved["model"])
        evaluated.load_state_dict(saved["evaluated"])
        for optimizer, optimizer_state in zip(optimizers, saved["optimizer"], strict=True):
            optimizer.load_state_dict(optimizer_state)
        for scheduler, scheduler_state in zip(schedulers, saved["scheduler"], strict=True):
            scheduler.load_state_dict(scheduler_state)
        noise.set_state(saved["noise_rng"])
        loader_generator.set_state(saved["loader_rng"])
        progress = _Progress(**saved["progress"])
    resumed_from = progress.epoch

    def state() -> dict:
        return {
            "model": model.state_dict(), "evaluated": evaluated.state_dict(),
            "optimizer": [optimizer.state_dict() for optimizer in optimizers],
            "scheduler": [scheduler.state_dict() for scheduler in schedulers], "noise_rng": noise.get_state(),
            "loader_rng": loader_generator.get_state(), "progress": vars(progress),
        }

    # About 200 validations a run: enough to pick a good epoch, cheap next to training.
    validate_every = max(1, config.epochs // VALIDATIONS_PER_RUN)
    recent_nonfinite: deque[bool] = deque(maxlen=DIVERGENCE_WINDOW)
    started = time.perf_counter()
    model.train()
    for epoch in range(progress.epoch + 1, config.epochs + 1):
        if cancelled():
            raise TrainingCancelled(f"training cancelled at epoch {epoch} of {config.epochs}")
        epoch_loss, finite_batches = 0.0, 0
        training = [member for member, epochs in enumerate(member_epochs) if epoch <= epochs]
        for (batch,) in loader:
            batch = batch.to(device)
            if config.noise_draws > 1:
                batch = batch.repeat(config.noise_draws, 1)
            batch = batch + noise_scale * torch.randn(batch.shape, generator=noise, device=device)
            # The flows alone, each on its own likelihood (the sum: each gradient reaches one member); the floor is fixed.
            member_losses = -torch.stack([members[member].flow_log_prob(batch).mean() for member in training])
            loss = member_losses.sum()
            losses = member_losses.tolist()  # one read of the losses per step, for the check and the curve
            # The curve is the mean loss of the members that train every epoch: it does not jump when the short one rests.
            loss_value = math.fsum(losses[:full_length]) / full_length if all(map(math.isfinite, losses)) else math.nan
            progress.steps += 1
            for member in training:
                optimizers[member].zero_grad(set_to_none=True)
            finite = math.isfinite(loss_value)
            recent_nonfinite.append(not finite)
            if finite:
                loss.backward()
                for member in training:
                    optimizers[member].step()
                if averaged is not None:
                    averaged.update(training)
                epoch_loss += loss_value
                finite_batches += 1
            else:
                progress.nonfinite += 1
            for member in training:
                schedulers[member].step()
            if sum(recent_nonfinite) > DIVERGENCE_WINDOW // 2:
                checkpoints.discard()
                raise _diverged(
                    f"{sum(recent_nonfinite)} of the last {len(recent_nonfinite)} steps had a non-finite loss "
                    f"(epoch {epoch})", config,
                )
        validating = len(validation) and (epoch % validate_every == 0 or epoch == config.epochs)
        validation_score = mean_log_prob(evaluated, validation) if validating else None
        learning_rate = schedulers[0].get_last_lr()[0]
        train_loss = epoch_loss / finite_batches if finite_batches else math.nan
        progress.epoch = epoch
        progress.train_loss.append(train_loss)
        progress.validation_log_prob.append(math.nan if validation_score is None else validation_score)
        progress.learning_rate.append(learning_rate)
        on_epoch(EpochStats(epoch, config.epochs, train_loss, validation_score, learning_rate))
        if validation_score is not None and validation_score > progress.best_score:
            progress.best_state = copy.deepcopy(evaluated.state_dict())
            progress.best_score, progress.best_epoch = validation_score, epoch
        checkpoints.maybe_save(state)
    if progress.best_state is None:  # no validation faces, or no finite validation score: the last weights
        progress.best_state, progress.best_epoch = copy.deepcopy(evaluated.state_dict()), config.epochs
    checkpoints.discard()
    _refuse_non_finite(evaluated, progress.best_state, {"fit": clean, "validation": validation}, config)
    if progress.nonfinite > progress.steps / 2:
        raise _diverged(f"{progress.nonfinite} of {progress.steps} steps had a non-finite loss", config)
    return TrainedFlow(
        key=content_key("trained", batches, config, seed, str(device)),
        checkpoint=checkpoint_bytes(
            checkpoint_payload(progress.best_state, spec, config.model_dump(mode="json") | {"seed": seed})
        ),
        history=TrainingHistory(
            np.asarray(progress.train_loss), np.asarray(progress.validation_log_prob), np.asarray(progress.learning_rate)
        ),
        best_epoch=progress.best_epoch,
        nonfinite_steps=progress.nonfinite,
        steps=progress.steps,
        seconds=time.perf_counter() - started,
        resumed_from_epoch=resumed_from,
    )


def _refuse_non_finite(
    model: nf.NormalizingFlow, kept: dict[str, torch.Tensor], parts: dict[str, torch.Tensor], config: TrainConfig
) -> None:
    """A kept model whose weights or log p on the training's own faces are not finite has diverged."""
    if not all(bool(torch.isfinite(value).all()) for value in kept.values()):
        raise _diverged("the kept weights are not finite", config)
    model.load_state_dict(kept)
    for part, coords in parts.items():
        if len(coords) and not math.isfinite(mean_log_prob(model, coords)):
            raise _diverged(f"the kept model's log p of the {part} faces is not finite", config)
