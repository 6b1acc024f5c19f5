from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from faceflow.config import TrainConfig
from faceflow.keys import array_digest, content_key
from tasks.model import trained_model
from tasks.results import FaceBatches, TrainedFlow
from tasks.train import TrainingDiverged, face_loader, train_flow


def _batches(data: np.ndarray, validation: np.ndarray, batch_size: int = 16, seed: int = 0) -> FaceBatches:
    key = content_key("test-batches", array_digest(data), array_digest(validation), batch_size, seed)
    return FaceBatches(key, data, validation, batch_size, seed)


def _weights(trained: TrainedFlow) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(trained.checkpoint), weights_only=True)["state_dict"]


def _correlated(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 4))
    return np.concatenate([base, base**2 + 0.1 * rng.normal(size=(n, 4))], axis=1).astype(np.float32)


SMALL = TrainConfig(epochs=30, num_layers=2, hidden_units=32, input_noise=0.0, weight_decay=0.0, learning_rate=3e-3, device="cpu")


def test_training_improves_validation_log_prob_and_keeps_the_best() -> None:
    trained = train_flow(_batches(_correlated(128, 0), _correlated(64, 1)), SMALL, seed=0)
    scores = trained.history.validation_log_prob
    assert len(trained.history) == 30 and trained.steps == 30 * 8
    assert max(scores) > scores[0] + 0.5
    assert trained.best_epoch == int(np.argmax(scores)) + 1
    model = trained_model(trained)
    with torch.no_grad():
        kept = model.log_prob(torch.from_numpy(_correlated(64, 1))).mean().item()
    assert kept == pytest.approx(max(scores), abs=1e-3)


def test_training_is_reproducible_for_a_seed() -> None:
    first = train_flow(_batches(_correlated(64, 0), _correlated(16, 1)), SMALL.model_copy(update={"epochs": 3}), seed=5)
    second = train_flow(_batches(_correlated(64, 0), _correlated(16, 1)), SMALL.model_copy(update={"epochs": 3}), seed=5)
    assert first.history.train_loss.tolist() == second.history.train_loss.tolist()


def test_non_finite_losses_are_skipped_and_counted() -> None:
    data = _correlated(64, 0)
    data[7] = np.nan  # one poisoned face: every epoch exactly one batch of four has a NaN loss
    trained = train_flow(_batches(data, _correlated(16, 1)), SMALL.model_copy(update={"epochs": 4}), seed=0)
    assert trained.nonfinite_steps == 4
    assert all(torch.isfinite(v).all() for v in _weights(trained).values() if v.is_floating_point())
    assert all(math.isfinite(loss) for loss in trained.history.train_loss)


@pytest.mark.parametrize("ema_decay", [0.0, 0.995])
def test_a_diverging_training_fails_naming_the_learning_rate(ema_decay: float) -> None:
    """Learning rate 1.0 sends every loss to NaN: an error, never a model (with or without the EMA)."""
    config = SMALL.model_copy(update={"epochs": 40, "learning_rate": 1.0, "ema_decay": ema_decay})
    with pytest.raises(TrainingDiverged, match=r"non-finite.*train\.learning_rate \(--learning-rate, now 1\)"):
        train_flow(_batches(_correlated(64, 0), _correlated(16, 1), batch_size=64), config, seed=0)


class _Killed(Exception):
    """Stands in for the process dying part-way (the end-to-end test kills it with SIGKILL)."""


def _die_at(epoch: int):
    def on_epoch(stats) -> None:
        if stats.epoch == epoch:
            raise _Killed
    return on_epoch


@pytest.mark.parametrize("short_member_epochs", [20, 8], ids=["equal members", "the short member resting"])
def test_a_killed_training_resumes_from_its_checkpoint_to_the_same_weights(tmp_path: Path, short_member_epochs: int) -> None:
    """State written every epoch; the run dies after epoch 12; the resumed run ends bit-identical.

    Exact equality holds because the checkpoint holds every random generator the loop draws
    from (torch's and the loader's) and CPU kernels are deterministic at a fixed thread count.
    With a short member of 8 epochs, the run dies while it rests: its optimiser, schedule and
    weight average must come back as they stopped.
    """
    config = SMALL.model_copy(update={"epochs": 20, "input_noise": 0.3, "short_member_epochs": short_member_epochs})
    batches = _batches(_correlated(64, 0), _correlated(16, 1))
    uninterrupted = train_flow(batches, config, seed=3)
    resume_file = tmp_path / "training.pt"

    with pytest.raises(_Killed):
        train_flow(batches, config, seed=3, on_epoch=_die_at(12), resume_file=resume_file, checkpoint_every=0)
    assert resume_file.is_file()
    resumed = train_flow(batches, config, seed=3, resume_file=resume_file, checkpoint_every=0)
    assert resumed.resumed_from_epoch == 11 and not resume_file.exists()
    assert resumed.history.train_loss.tolist() == uninterrupted.history.train_loss.tolist()
    theirs = _weights(uninterrupted)
    for name, value in _weights(resumed).items():
        assert torch.equal(value, theirs[name]), name


