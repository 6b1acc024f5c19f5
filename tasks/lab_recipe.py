"""The lab notebook's original recipe, kept as a fixed reference point for quality and speed."""

from __future__ import annotations

import normflows as nf
import torch
from torch.utils.data import DataLoader, TensorDataset

from tasks.model import seeded

LAB_LAYERS = 8
LAB_HIDDEN = 128
LAB_EPOCHS = 150
LAB_BATCH_SIZE = 32
LAB_LEARNING_RATE = 1e-4


def build_lab_realnvp(dim: int) -> nf.NormalizingFlow:
    """MaskedAffineFlow x8 on alternating checkerboard masks with full-width s and t nets, ActNorm."""
    mask = torch.tensor([1.0 if i % 2 == 0 else 0.0 for i in range(dim)])
    flows: list[nf.flows.Flow] = []
    for layer in range(LAB_LAYERS):
        s = nf.nets.MLP([dim, LAB_HIDDEN, LAB_HIDDEN, dim], init_zeros=True)
        t = nf.nets.MLP([dim, LAB_HIDDEN, LAB_HIDDEN, dim], init_zeros=True)
        flows += [nf.flows.MaskedAffineFlow(mask if layer % 2 == 0 else 1 - mask, t, s), nf.flows.ActNorm(dim)]
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(dim), flows)


def train_lab_recipe(coords: torch.Tensor, seed: int, epochs: int = LAB_EPOCHS) -> tuple[nf.NormalizingFlow, int]:
    """The lab's loop as it was: DataLoader batches, Adam 1e-4, StepLR(12, 0.6). Returns (model, steps)."""
    with seeded(seed):
        model = build_lab_realnvp(coords.shape[1])
    loader = DataLoader(
        TensorDataset(coords), batch_size=LAB_BATCH_SIZE, shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=LAB_LEARNING_RATE)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=12, gamma=0.6)
    steps = 0
    for _ in range(epochs):
        model.train()
        for (batch,) in loader:
            loss = model.forward_kld(batch)
            steps += 1
            if torch.isfinite(loss):
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        scheduler.step()
    return model.eval(), steps
