"""Markdown for the artifacts that list many models: the retraining leaderboard and a sweep's ranking.

Each is a narrow table of numbers, short enough to fit the UI's artifact panel beside its side
panel (V2) and in V1, and below it a list with the free text (what each model is, why it was
promoted or not, its run folder, its error), which wraps like any paragraph.
"""

from __future__ import annotations

import datetime
import re

import pandas as pd

from artifacts.report import format_nats, markdown_table

NONE = "–"  # an absent number: a failed challenger or configuration, or no champion to compare with


def _number(value: object) -> str:
    return format_nats(value) if isinstance(value, float) else (NONE if value is None else str(value))


def _one_line(text: object) -> str:
    """Free text as one line: a newline (say, in an error) would end the markdown list item."""
    return re.sub(r"\s+", " ", str(text)).strip()


def short_time(iso: str) -> str:
    """An ISO time as minutes in UTC, "2026-11-30 11:23": the seconds and offset widen the table for nothing."""
    moment = datetime.datetime.fromisoformat(iso)
    if moment.tzinfo is not None:
        moment = moment.astimezone(datetime.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M")


def leaderboard_markdown(rows: list[dict[str, object]]) -> str:
    """Every challenger of ``rows`` (models/leaderboard.json, oldest first) newest first, numbered from the oldest."""
    numbered = list(enumerate(rows, start=1))[::-1]
    table = markdown_table(pd.DataFrame([{
        "#": str(number), "time (UTC)": short_time(str(row["time"])), "seed": str(row["seed"]),
        "faces": _number(row.get("faces judged")), "challenger": _number(row.get("validation pixels")),
        "champion": _number(row.get("champion pixels")), "promoted": "yes" if row.get("promoted") else "no",
    } for number, row in numbered], columns=["#", "time (UTC)", "seed", "faces", "challenger", "champion", "promoted"]))
    details = "\n".join(
        f"- **#{number}** {_one_line(row['challenger'])}: {_one_line(row['why']) or NONE}"
        + (f"; run folder `{row['run folder']}`" if row.get("run folder") else "")
        for number, row in numbered
    )
    return (
        "### Leaderboard: every challenger, newest first\n\n"
        "Mean log p of the pixels (image space, nats per face) of the *faces* judged: the challenger's validation "
        "faces that the champion was not fitted on; *challenger* had to beat *champion* on them by the margin. "
        "Each run's PCA-space and held-out figures are in models/leaderboard.json and its report.\n\n"
        f"{table}\n\n{details}\n"
    )


def sweep_markdown(ranked: list[dict[str, object]]) -> str:
    """A sweep's configurations, best validation log p first; what each configuration set, and any error, below."""
    table = markdown_table(pd.DataFrame([{
        "rank": str(row["rank"]), "configuration": str(row["configuration"]),
        "validation": _number(row["validation log p"]), "held-out": _number(row["held-out log p"]),
        "train seconds": _number(row["train seconds"]),
    } for row in ranked], columns=["rank", "configuration", "validation", "held-out", "train seconds"]))
    details = "\n".join(
        f"- **configuration {row['configuration']}**: {_one_line(row['values'])}"
        + (f"; **failed**: {_one_line(row['error'])}" if row.get("error") else "")
        for row in ranked
    )
    return (
        "### Sweep: configurations ranked by validation log p\n\n"
        "Log p in nats per face; held-out log p is shown beside it and never ranks anything.\n\n"
        f"{table}\n\n{details}\n"
    )