def test_a_checkpoint_of_another_training_is_ignored(tmp_path: Path) -> None:
    config = SMALL.model_copy(update={"epochs": 3})
    resume_file = tmp_path / "training.pt"
    with pytest.raises(_Killed):
        train_flow(_batches(_correlated(64, 0), _correlated(16, 1)), config, seed=1, resume_file=resume_file,
                   checkpoint_every=0, on_epoch=_die_at(2))
    assert resume_file.is_file()
    other = train_flow(_batches(_correlated(64, 5), _correlated(16, 1)), config, seed=1, resume_file=resume_file)
    assert other.resumed_from_epoch == 0


def test_noise_shape_runs_from_whitened_to_absolute() -> None:
    from tasks.train import input_noise_scale

    std = torch.tensor([4.0, 1.0])
    whitened = input_noise_scale(std, SMALL.model_copy(update={"input_noise": 0.5, "noise_exponent": 0.0}))
    absolute = input_noise_scale(std, SMALL.model_copy(update={"input_noise": 0.5, "noise_exponent": 1.0}))
    torch.testing.assert_close(whitened / std, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(absolute, torch.tensor([1.25, 1.25]))


def test_weight_average_follows_the_model_with_its_decay() -> None:
    from tasks.train import WeightAverage

    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
    average = WeightAverage(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)
    average.update([0])
    torch.testing.assert_close(average.module.weight, torch.full((1, 2), 1.2))
    assert average.module.weight.data_ptr() != model.weight.data_ptr()


def test_without_validation_the_last_weights_are_kept() -> None:
    trained = train_flow(_batches(_correlated(64, 0), np.empty((0, 8), dtype=np.float32)),
                         SMALL.model_copy(update={"epochs": 3}), seed=0)
    assert trained.best_epoch == 3 and np.isnan(trained.history.validation_log_prob).all()


def test_the_same_batches_train_the_same_model_twice() -> None:
    """A cached FaceBatches is reused by later runs in a process: training must not consume it."""
    batches = _batches(_correlated(64, 0), _correlated(16, 1))
    first = train_flow(batches, SMALL.model_copy(update={"epochs": 2}), seed=0)
    second = train_flow(batches, SMALL.model_copy(update={"epochs": 2}), seed=0)
    assert first.history.train_loss.tolist() == second.history.train_loss.tolist()


def test_actnorm_is_initialised_from_fit_faces_only_and_the_averaged_copy_shares_it() -> None:
    """Validation faces choose the kept epoch, nothing else: far-off validation faces change no weight."""
    config = SMALL.model_copy(update={"epochs": 1, "input_noise": 0.3})
    fit = _correlated(128, 0)
    kept = [_weights(train_flow(_batches(fit, validation), config, seed=0))
            for validation in (_correlated(64, 1), _correlated(64, 1) * 50 + 100)]
    assert kept[0].keys() == kept[1].keys()
    for name in kept[0]:
        torch.testing.assert_close(kept[0][name], kept[1][name], rtol=0, atol=0, msg=name)
    actnorm = [name for name in kept[0] if name.endswith("data_dep_init_done")]
    assert actnorm and all(bool(kept[0][name]) for name in actnorm)


def test_loader_yields_whole_shuffled_batches_of_every_face_each_pass() -> None:
    coords = torch.arange(10, dtype=torch.float32)[:, None].repeat(1, 2)
    loader = face_loader(coords, batch_size=4, seed=0)
    passes = [[batch for (batch,) in loader] for _ in range(2)]
    assert [len(batch) for batch in passes[0]] == [4, 4, 2]
    orders = [torch.cat(batches)[:, 0].tolist() for batches in passes]
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(10))
    assert orders[0] != orders[1] and orders[0] != list(range(10))


