"""Optimisation steps per second: the project's training loop vs the bare coupling networks.

Both at the lab's shape: 8 couplings, hidden width 128, batch 32, 150 epochs over 400 faces.
"""

from __future__ import annotations

import math
import time

import normflows as nf
import numpy as np
import torch

from faceflow.config import TrainConfig
from tasks.lab_recipe import LAB_BATCH_SIZE, LAB_EPOCHS, LAB_HIDDEN, LAB_LAYERS
from tasks.results import FaceBatches
from tasks.train import make_optimizer, train_flow

EQUAL_SHAPE = TrainConfig(
    epochs=LAB_EPOCHS, batch_size=LAB_BATCH_SIZE, num_layers=LAB_LAYERS, hidden_units=LAB_HIDDEN, members=1, device="cpu"
)


def project_steps_per_second(coords: np.ndarray, config: TrainConfig = EQUAL_SHAPE) -> dict[str, float]:
    """faceflow's train_flow on all faces, no validation pass, at the lab's shape."""
    batches = FaceBatches("bench", coords, np.empty((0, coords.shape[1]), dtype=np.float32), config.batch_size, seed=0)
    trained = train_flow(batches, config, seed=0)
    return {"steps": trained.steps, "seconds": trained.seconds, "steps_per_second": trained.steps / trained.seconds}


def compute_floor_steps_per_second(coords: np.ndarray, config: TrainConfig = EQUAL_SHAPE) -> dict[str, float]:
    """The same coupling MLPs, forward + backward + AdamW step, with no flow around them."""
    dim = coords.shape[1]
    torch.manual_seed(0)
    nets = torch.nn.ModuleList(
        nf.nets.MLP([dim // 2, config.hidden_units, config.hidden_units, dim]) for _ in range(config.num_layers)
    )
    optimizer = make_optimizer(list(nets.parameters()), config)
    data = torch.from_numpy(coords)
    steps = config.epochs * math.ceil(len(data) / config.batch_size)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for _ in range(steps):
        batch = data[torch.randint(len(data), (config.batch_size,), generator=generator), : dim // 2]
        loss = sum(net(batch).square().mean() for net in nets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    return {"steps": steps, "seconds": seconds, "steps_per_second": steps / seconds}


def alternating_best(coords: np.ndarray, rounds: int, config: TrainConfig = EQUAL_SHAPE) -> dict[str, dict]:
    """Project and floor measured in turns, ``rounds`` times each; the fastest run of each counts.

    Taking turns exposes both to the same drifts of a shared machine, and load from elsewhere
    only ever slows a run down, so the best run is the least disturbed one.
    """
    runs: dict[str, list[dict[str, float]]] = {"project": [], "floor": []}
    for _ in range(rounds):
        runs["project"].append(project_steps_per_second(coords, config))
        runs["floor"].append(compute_floor_steps_per_second(coords, config))
    return {
        name: max(measured, key=lambda run: run["steps_per_second"])
        | {"all_steps_per_second": [run["steps_per_second"] for run in measured]}
        for name, measured in runs.items()
    }
