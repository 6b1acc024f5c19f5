"""Flow invariants as normflows tests them, for the model faceflow builds, and its checkpoint."""

from __future__ import annotations

from pathlib import Path

import normflows as nf
import numpy as np
import pytest
import torch

from faceflow.config import TrainConfig
from tasks.model import ModelSpec, build_realnvp, checkpoint_payload, load_checkpoint, save_checkpoint

DIM = 8


def _model(seed: int = 0, num_layers: int = 3):
    torch.manual_seed(seed)
    spec = ModelSpec(dim=DIM, num_layers=num_layers, hidden_units=16)
    model = build_realnvp(spec, np.linspace(-1, 1, DIM), np.linspace(0.5, 2, DIM))
    with torch.no_grad():
        model.log_prob(torch.randn(32, DIM))  # ActNorm's data-dependent init, before the perturbation
        # Random weights everywhere so the couplings, mix and ActNorm are not the identity they start as.
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


@pytest.mark.parametrize("num_layers", [TrainConfig().num_layers, 5])
def test_inverse_of_forward_is_identity(num_layers: int) -> None:
    model = _model(num_layers=num_layers)
    z = torch.randn(16, DIM)
    with torch.no_grad():
        x, log_det_forward = model.forward_and_log_det(z)
        z_back, log_det_inverse = model.inverse_and_log_det(x)
    torch.testing.assert_close(z_back, z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_det_forward + log_det_inverse, torch.zeros(16), atol=1e-4, rtol=0)
    assert x.shape == z.shape and x.dtype == torch.float32


@pytest.mark.parametrize("num_layers", [TrainConfig().num_layers, 5])
def test_sampling_and_scoring_agree_on_the_density(num_layers: int) -> None:
    model = _model(num_layers=num_layers)
    with torch.no_grad():
        x, log_q = model.sample(64)  # density tracked along the forward (sampling) direction
        torch.testing.assert_close(model.log_prob(x), log_q, atol=1e-3, rtol=1e-4)


def test_whitening_is_frozen_and_its_scale_enters_log_prob() -> None:
    model = _model()
    whitening = model.flows[-1]
    assert not any(p.requires_grad for p in whitening.parameters())
    std = torch.linspace(0.5, 2, DIM, dtype=torch.float32)
    torch.testing.assert_close(whitening.s.exp().squeeze(), std, rtol=1e-5, atol=1e-6)
    # Scaling the data by std costs exactly sum(log std) nats of density.
    x = torch.randn(6, DIM)
    mean = torch.linspace(-1, 1, DIM, dtype=torch.float32)
    with torch.no_grad():
        whitened_log_p = model.log_prob(x * std + mean) + std.log().sum()
        inner = torch.zeros(6)
        z = x
        for flow in reversed(model.flows[:-1]):
            z, log_det = flow.inverse(z)
            inner += log_det
        torch.testing.assert_close(whitened_log_p, model.q0.log_prob(z) + inner, atol=1e-4, rtol=1e-5)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "model.pt"
    save_checkpoint(path, checkpoint_payload(model.state_dict(), ModelSpec(DIM, 3, 16), {"epochs": 7}))
    torch.manual_seed(123)  # the rebuild draws other initial weights; the checkpoint's must win
    restored, config = load_checkpoint(path)
    x = torch.randn(5, DIM)
    with torch.no_grad():
        torch.testing.assert_close(restored.log_prob(x), model.log_prob(x))
    assert config == {"epochs": 7}
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary left behind


def test_loading_something_else_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="weights.pt.*not a faceflow checkpoint"):
        load_checkpoint(path)