def test_training_steps_are_the_loaders_batches() -> None:
    """The loop trains on what the DataLoader yields: a loader over other faces trains another model."""
    data = _correlated(64, 0)
    config = SMALL.model_copy(update={"epochs": 2})
    batches = _batches(data, _correlated(16, 1), batch_size=16)
    trained = train_flow(batches, config, seed=0)
    assert trained.steps == 2 * batches.batches_per_epoch == 8
    reordered = _batches(data, _correlated(16, 1), batch_size=16, seed=1)
    other = train_flow(reordered, config, seed=0)
    assert other.history.train_loss.tolist() != trained.history.train_loss.tolist()


def test_training_fits_the_flow_alone_and_the_kept_model_carries_the_gaussian_floor() -> None:
    no_validation = np.empty((0, 8), dtype=np.float32)
    config = SMALL.model_copy(update={"epochs": 3, "gaussian_weight": 0.0})
    alone = train_flow(_batches(_correlated(64, 0), no_validation), config, seed=2)
    floored = train_flow(_batches(_correlated(64, 0), no_validation), config.model_copy(update={"gaussian_weight": 0.3}), seed=2)
    assert floored.history.train_loss.tolist() == alone.history.train_loss.tolist()
    faces = torch.from_numpy(_correlated(32, 1))
    flow, mixed = trained_model(alone), trained_model(floored)
    with torch.no_grad():
        expected = torch.logaddexp(flow.log_prob(faces) + math.log(0.7), flow.gaussian_log_prob(faces) + math.log(0.3))
        torch.testing.assert_close(mixed.log_prob(faces), expected)


def test_an_ensemble_trains_every_member_from_its_own_start() -> None:
    from tasks.model import FlowEnsemble

    config = SMALL.model_copy(update={"epochs": 5, "members": 2, "ema_decay": 0.0})
    trained = train_flow(_batches(_correlated(64, 0), _correlated(16, 1)), config, seed=4)
    untrained = train_flow(_batches(_correlated(64, 0), _correlated(16, 1)), config.model_copy(update={"learning_rate": 1e-12}), seed=4)
    model, start = trained_model(trained), trained_model(untrained)
    assert isinstance(model, FlowEnsemble) and len(model.members) == 2
    faces = torch.from_numpy(_correlated(16, 1))
    with torch.no_grad():
        moved = [float((member.flow_log_prob(faces) - begun.flow_log_prob(faces)).abs().max()) for member, begun in zip(model.members, start.members)]
        apart = float((model.members[0].flow_log_prob(faces) - model.members[1].flow_log_prob(faces)).abs().max())
    assert min(moved) > 1e-2 and apart > 1e-2


def test_the_short_member_trains_its_epochs_on_its_own_schedule_then_rests() -> None:
    """Member 1 of a 6-epoch ensemble trains 2 epochs: exactly as in a 2-epoch training, where every member trains 2."""
    no_validation = np.empty((0, 8), dtype=np.float32)
    config = SMALL.model_copy(update={"members": 2, "ema_decay": 0.0, "short_member_epochs": 2})
    assert config.model_copy(update={"epochs": 6}).member_epochs() == [6, 2]
    long = trained_model(train_flow(_batches(_correlated(64, 0), no_validation), config.model_copy(update={"epochs": 6}), seed=3))
    short = trained_model(train_flow(
        _batches(_correlated(64, 0), no_validation), config.model_copy(update={"epochs": 2}), seed=3
    ))
    for name, weight in short.members[1].state_dict().items():
        torch.testing.assert_close(long.members[1].state_dict()[name], weight, rtol=0, atol=0, msg=name)
    faces = torch.from_numpy(_correlated(16, 1))
    with torch.no_grad():
        assert float((long.members[0].flow_log_prob(faces) - short.members[0].flow_log_prob(faces)).abs().max()) > 1e-2


def test_the_loss_curve_is_the_full_length_members_and_does_not_jump_when_the_short_one_rests() -> None:
    """With one long member, the ensemble's curve is exactly one flow's: the long member trains as that flow does."""
    config = SMALL.model_copy(update={"epochs": 6, "members": 2, "short_member_epochs": 2})
    batches = _batches(_correlated(64, 0), _correlated(16, 1))
    ensemble = train_flow(batches, config, seed=3)
    alone = train_flow(batches, config.model_copy(update={"members": 1}), seed=3)
    assert ensemble.history.train_loss.tolist() == alone.history.train_loss.tolist()
