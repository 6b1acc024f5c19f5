"""The RealNVP model, built from normflows' blocks, and its self-describing checkpoint."""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import normflows as nf
import numpy as np
import torch

CHECKPOINT_FORMAT = "faceflow-realnvp/2"  # /2: one LULinearPermute, one ActNorm


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network before loading its weights."""

    dim: int
    num_layers: int
    hidden_units: int


def build_realnvp(spec: ModelSpec, mean: np.ndarray, std: np.ndarray) -> nf.NormalizingFlow:
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
    """
    half = spec.dim // 2
    flows: list[nf.flows.Flow] = []
    for layer in range(spec.num_layers):
        if layer == spec.num_layers - 1 and layer > 0:
            flows.append(_interleaving_mix(spec.dim))
        coupling_net = nf.nets.MLP([half, spec.hidden_units, spec.hidden_units, spec.dim], init_zeros=True)
        # Alternating which half conditions the other does what a swap Permute between
        # blocks would, without the extra slicing and concatenation on every step.
        split_mode = "channel" if (spec.num_layers - 1 - layer) % 2 == 0 else "channel_inv"
        flows.append(nf.flows.AffineCouplingBlock(coupling_net, scale_map="exp", split_mode=split_mode))
    flows.append(nf.flows.ActNorm(spec.dim))
    flows.append(_whitening_inverse(mean, std))
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(spec.dim), flows)


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


def load_checkpoint(path: Path, device: str = "cpu") -> tuple[nf.NormalizingFlow, dict[str, Any]]:
    """Rebuild a trained flow from a checkpoint alone; returns (model in eval mode, its config)."""
    payload = torch.load(path, map_location=device, weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a faceflow checkpoint (format {payload.get('format')!r})")
    return rebuild_realnvp(ModelSpec(**payload["spec"]), payload["state_dict"], device), payload["config"]


def resolve_device(requested: str) -> torch.device:
    """'auto' means CUDA when present; asking for CUDA without one is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(requested)
