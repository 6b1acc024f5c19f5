"""The dataset card of a face-store version: who is in it, how many images each, what it added."""

from __future__ import annotations

import numpy as np

from artifacts import figures
from artifacts.markdown import data_uri


def card_markdown(version: dict[str, object], previous: dict[str, object] | None, counts: dict[str, int],
                  new_people: list[str], new_images: np.ndarray, notes: list[str]) -> str:
    """Markdown for the Prefect UI: counts, images per person (a figure), what was added, a montage of the new faces."""
    added = int(version["added"])
    lines = [
        f"### Faces version {version['number']} (`{str(version['id'])[:12]}`)",
        f"{version['images']} images of {version['people']} people; {added} added "
        + (f"to version {previous['number']} (`{str(previous['id'])[:12]}`)" if previous else "(the first version)")
        + f", {version['duplicates']} duplicates skipped.",
    ]
    if new_people:
        lines.append(f"New people ({len(new_people)}): " + ", ".join(new_people) + ".")
    if notes:
        lines.append(f"{len(notes)} files converted or resized on the way in (listed in the run's logs).")
    lines.append(f"![images per person]({data_uri(figures.png_bytes(figures.images_per_person(counts, new_people)))})")
    if len(new_images):
        shown = f"the first {len(new_images)} of {added}" if len(new_images) < added else f"all {added}"
        montage = figures.face_grid(new_images, f"New faces in version {version['number']} ({shown})")
        lines.append(f"![new faces]({data_uri(figures.png_bytes(montage))})")
    return "\n\n".join(lines) + "\n"
