from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from faceflow.config import TrainConfig
from tasks.train import FaceBatches, face_loader, train_flow


def _batches(data: np.ndarray, validation: np.ndarray, batch_size: int = 16) -> FaceBatches:
    return FaceBatches("test", face_loader(torch.from_numpy(data), batch_size, seed=0), torch.from_numpy(validation))


def _correlated(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 4))
    return np.concatenate([base, base**2 + 0.1 * rng.normal(size=(n, 4))], axis=1).astype(np.float32)


SMALL = TrainConfig(epochs=30, num_layers=2, hidden_units=32, input_noise=0.0, weight_decay=0.0, learning_rate=3e-3, device="cpu")


def test_training_improves_validation_log_prob_and_keeps_the_best() -> None:
    trained = train_flow(_batches(_correlated(128, 0), _correlated(64, 1)), SMALL, seed=0)
    scores = [epoch.validation_log_prob for epoch in trained.history]
    assert len(trained.history) == 30 and trained.steps == 30 * 8
    assert max(scores) > scores[0] + 0.5
    assert trained.best_epoch == int(np.argmax(scores)) + 1
    model = trained.model()
    with torch.no_grad():
        kept = model.log_prob(torch.from_numpy(_correlated(64, 1))).mean().item()
    assert kept == pytest.approx(max(scores), abs=1e-3)


def test_training_is_reproducible_for_a_seed() -> None:
    first = train_flow(_batches(_correlated(64, 0), _correlated(16, 1)), SMALL.model_copy(update={"epochs": 3}), seed=5)
    second = train_flow(_batches(_correlated(64, 0), _correlated(16, 1)), SMALL.model_copy(update={"epochs": 3}), seed=5)
    assert [h.train_loss for h in first.history] == [h.train_loss for h in second.history]


def test_non_finite_losses_are_skipped_and_counted() -> None:
    data = _correlated(64, 0)
    data[7] = np.nan  # one poisoned face: every epoch exactly one batch has a NaN loss
    trained = train_flow(_batches(data, _correlated(16, 1)), SMALL.model_copy(update={"epochs": 4}), seed=0)
    assert trained.nonfinite_steps == 4
    assert all(torch.isfinite(v).all() for v in trained.state_dict.values() if v.is_floating_point())
    assert all(math.isfinite(h.train_loss) for h in trained.history)


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
    average.update()
    torch.testing.assert_close(average.module.weight, torch.full((1, 2), 1.2))
    assert average.module.weight.data_ptr() != model.weight.data_ptr()


def test_without_validation_the_last_weights_are_kept() -> None:
    trained = train_flow(_batches(_correlated(64, 0), np.empty((0, 8), dtype=np.float32)),
                         SMALL.model_copy(update={"epochs": 3}), seed=0)
    assert trained.best_epoch == 3 and all(h.validation_log_prob is None for h in trained.history)


def test_training_leaves_the_loaders_generator_alone() -> None:
    batches = _batches(_correlated(64, 0), _correlated(16, 1))
    generator = batches.loader.sampler.sampler.generator
    before = generator.get_state()
    first = train_flow(batches, SMALL.model_copy(update={"epochs": 2}), seed=0)
    second = train_flow(batches, SMALL.model_copy(update={"epochs": 2}), seed=0)
    assert torch.equal(generator.get_state(), before)
    assert [h.train_loss for h in first.history] == [h.train_loss for h in second.history]


def test_actnorm_is_initialised_from_fit_faces_only_and_the_averaged_copy_shares_it() -> None:
    """Validation faces choose the kept epoch, nothing else: far-off validation faces change no weight."""
    config = SMALL.model_copy(update={"epochs": 1, "input_noise": 0.3})
    fit = _correlated(128, 0)
    kept = [train_flow(_batches(fit, validation), config, seed=0).state_dict
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
    assert trained.steps == 2 * len(batches.loader) == 8
    reordered = _batches(data, _correlated(16, 1), batch_size=16)
    reordered.loader.sampler.sampler.generator.manual_seed(1)
    other = train_flow(reordered, config, seed=0)
    assert [h.train_loss for h in other.history] != [h.train_loss for h in trained.history]