def test_couplings_alternate_halves_with_one_interleaving_mix_after_the_data_side_coupling() -> None:
    model = _model()
    kinds = [type(flow).__name__ for flow in model.flows]
    assert kinds == [
        "Split", "AffineCoupling", "SwapHalves", "AffineCoupling", "Merge",
        "LULinearPermute", "Split", "AffineCoupling", "Merge", "ActNorm", "AffineConstFlow",
    ]
    assert model.flows[6].mode == "channel"  # the data-side coupling transforms the trailing half
    with torch.no_grad():  # the mix regroups components: even ones first, then odd ones
        mixed, _ = model.flows[5].permutation(torch.arange(DIM, dtype=torch.float32)[None])
    assert mixed.squeeze().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def _one_block_per_coupling(num_layers: int) -> nf.NormalizingFlow:
    """The same model written with one normflows AffineCouplingBlock per coupling: the reference."""
    flows: list[nf.flows.Flow] = []
    for layer in range(num_layers):
        if layer == num_layers - 1 and layer > 0:
            flows.append(nf.flows.LULinearPermute(DIM))
        mode = "channel" if (num_layers - 1 - layer) % 2 == 0 else "channel_inv"  # data side: "channel"
        flows.append(nf.flows.AffineCouplingBlock(nf.nets.MLP([DIM // 2, 8, 8, DIM]), split_mode=mode))
    flows += [nf.flows.ActNorm(DIM), nf.flows.AffineConstFlow((DIM,))]
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(DIM), flows)


@pytest.mark.parametrize("num_layers", [1, 2, 3, 4])
def test_chained_couplings_compute_what_one_block_per_coupling_computes(num_layers: int) -> None:
    model = build_realnvp(ModelSpec(dim=DIM, num_layers=num_layers, hidden_units=8), np.zeros(DIM), np.ones(DIM))
    reference = _one_block_per_coupling(num_layers)
    modules = (nf.nets.MLP, nf.flows.LULinearPermute, nf.flows.ActNorm, nf.flows.AffineConstFlow)
    ours = [m for m in model.modules() if isinstance(m, modules)]
    theirs = [m for m in reference.modules() if isinstance(m, modules)]
    assert [type(m) for m in ours] == [type(m) for m in theirs]
    torch.manual_seed(1)
    with torch.no_grad():
        for mine, other in zip(ours, theirs, strict=True):
            for parameter in mine.parameters():
                parameter.normal_(0, 0.3)
            other.load_state_dict(mine.state_dict())
        reference.q0.load_state_dict(model.q0.state_dict())
        x, z = torch.randn(16, DIM), torch.randn(16, DIM)
        torch.testing.assert_close(model.log_prob(x), reference.log_prob(x))
        torch.testing.assert_close(model.forward(z), reference.forward(z))


def test_an_older_checkpoint_format_asks_for_retraining(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"format": "faceflow-realnvp/2", "state_dict": {}}, path)
    with pytest.raises(ValueError, match="model.pt.*faceflow-realnvp/2.*retrain"):
        load_checkpoint(path)


def test_the_gaussian_floor_mixes_the_flow_with_the_fit_faces_diagonal_gaussian(tmp_path: Path) -> None:
    from scipy.special import logsumexp
    from scipy.stats import norm

    weight = 0.2
    flow = _model()
    mixed = build_realnvp(ModelSpec(DIM, 3, 16, gaussian_weight=weight), np.zeros(DIM), np.ones(DIM))
    mixed.load_state_dict(flow.state_dict())  # the same flow, whitening statistics included
    mixed.eval()
    x = torch.cat([torch.randn(8, DIM), 8 * torch.ones(1, DIM)])  # the last face is unlike any: the floor holds it
    mean, std = np.linspace(-1, 1, DIM), np.linspace(0.5, 2, DIM)
    with torch.no_grad():
        flow_log_p = flow.log_prob(x).double().numpy()
        got = mixed.log_prob(x).double().numpy()
        samples, sample_log_p = mixed.sample(16)
        torch.testing.assert_close(sample_log_p, mixed.log_prob(samples))
    gaussian = norm.logpdf(x.double().numpy(), mean, std).sum(1)
    expected = logsumexp([flow_log_p + np.log1p(-weight), gaussian + np.log(weight)], axis=0)
    assert np.isfinite(flow_log_p).all()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)
    assert got[-1] >= gaussian[-1] + np.log(weight) - 1e-3 > flow_log_p[-1]
    path = tmp_path / "model.pt"
    save_checkpoint(path, checkpoint_payload(mixed.state_dict(), ModelSpec(DIM, 3, 16, gaussian_weight=weight), {}))
    restored, _ = load_checkpoint(path)
    with torch.no_grad():
        torch.testing.assert_close(restored.log_prob(x), mixed.log_prob(x))


def test_an_ensemble_mixes_its_flows_densities_by_weight_under_the_floor_and_samples_from_each(tmp_path: Path) -> None:
    from scipy.special import logsumexp
    from scipy.stats import norm

    from tasks.model import FlowEnsemble

    weight, mean, std = 0.1, np.linspace(-1, 1, DIM), np.linspace(0.5, 2, DIM)
    spec = ModelSpec(DIM, 3, 16, gaussian_weight=weight, members=2, member_weights=(0.7, 0.3))
    flows = [_model(seed) for seed in (0, 1)]
    ensemble = build_realnvp(spec, mean, std)
    assert isinstance(ensemble, FlowEnsemble) and len(ensemble.members) == 2
    for member, flow in zip(ensemble.members, flows):
        member.load_state_dict(flow.state_dict())
    ensemble.eval()
    x = torch.randn(9, DIM)
    with torch.no_grad():
        member_log_p = np.stack([flow.log_prob(x).double().numpy() for flow in flows])
        got = ensemble.log_prob(x).double().numpy()
        walk = ensemble.forward(ensemble.inverse(x[:2]))
        latent = flows[0].inverse(x[:2])
    assert np.abs(member_log_p[0] - member_log_p[1]).min() > 1e-3  # two different flows
    mixture = logsumexp(member_log_p + np.log([[0.7], [0.3]]), axis=0)
    expected = logsumexp([mixture + np.log1p(-weight), norm.logpdf(x.double().numpy(), mean, std).sum(1) + np.log(weight)], axis=0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(walk, x[:2], atol=1e-4, rtol=1e-4)  # the latent walk is the first member's
    torch.testing.assert_close(ensemble.inverse(x[:2]).detach(), latent)
    torch.manual_seed(5)
    with torch.no_grad():
        samples, sample_log_p = ensemble.sample(64)
        torch.testing.assert_close(sample_log_p, ensemble.log_prob(samples))
        assert ensemble.sample(0)[0].shape == (0, DIM)
        ensemble.set_temperature(1e-4)  # every member's base shrinks to its mean: one face per member
        cold, _ = ensemble.sample(400)
        modes = [flow.forward(flow.q0.loc.expand(1, DIM)) for flow in flows]
        ensemble.set_temperature(None)
    drawn = [int((torch.cdist(mode, cold) < 1e-2).sum()) for mode in modes]
    assert sum(drawn) == 400 and 0.6 < drawn[0] / 400 < 0.8  # each member drawn from, by its weight (0.7)
    path = tmp_path / "model.pt"
    save_checkpoint(path, checkpoint_payload(ensemble.state_dict(), spec, {}))
    restored, _ = load_checkpoint(path)
    with torch.no_grad():
        torch.testing.assert_close(restored.log_prob(x), ensemble.log_prob(x))
