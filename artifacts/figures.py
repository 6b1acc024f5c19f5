"""The report's figures. Each function returns a Figure; one place (the report) writes them."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure


def montage(images: np.ndarray, columns: int, gap: int = 2) -> np.ndarray:
    """Tile images into one array, white gaps between them: one imshow instead of one axis each."""
    rows = int(np.ceil(len(images) / columns))
    height, width = images.shape[1:]
    canvas = np.ones((rows * (height + gap) - gap, columns * (width + gap) - gap), dtype=np.float32)
    for position, image in enumerate(images):
        top, left = (position // columns) * (height + gap), (position % columns) * (width + gap)
        canvas[top : top + height, left : left + width] = image
    return canvas


def _image_grid(images: np.ndarray, columns: int, titles: list[str] | None = None, width: float = 1.3) -> Figure:
    rows = int(np.ceil(len(images) / columns))
    figure = Figure(figsize=(columns * width, rows * width * (1.15 if titles else 1.0) + 0.4))
    axis = figure.subplots()
    gap = 14 if titles else 2  # room for a title above each row
    axis.imshow(montage(images, columns, gap), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    axis.axis("off")
    height, width = images.shape[1] + gap, images.shape[2] + gap
    for position, title in enumerate(titles or []):
        axis.text((position % columns) * width + (width - gap) / 2, (position // columns) * height - 1, title,
                  ha="center", va="bottom", fontsize=7)
    figure.tight_layout(pad=0.3)
    return figure


def sample_grid(images: np.ndarray, nearest_distance: np.ndarray, temperature: float) -> Figure:
    """Generated faces, each titled with its RMS distance to the nearest training face."""
    figure = _image_grid(images, columns=min(8, len(images)), titles=[f"d={d:.3f}" for d in nearest_distance])
    figure.suptitle(f"Samples at T={temperature:g} (d: distance to nearest training face)", fontsize=9)
    figure.tight_layout(pad=0.3)
    return figure


def face_grid(images: np.ndarray, title: str) -> Figure:
    """Faces in rows of up to eight, under one title."""
    figure = _image_grid(images, columns=min(8, len(images)))
    figure.suptitle(title, fontsize=9)
    figure.tight_layout(pad=0.3)
    return figure


def interpolation_strip(images: np.ndarray, method: str, index_a: int, index_b: int) -> Figure:
    figure = _image_grid(images, columns=len(images), width=1.2)
    figure.suptitle(f"{method} interpolation in latent space: face {index_a} -> face {index_b}", fontsize=9)
    figure.tight_layout(pad=0.3)
    return figure


def explained_variance(cumulative: np.ndarray, target: float, from_target: int, chosen: int) -> Figure:
    figure = Figure(figsize=(5.5, 3.2))
    axis = figure.subplots()
    axis.plot(np.arange(1, len(cumulative) + 1), cumulative, color="tab:blue")
    axis.axhline(target, color="grey", linestyle=":", label=f"target {target:.0%}")
    axis.axvline(from_target, color="tab:orange", linestyle="--", label=f"{from_target} components reach it")
    axis.axvline(chosen, color="tab:green", label=f"{chosen} used")
    axis.set(xlabel="components", ylabel="cumulative explained variance", ylim=(0, 1.01))
    axis.set_xscale("log")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def loss_curve(train_loss: Sequence[float], validation_log_prob: Sequence[float], best_epoch: int | None) -> Figure:
    """Training negative log-likelihood (noisy inputs) and validation log p per epoch (NaN: not validated)."""
    figure = Figure(figsize=(6, 3.2))
    axis = figure.subplots()
    epochs = np.arange(1, len(train_loss) + 1)
    axis.plot(epochs, train_loss, label="train NLL (with input noise)", color="tab:blue")
    validation = np.asarray(validation_log_prob, dtype=np.float64)
    validated = np.isfinite(validation)
    if validated.any():
        axis.plot(epochs[validated], -validation[validated], label="validation NLL", color="tab:orange")
    if best_epoch is not None:
        axis.axvline(best_epoch, color="grey", linestyle=":", label=f"kept: epoch {best_epoch}")
    axis.set(xlabel="epoch", ylabel="nats per face")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def log_prob_histogram(log_probs: dict[str, np.ndarray]) -> Figure:
    """Distribution of log p per group; non-finite values are counted in the legend, not plotted."""
    figure = Figure(figsize=(6, 3.2))
    axis = figure.subplots()
    finite_all = np.concatenate([v[np.isfinite(v)] for v in log_probs.values()] or [np.zeros(1)])
    bins = np.linspace(finite_all.min(), finite_all.max(), 40) if finite_all.size > 1 else 10
    for name, values in log_probs.items():
        finite = values[np.isfinite(values)]
        dropped = len(values) - len(finite)
        label = f"{name} (n={len(values)}" + (f", {dropped} non-finite)" if dropped else ")")
        axis.hist(finite, bins=bins, alpha=0.5, density=True, label=label)
    axis.set(xlabel="log p (nats per face, PCA coordinates)", ylabel="density")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def images_per_person(counts: dict[str, int], new_people: Sequence[str]) -> Figure:
    """Images per person of a face-store version, people new in it in another colour."""
    people = sorted(counts)
    figure = Figure(figsize=(min(12.0, 2.0 + 0.18 * len(people)), 3.0))
    axis = figure.subplots()
    fresh = set(new_people)
    axis.bar(range(len(people)), [counts[p] for p in people],
             color=["tab:orange" if p in fresh else "tab:blue" for p in people])
    axis.set(xlabel=f"person ({len(people)}; new ones in orange)", ylabel="images", xlim=(-0.8, len(people) - 0.2))
    axis.set_xticks(range(len(people)), people, rotation=90, fontsize=5 if len(people) > 40 else 7)
    figure.tight_layout()
    return figure


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()

