"""The default ensemble's training step, its members one after another vs batched into one network.

Issue 33 asked for the members' coupling networks evaluated as batched matrix products, on the
premise that training is dispatch-bound. This part measures that premise at the default's shape
(TrainConfig's defaults: 64 components, 3 couplings of 192 units, batch 448) on one thread, as a
default run trains (the model and the new-people fold each on one of the two cores):

- one step of k members (forward, backward, fused AdamW) for k = 1, 2, 3: **per member**, each
  member's normflows log p in turn, as tasks/train.py does; **batched**, the members' trainable
  weights stacked (a differentiable ``torch.stack`` of their own parameters) and one log p
  evaluated for all of them with ``torch.func.vmap`` over ``functional_call``, so every coupling
  MLP is one batched matrix product for all members;
- the batched form's log p and gradients against the per-member reference (largest difference);
- from the step times, one whole default training (members train 350, 350 and 100 epochs) over
  its longest member trained alone: issue 33's "ensemble / longest member" figure, for both forms.

The batched log p walks normflows' own blocks (each block's ``inverse``, then the base's
``log_prob``), summing out of place: normflows' ``NormalizingFlow.log_prob`` adds into a
tensor in place, which vmap cannot batch.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.func import functional_call, vmap

from faceflow.config import TrainConfig
from faceflow.threads import limited_threads
from tasks.model import FlowWithGaussianFloor, ModelSpec, build_realnvp, members_of, seeded
from tasks.train import make_optimizer

DEFAULT = TrainConfig()
STEPS = 40  # timed steps per measurement; each the best of ROUNDS, in turns
ROUNDS = 3


class _FlowLogProb(torch.nn.Module):
    """A member's log p as its ``forward``, out of place, for ``functional_call`` under vmap."""

    def __init__(self, flow: FlowWithGaussianFloor) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z, log_q = x, torch.zeros((), dtype=x.dtype)
        for block in reversed(self.flow.flows):
            z, log_det = block.inverse(z)
            log_q = log_q + log_det
        return log_q + self.flow.q0.log_prob(z)


def _ensemble(coords: np.ndarray, config: TrainConfig) -> list[FlowWithGaussianFloor]:
    spec = ModelSpec(dim=coords.shape[1], num_layers=config.num_layers, hidden_units=config.hidden_units,
                     members=config.members, member_weights=tuple(config.member_weights()))
    with seeded(0):
        model = build_realnvp(spec, coords.mean(0), coords.std(0))
        members = members_of(model)
        data = torch.from_numpy(coords)
        with torch.no_grad():
            for member in members:  # ActNorm's initialisation, then weights that differ from member to member
                member.flow_log_prob(data)
                for parameter in member.parameters():
                    if parameter.requires_grad:
                        parameter.add_(0.05 * torch.randn_like(parameter))
    return members


def _batched_log_prob(members: list[FlowWithGaussianFloor]):  # type: ignore[no-untyped-def]
    """log p of the given members, shape (members, faces), as one vmapped evaluation of their stacked weights."""
    reference = _FlowLogProb(members[0])
    trainable = [name for name, p in reference.named_parameters() if p.requires_grad]
    # Frozen weights (the whitening) and buffers (ActNorm's flag, the permutation) are the same in every member.
    shared = {name: p for name, p in reference.named_parameters() if not p.requires_grad} | dict(reference.named_buffers())
    wrapped = [dict(_FlowLogProb(member).named_parameters()) for member in members]

    def one(weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(reference, weights | shared, (x,))

    batched = vmap(one, in_dims=(0, None))

    def log_prob(x: torch.Tensor) -> torch.Tensor:
        return batched({name: torch.stack([weights[name] for weights in wrapped]) for name in trainable}, x)

    return log_prob


def largest_differences(coords: np.ndarray, config: TrainConfig = DEFAULT) -> dict[str, float]:
    """Batched vs per-member: the largest absolute difference of log p, and of any gradient."""
    members = _ensemble(coords, config)
    batch = torch.from_numpy(coords[: config.batch_size])
    results = {}
    for form, log_prob in (("per_member", lambda x: torch.stack([m.flow_log_prob(x) for m in members])),
                           ("batched", _batched_log_prob(members))):
        for member in members:
            member.zero_grad(set_to_none=True)
        values = log_prob(batch)
        (-values.mean(1)).sum().backward()
        results[form] = (values.detach(), [p.grad.clone() for m in members for p in m.parameters() if p.requires_grad])
    (log_p, grads), (log_p_batched, grads_batched) = results["per_member"], results["batched"]
    return {
        "log_prob": float((log_p - log_p_batched).abs().max()),
        "gradient": max(float((a - b).abs().max()) for a, b in zip(grads, grads_batched, strict=True)),
        "log_prob_scale": float(log_p.abs().max()),
    }


def _step_seconds(coords: np.ndarray, count: int, batched: bool, config: TrainConfig) -> float:
    members = _ensemble(coords, config)[:count]
    parameters = [p for member in members for p in member.parameters() if p.requires_grad]
    optimizer = make_optimizer(parameters, config)
    log_prob = _batched_log_prob(members) if batched else (
        lambda x: torch.stack([member.flow_log_prob(x) for member in members])
    )
    data = torch.from_numpy(coords)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        batch = data[torch.randint(len(data), (config.batch_size,), generator=generator)]
        loss = -log_prob(batch).mean(1).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5):  # warm-up: allocator, first-call costs
        step()
    started = time.perf_counter()
    for _ in range(STEPS):
        step()
    return (time.perf_counter() - started) / STEPS


def step_times(coords: np.ndarray, config: TrainConfig = DEFAULT) -> dict[str, dict[int, float]]:
    """Best seconds per step of 1, 2 and 3 members in each form, measured in turns on one thread."""
    times: dict[str, dict[int, list[float]]] = {"per_member": {}, "batched": {}}
    with limited_threads(1):
        for _ in range(ROUNDS):
            for count in range(1, config.members + 1):
                for form in times:
                    times[form].setdefault(count, []).append(_step_seconds(coords, count, form == "batched", config))
    return {form: {count: min(runs) for count, runs in by_count.items()} for form, by_count in times.items()}


def training_ratio(steps: dict[int, float], alone: float, config: TrainConfig = DEFAULT) -> float:
    """One default training over its longest member trained alone (``alone`` seconds a step), from step times.

    Member k trains while the epoch is at most its epochs: 3 members for the short one's epochs, then 2.
    """
    epochs = config.member_epochs()
    ensemble = sum(steps[sum(1 for last in epochs if epoch <= last)] for epoch in range(1, config.epochs + 1))
    return ensemble / (config.epochs * alone)


def ensemble_batching(coords: np.ndarray) -> dict[str, object]:
    """Step times of both forms, their training ratios, and the batched form's agreement with the reference."""
    steps = step_times(coords)
    return {
        "step_seconds": steps,
        "differences": largest_differences(coords),
        # A member alone needs no batching: both forms are compared with one member trained as today.
        "training_ratio": {form: training_ratio(by_count, steps["per_member"][1]) for form, by_count in steps.items()},
        "batched_over_per_member_3": steps["batched"][3] / steps["per_member"][3],
    }
