"""The lab's write-up as markdown, with conclusions drawn from the run's own numbers."""

from __future__ import annotations

import math

import pandas as pd

FIGURES = {
    "samples": "samples.png",
    "variance": "explained_variance.png",
    "loss": "loss_curve.png",
    "log_prob": "log_prob_histogram.png",
    "interpolation": "interpolation.png",
}

FIGURE_CAPTIONS = {
    "samples": "Generated faces",
    "variance": "Cumulative explained variance of the PCA",
    "loss": "Training loss and validation log-likelihood",
    "log_prob": "log p of real and generated faces",
    "interpolation": "Interpolation between two people",
}


def format_nats(value: float) -> str:
    return "-inf" if value == -math.inf else ("nan" if math.isnan(value) else f"{value:.2f}")


# Two narrow tables rather than one wide one, so each fits the UI's artifact panel.
PCA_SPACE_COLUMNS = ("method", "heldout_log_prob", "new_people_log_prob", "bits_per_dim", "train_seconds", "detail")
IMAGE_SPACE_COLUMNS = ("method", "heldout_image_log_prob", "new_people_image_log_prob", "bits_per_pixel")


def comparison_table(metrics: dict[str, float], baselines: pd.DataFrame) -> pd.DataFrame:
    """The flow beside each baseline in PCA coordinates: held-out and new-people log p, bits/dim, training seconds."""
    flow_row = {
        "method": "faceflow RealNVP",
        "heldout_log_prob": metrics["heldout_log_prob"],
        "new_people_log_prob": metrics["new_people_log_prob"],
        "bits_per_dim": metrics["heldout_bits_per_dim"],
        "train_seconds": metrics["train_seconds"],
        "detail": f"best epoch {int(metrics['best_epoch'])} of {int(metrics['epochs'])}",
    }
    return _flow_above(flow_row, baselines, PCA_SPACE_COLUMNS)


def image_comparison_table(metrics: dict[str, float], baselines: pd.DataFrame) -> pd.DataFrame:
    """The same models' log p of the pixels (nats per face) and bits per pixel: comparable across PCA bases."""
    flow_row = {
        "method": "faceflow RealNVP",
        "heldout_image_log_prob": metrics["heldout_image_log_prob"],
        "new_people_image_log_prob": metrics["new_people_image_log_prob"],
        "bits_per_pixel": metrics["heldout_image_bits_per_pixel"],
    }
    return _flow_above(flow_row, baselines, IMAGE_SPACE_COLUMNS)


def generalisation_table(metrics: dict[str, float]) -> pd.DataFrame:
    """The flow's log p of the faces it was fitted on, of new images of those people, and of new people.

    Side by side, so the memorisation gap (fit - held-out) and the gap to people it never saw
    (held-out - new people) can be read off, in PCA coordinates and in pixels.
    """
    parts = [("fit faces", "fit"), ("held-out images of known people", "heldout"), ("every image of new people", "new_people")]
    fit, fit_image = metrics["fit_log_prob"], metrics["fit_image_log_prob"]
    return pd.DataFrame([
        {"faces": label, "log_prob": metrics[f"{key}_log_prob"], "below_fit": fit - metrics[f"{key}_log_prob"],
         "image_log_prob": metrics[f"{key}_image_log_prob"], "image_below_fit": fit_image - metrics[f"{key}_image_log_prob"]}
        for label, key in parts
    ])


def _generalisation_line(metrics: dict[str, float]) -> str:
    fit, heldout, new = (metrics[f"{key}_log_prob"] for key in ("fit", "heldout", "new_people"))
    return (
        f"Generalisation: the flow scores its fit faces {format_nats(fit)}, new images of the same people "
        f"{format_nats(heldout)} and people it never saw {format_nats(new)} nats per face: "
        f"{format_nats(fit - heldout)} nats of memorisation (fit - held-out), then {format_nats(heldout - new)} more "
        "to new people (held-out - new people)."
    )


