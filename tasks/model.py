"""The RealNVP model, built from normflows' blocks, and its self-describing checkpoint."""

from __future__ import annotations

import io
import math
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import normflows as nf
import numpy as np
import torch

from tasks.results import TrainedFlow

CHECKPOINT_FAMILY = "faceflow-realnvp"
CHECKPOINT_FORMAT = f"{CHECKPOINT_FAMILY}/3"  # /3: couplings chained on the split halves, one Split/Merge per run


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network before loading its weights."""

    dim: int
    num_layers: int
    hidden_units: int
    # Weight of the diagonal Gaussian mixed with the flow in log p (FlowWithGaussianFloor); 0 in
    # checkpoints from before it existed, which so keep their exact densities.
    gaussian_weight: float = 0.0
    # Flows mixed in density (FlowEnsemble); 1 in checkpoints from before ensembles, a single flow.
    members: int = 1
    # Each member's share of the density; empty = equal shares (checkpoints from before shares).
    member_weights: tuple[float, ...] = ()


class SwapHalves(nf.flows.Flow):
    """Exchange the two halves of a split tensor, so the next coupling transforms the other half.

    Volume-preserving; the only glue between chained couplings, where ``AffineCouplingBlock``
    would concatenate the halves and split them again around every coupling.
    """

    def forward(self, z: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        first, second = z
        return [second, first], 0

    def inverse(self, z: list[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
        return self.forward(z)


# torch's global generator is one per process, and steps may run in parallel threads (the
# new-people models train beside the main one): whatever draws from it holds this lock.
_GLOBAL_RNG = threading.Lock()


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's global generator seeded with ``seed`` for this block alone, and for no other thread.

    For what cannot take a generator of its own: layer initialisation, normflows' sampling.
    """
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class FlowWithGaussianFloor(nf.NormalizingFlow):
    """normflows' NormalizingFlow whose density is mixed with a diagonal Gaussian of weight ``gaussian_weight``.

    p(x) = (1 - w) p_flow(x) + w N(x; mean, diag(std^2)), with mean and std the frozen whitening
    layer's: the fit faces' per-component statistics, the diagonal Gaussian baseline's model. The
    Gaussian is a floor under the density of faces unlike any the flow was fitted on: on the
    tuning splits' unseen people, w = 0.05 gained 0.8 nats per face over one flow and cost nothing
    on known people's held-out faces; beside an ensemble's short member it gains nothing, so the
    default is 0 (docs/quality.md). Training fits the flow alone (``flow_log_prob``);
    samples and latent walks are the flow's (``sample`` draws from the flow and reports the
    mixture's log p of what it drew). With w = 0 it is exactly the flow.
    """

    def __init__(self, q0: nf.distributions.BaseDistribution, flows: list[nf.flows.Flow], gaussian_weight: float) -> None:
        super().__init__(q0, flows)
        self.gaussian_weight = float(gaussian_weight)

    def flow_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return super().log_prob(x)

    def gaussian_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        whitening = self.flows[-1]
        return torch.distributions.Normal(whitening.t, whitening.s.exp()).log_prob(x).sum(-1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return _with_floor(self, self.flow_log_prob(x), x)

    def sample(self, num_samples: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        x, log_q = super().sample(num_samples)
        return (x, log_q) if self.gaussian_weight == 0.0 else (x, self.log_prob(x))

    def set_temperature(self, temperature: float | None) -> None:
        """Samples drawn from the base scaled by ``temperature`` (normflows' DiagGaussian temperature)."""
        self.q0.temperature = temperature


def _with_floor(model: FlowWithGaussianFloor | FlowEnsemble, flow_log_p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log((1 - w) p_flow(x) + w N(x)) with the model's weight w and Gaussian; the Gaussian is not computed at w = 0."""
    weight = model.gaussian_weight
    if weight == 0.0:
        return flow_log_p
    return torch.logaddexp(flow_log_p + math.log1p(-weight), model.gaussian_log_prob(x) + math.log(weight))


class FlowEnsemble(torch.nn.Module):
    """Flows of the same shape, trained side by side from different initialisations; p mixes their densities.

    p(x) = (1 - w) sum_k a_k p_k(x) + w N(x; mean, diag(std^2)): the members' densities mixed by
    their shares ``weights`` (equal when empty), under the Gaussian floor of FlowWithGaussianFloor.
    Training maximises each member's own likelihood; the last member of the default trains fewer
    epochs (``TrainConfig.member_epochs``), a smoother density that carries faces unlike any fit face
    while the others carry the fit people's. On the tuning splits, trained as confirmation trains
    them, the default's two flows of 350 epochs and one of 100 (shares 0.35, 0.35, 0.3) scored
    0.9 nats per face higher on unseen people and 0.4 higher on known people's held-out faces than
    the previous default's two equal flows of 300 epochs (256 units, floor 0.05; docs/quality.md).
    Samples are drawn from the members by their shares; a latent walk (``inverse``, ``forward``) is
    the first member's: a mixture of densities has no latent space of its own.
    """

    def __init__(
        self, members: list[FlowWithGaussianFloor], gaussian_weight: float, weights: tuple[float, ...] = ()
    ) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.gaussian_weight = float(gaussian_weight)
        shares = torch.tensor(weights or [1.0] * len(members), dtype=torch.float64)
        if len(shares) != len(members) or not bool((shares > 0).all()):
            raise ValueError(f"{len(members)} members need as many positive weights, got {list(weights)}")
        self.register_buffer("log_weights", (shares / shares.sum()).log().float(), persistent=False)

    def gaussian_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.members[0].gaussian_log_prob(x)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        member_log_p = torch.stack([member.flow_log_prob(x) for member in self.members])
        mixture = torch.logsumexp(member_log_p + self.log_weights[:, None], 0)
        return _with_floor(self, mixture, x)

    def sample(self, num_samples: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``num_samples`` faces, each from a member drawn by its weight, in the order drawn; with the ensemble's log p."""
        shares = self.log_weights.exp().cpu()
        chosen = torch.multinomial(shares, num_samples, replacement=True) if num_samples else torch.empty(0, dtype=torch.long)
        x = torch.empty(num_samples, self.members[0].flows[-1].t.shape[-1], device=self.members[0].flows[-1].t.device)
        for index, member in enumerate(self.members):
            taken = chosen == index
            if bool(taken.any()):
                x[taken] = member.sample(int(taken.sum()))[0]
        return x, self.log_prob(x)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return self.members[0].inverse(x)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.members[0].forward(z)

    def set_temperature(self, temperature: float | None) -> None:
        for member in self.members:
            member.set_temperature(temperature)


def members_of(model: FlowWithGaussianFloor | FlowEnsemble) -> list[FlowWithGaussianFloor]:
    """The flows of a model: an ensemble's members, or the one flow."""
    return list(model.members) if isinstance(model, FlowEnsemble) else [model]


def build_realnvp(spec: ModelSpec, mean: np.ndarray, std: np.ndarray) -> FlowWithGaussianFloor | FlowEnsemble:
    """``spec.members`` RealNVP flows (build_flow), one flow alone or a FlowEnsemble of them."""
    if spec.members == 1:
        return build_flow(spec, mean, std, spec.gaussian_weight)
    members = [build_flow(spec, mean, std, 0.0) for _ in range(spec.members)]
    return FlowEnsemble(members, spec.gaussian_weight, spec.member_weights)


def build_flow(spec: ModelSpec, mean: np.ndarray, std: np.ndarray, gaussian_weight: float) -> FlowWithGaussianFloor:
    """RealNVP in PCA coordinates: affine couplings on alternating halves, one mixing layer, Gaussian base.

    normflows orders flows from the base towards the data. The last flow is a frozen affine
    map from whitened to PCA coordinates, so ``log_prob`` is the density of the PCA
    coordinates themselves (the whitening's log-determinant is included) while the
    trainable layers see unit-scale inputs.

    Seen from the data, the first coupling transforms the trailing (low-variance) PCA half given
    the leading half. Then one mixing layer (``_interleaving_mix``; none with a single coupling)
    regroups the components so that each half of the couplings after it holds leading and
    trailing ones alike. Couplings on leading-vs-trailing halves throughout measured 3 to 4 nats
    worse on held-out faces; a random permutation in place of the interleaving one, 0.5 nats
    worse on average and far less repeatable from seed to seed. One ActNorm, between the
    couplings and the whitening, gives the whitened inputs a learned per-component affine map;
    an ActNorm after every coupling measured no better and costs 17% of a step at the lab's
    depth (docs/quality.md, docs/benchmarks.md).

    Couplings are normflows' ``AffineCoupling`` on a pair of halves: a run of them sits between
    one ``Split`` and one ``Merge``, with ``SwapHalves`` alternating which half is transformed.
    That is the same function as one ``AffineCouplingBlock`` per coupling (each a split, the
    coupling and a merge), without concatenating and re-splitting between couplings: 10% of a
    step at the lab's shape (docs/benchmarks.md).
    """
    modes = _split_modes(spec.num_layers)
    flows: list[nf.flows.Flow] = [nf.flows.Split(modes[0])]
    for layer in range(spec.num_layers):
        if layer == spec.num_layers - 1 and layer > 0:  # the mix needs the whole vector
            flows += [nf.flows.Merge(modes[layer - 1]), _interleaving_mix(spec.dim), nf.flows.Split(modes[layer])]
        elif layer > 0:
            flows.append(SwapHalves())
        coupling_net = nf.nets.MLP([spec.dim // 2, spec.hidden_units, spec.hidden_units, spec.dim], init_zeros=True)
        flows.append(nf.flows.AffineCoupling(coupling_net, scale_map="exp"))
    flows += [nf.flows.Merge(modes[-1]), nf.flows.ActNorm(spec.dim), _whitening_inverse(mean, std)]
    return FlowWithGaussianFloor(nf.distributions.DiagGaussian(spec.dim), flows, gaussian_weight)


def _split_modes(num_layers: int) -> list[str]:
    """Each coupling's split, base side first: "channel" transforms the trailing half given the leading one.

    The data-side coupling is "channel" at any depth, and they alternate from there.
    """
    return ["channel" if (num_layers - 1 - layer) % 2 == 0 else "channel_inv" for layer in range(num_layers)]


def _interleaving_mix(dim: int) -> nf.flows.LULinearPermute:
    """normflows' permutation + learned LU linear map, with the permutation fixed to even, then odd, components.

    PCA components are ordered by variance, so taking every other one puts half of every part of
    the spectrum in each half. normflows draws this permutation at random; which draw a seed got
    moved held-out log p by up to 3.6 nats across six seeds, so it is set here. It is a buffer,
    saved with the weights.
    """
    layer = nf.flows.LULinearPermute(dim)
    interleaved = torch.cat([torch.arange(0, dim, 2), torch.arange(1, dim, 2)])
    layer.permutation.load_state_dict({"_permutation": interleaved})
    return layer


def _whitening_inverse(mean: np.ndarray, std: np.ndarray) -> nf.flows.AffineConstFlow:
    """x = w * std + mean, fixed: it carries the data's scale, not something to learn."""
    layer = nf.flows.AffineConstFlow((len(mean),))
    with torch.no_grad():
        layer.s.copy_(torch.as_tensor(np.log(std), dtype=torch.float32)[None])
        layer.t.copy_(torch.as_tensor(mean, dtype=torch.float32)[None])
    layer.requires_grad_(False)
    return layer


def trainable_parameters(model: nf.NormalizingFlow) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def rebuild_realnvp(spec: ModelSpec, state_dict: dict[str, torch.Tensor], device: str = "cpu") -> nf.NormalizingFlow:
    """The flow ``spec`` describes, carrying ``state_dict``'s weights, in eval mode.

    The whitening statistics are part of the state, so placeholders suffice to build it.
    """
    ones = np.ones(spec.dim, dtype=np.float32)
    model = build_realnvp(spec, mean=ones * 0, std=ones)
    model.load_state_dict(state_dict)
    return model.to(device).eval()


def checkpoint_payload(
    state_dict: dict[str, torch.Tensor], spec: ModelSpec, config: dict[str, Any]
) -> dict[str, Any]:
    """Weights + the spec and config that built them: enough to rebuild the model alone."""
    return {
        "format": CHECKPOINT_FORMAT,
        "spec": asdict(spec),
        "config": config,
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
    }


def checkpoint_bytes(payload: dict[str, Any]) -> bytes:
    """A checkpoint payload as model.pt's bytes."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """torch.save to a temporary sibling, then rename: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


class CheckpointError(ValueError):
    """A model.pt that cannot be loaded as a faceflow model."""


def _read_payload(source: Path | bytes, name: str, device: str) -> dict[str, Any]:
    if isinstance(source, Path) and not source.is_file():
        raise CheckpointError(f"checkpoint {name} does not exist or is not a file")
    try:
        # weights_only: a checkpoint is data, never code to run (torch refuses arbitrary pickles).
        payload = torch.load(io.BytesIO(source) if isinstance(source, bytes) else source, map_location=device, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for bad files
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"checkpoint {name} is not a readable torch checkpoint ({reason})") from None
    found = payload.get("format") if isinstance(payload, dict) else None
    if found != CHECKPOINT_FORMAT:
        if isinstance(found, str) and found.startswith(f"{CHECKPOINT_FAMILY}/"):
            raise CheckpointError(
                f"checkpoint {name} holds a faceflow model of format {found!r}; this version reads {CHECKPOINT_FORMAT!r}:"
                " retrain it with `faceflow run`"
            )
        raise CheckpointError(f"checkpoint {name} is not a faceflow checkpoint (format {found!r})")
    missing = {"spec", "config", "state_dict"} - set(payload)
    if missing:
        raise CheckpointError(f"checkpoint {name} lacks {', '.join(sorted(missing))}")
    return payload


def _model_from(source: Path | bytes, name: str, device: str) -> tuple[nf.NormalizingFlow, dict[str, Any]]:
    payload = _read_payload(source, name, device)
    broken = [key for key, value in payload["state_dict"].items() if not bool(torch.isfinite(value).all())]
    if broken:
        raise CheckpointError(f"checkpoint {name} holds non-finite weights ({', '.join(broken[:3])}); retrain the model")
    try:
        model = rebuild_realnvp(ModelSpec(**payload["spec"]), payload["state_dict"], device)
    except (TypeError, ValueError, RuntimeError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"checkpoint {name} does not match the model it describes ({reason})") from None
    return model, payload["config"]


def load_checkpoint(path: Path, device: str = "cpu") -> tuple[nf.NormalizingFlow, dict[str, Any]]:
    """Rebuild a trained flow from a checkpoint alone; returns (model in eval mode, its config).

    Every failure names the file: unreadable or truncated, another format, missing parts,
    weights that do not fit the recorded shape, or non-finite weights.
    """
    return _model_from(Path(path), repr(str(path)), device)


def trained_model(trained: TrainedFlow, device: str = "cpu") -> nf.NormalizingFlow:
    """The model a training step kept, in eval mode."""
    return _model_from(trained.checkpoint, f"of training {trained.key}", device)[0]