def _flow_above(flow_row: dict[str, object], baselines: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    """The flow's row, then the baselines' ``columns`` (those they have)."""
    return pd.concat([pd.DataFrame([flow_row]), baselines[[name for name in columns if name in baselines.columns]]], ignore_index=True)


def conclusions(metrics: dict[str, float], baselines: pd.DataFrame) -> list[str]:
    """Sentences that follow from this run's numbers, whatever they turn out to be."""
    flow = metrics["heldout_log_prob"]
    lines = [
        f"The flow assigns held-out faces a mean log p of {format_nats(flow)} nats "
        f"({metrics['heldout_bits_per_dim']:.3f} bits/dim) in {int(metrics['n_components'])} PCA dimensions."
    ]
    for row in baselines.itertuples():
        gap = flow - row.heldout_log_prob
        verdict = "beats" if gap > 0 else "falls short of"
        lines.append(
            f"It {verdict} the {row.method} ({format_nats(row.heldout_log_prob)}) by {format_nats(abs(gap))} nats per face."
            if math.isfinite(gap)
            else f"The comparison with the {row.method} is undefined: a log p is not finite."
        )
    lines.append(_new_people_line(metrics, baselines))
    lines.append(_generalisation_line(metrics))
    if "heldout_image_log_prob" in metrics:
        lines.append(_image_space_line(metrics))
    if "lab recipe" not in set(baselines["method"]):
        lines.append(
            "The lab's original recipe is not re-trained in a default run (about 15 s more); "
            "run with --include-lab-recipe to add it, or see docs/quality.md."
        )
    if metrics["heldout_nonfinite"]:
        lines.append(f"{int(metrics['heldout_nonfinite'])} held-out faces have a non-finite log p.")
    ratio = metrics["sample_nearest_distance_median"] / metrics["heldout_nearest_distance_median"]
    share = metrics["samples_closer_than_any_heldout"]
    if share >= 0.5:
        memorised = f"{share:.0%} of samples are closer to a training face than any held-out face is: they look memorised."
    else:
        memorised = (
            f"{share:.0%} of samples are closer to a training face than any held-out face is, "
            "so the samples are not copies of training faces."
        )
    lines.append(
        f"Measured between PCA reconstructions (a sample is one), samples lie at a median RMS pixel distance of "
        f"{metrics['sample_nearest_distance_median']:.3f} from their nearest training face, {ratio:.2f}x the "
        f"held-out faces' {metrics['heldout_nearest_distance_median']:.3f}. " + memorised
    )
    if metrics["nonfinite_steps"]:
        lines.append(f"{int(metrics['nonfinite_steps'])} optimisation steps had a non-finite loss and were skipped.")
    return lines


def _new_people_line(metrics: dict[str, float], baselines: pd.DataFrame) -> str:
    """The flow on people it never saw, against the best baseline there and the known people's figure."""
    flow = metrics["new_people_log_prob"]
    people, folds = int(metrics["new_people_count"]), int(metrics["new_people_folds"])
    line = (
        f"On {people} people left out of PCA, flow and baselines altogether ({folds} fold{'s' if folds > 1 else ''}, "
        f"every image of each), the flow scores {format_nats(flow)} nats per face, against "
        f"{format_nats(metrics['heldout_log_prob'])} for new images of the people it was fitted on."
    )
    scored = baselines.dropna(subset=["new_people_log_prob"])
    if scored.empty:
        return line
    best = scored.loc[scored["new_people_log_prob"].idxmax()]
    gap = flow - best["new_people_log_prob"]
    if not math.isfinite(gap):
        return line + f" The comparison with the {best['method']} there is undefined: a log p is not finite."
    verdict = "beats" if gap > 0 else "falls short of"
    return line + (
        f" There it {verdict} the best baseline, the {best['method']} ({format_nats(best['new_people_log_prob'])}), "
        f"by {format_nats(abs(gap))} nats per face."
    )


def _image_space_line(metrics: dict[str, float]) -> str:
    """The flow's log p of the pixels: the figure that holds across PCA bases."""
    line = (
        f"In image space (the 4096 pixels: PCA-space log p plus the residual's, an isotropic Gaussian of variance "
        f"{metrics['pca_residual_variance']:.3g} per discarded dimension), the flow scores "
        f"{format_nats(metrics['heldout_image_log_prob'])} nats per held-out face "
        f"({metrics['heldout_image_bits_per_pixel']:.3f} bits/pixel) and "
        f"{format_nats(metrics['new_people_image_log_prob'])} per new person's face."
    )
    return line + (
        " On one PCA the residual term is the same for every model, so the gaps between models are those of "
        "PCA space; what the image-space figures add is a scale shared by models of different PCA bases, "
        "component counts or data."
    )


def report_markdown(
    metrics: dict[str, float],
    comparison: pd.DataFrame,
    findings: list[str],
    image_links: dict[str, str],
    run_name: str,
    image_comparison: pd.DataFrame | None = None,
) -> str:
    """The full report; ``image_links`` maps figure name to a file name or a data URI.

    The tables hold only numbers, so they stay narrow in the UI's artifact panel; what each model
    is (its free-text ``detail``) is listed below them. ``image_comparison`` (image-space log p)
    is a second table beside the PCA-space one.
    """
    table = markdown_table(comparison.drop(columns="detail"))
    if image_comparison is not None:
        table += (
            "\n\nThe same models' log p of the **pixels** (nats per face; bits per pixel of the held-out faces), "
            "comparable across PCA bases and component counts:\n\n"
            # Models on one PCA differ by thousandths of a bit per pixel: four decimals show it.
            + markdown_table(image_comparison, decimals={"bits_per_pixel": 4})
        )
    details = "\n".join(f"- **{row.method}**: {row.detail}" for row in comparison.itertuples() if row.detail)
    sections = [
        f"# faceflow report: {run_name}",
        "Olivetti faces → PCA → RealNVP (normflows). All log-densities are in nats per face "
        "on faces the models never saw: `heldout_log_prob` on held-out images of the "
        "people the models were fitted on, `new_people_log_prob` on every image of people left out of PCA, "
        "flow and baselines altogether. The first table is in PCA coordinates; the second (`image`) "
        "is of the 4096 pixels, the PCA residual scored as an isotropic Gaussian (probabilistic PCA).",
        "## Model quality\n\n" + table + ("\n\n" + details if details else ""),
        "## Generalisation\n\nThe flow's log p (nats per face) of the faces it was fitted on, of new images of "
        "those people, and of every image of people left out of PCA and flow; `below_fit` is how far each lies "
        "below the fit faces (fit - held-out is the memorisation gap):\n\n" + markdown_table(generalisation_table(metrics)),
        f"![{FIGURE_CAPTIONS['samples']}]({image_links['samples']})",
        f"![{FIGURE_CAPTIONS['interpolation']}]({image_links['interpolation']})",
        f"![{FIGURE_CAPTIONS['loss']}]({image_links['loss']})",
        f"![{FIGURE_CAPTIONS['log_prob']}]({image_links['log_prob']})",
        f"![{FIGURE_CAPTIONS['variance']}]({image_links['variance']})",
        "## Conclusions\n\n" + "\n".join(f"- {line}" for line in findings),
    ]
    return "\n\n".join(sections) + "\n"


def markdown_table(frame: pd.DataFrame, decimals: dict[str, int] | None = None) -> str:
    """A GitHub-style table; floats with two decimals (or ``decimals[column]``), -inf spelled out."""
    def cell(value: object, places: int) -> str:
        if isinstance(value, float) and math.isnan(value):
            return "n/a"
        if isinstance(value, float) and math.isfinite(value):
            return f"{value:.{places}f}"
        return format_nats(value) if isinstance(value, float) else str(value)
    places = [(decimals or {}).get(name, 2) for name in frame.columns]
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    rows = [
        "| " + " | ".join(cell(v, p) for v, p in zip(row, places, strict=True)) + " |"
        for row in frame.itertuples(index=False)
    ]
    return "\n".join([header, rule, *rows])
