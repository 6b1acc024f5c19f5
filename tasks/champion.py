"""The champion: the model in use, replaced only by a challenger that is better on validation faces.

The champion lives in ``models/champion``, a link to ``models/champion-<run>-<seed>-<id>/`` holding
model.pt, pca.npz, split.json, metrics.json and champion.json (this record). A promotion
(tasks/registry.py) writes a new folder whole under a name no other promotion uses, then swaps
the link in one rename; a champion folder is never changed once written. A reader resolves the
link once (``resolve_champion``) and reads every file from the folder it named, so it sees one
champion whole even when a promotion swaps the link between its reads. Held-out faces never
decide anything here: they stay for the report, so the champion's held-out figure remains an
honest estimate.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from artifacts.tables import json_safe
from artifacts.atomic import write_file


CHAMPION_FILES = ("model.pt", "pca.npz", "split.json", "metrics.json")
RECORD = "champion.json"
LEADERBOARD = "leaderboard.json"
CHAMPION_VARIABLE = "faceflow-champion"  # the Prefect Variable that mirrors the champion's record
# Test-only pauses: with FACEFLOW_PAUSE_DIR a folder and FACEFLOW_PAUSE_AT naming the pauses (comma-separated),
# ``pause_point(name)`` writes ``<name>.<pid>.reached`` there and waits for ``<name>.<pid>.go``, so a test can
# force an interleaving (a promotion between a reader's two reads).
PAUSE_VARIABLE = "FACEFLOW_PAUSE_DIR"
PAUSE_AT_VARIABLE = "FACEFLOW_PAUSE_AT"


class ChampionError(ValueError):
    """The champion, or input meant for it, cannot be used."""


@dataclass(frozen=True)
class ChampionRecord:
    """Who the champion is and how good: mirrored in the Prefect Variable ``faceflow-champion``."""

    run_folder: str
    flow_run_id: str
    seed: int
    config_digest: str
    validation_log_prob: float
    heldout_log_prob: float
    promoted_at: str
    metrics: dict[str, float]
    faces_version: str = ""  # the face store version id it was fitted on ("" for champions before versions)

    def to_json(self) -> dict[str, object]:
        return {k: json_safe(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class ChampionFolder:
    """The champion as one read: the folder the link named when it was resolved, and the record in that folder."""

    path: Path
    record: ChampionRecord

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(challenger_validation: float, champion_validation: float | None, margin: float, faces: int = 1) -> Decision:
    """Promote when there is no champion, or the challenger's validation log p beats the champion's by ``margin``.

    Both figures are of the same ``faces`` validation faces, none of which either model was fitted on.
    """
    if faces == 0:
        return Decision(False, "every validation face of the challenger was a fit face of the champion: nothing to judge on")
    if not math.isfinite(challenger_validation):
        return Decision(False, f"challenger's validation log p is {challenger_validation}: not a model to use")
    if champion_validation is None:
        return Decision(True, "first champion")
    gain = challenger_validation - champion_validation
    if gain > margin:
        return Decision(True, f"validation log p {challenger_validation:.2f} beats the champion's {champion_validation:.2f} by {gain:.2f} > {margin:g} nats")
    return Decision(
        False, f"validation log p {challenger_validation:.2f} against the champion's {champion_validation:.2f}: "
        f"{gain:+.2f}, not more than the {margin:g}-nat margin",
    )


def unseen_by_champion(champion: Path, validation: list[int], validation_ids: Sequence[str] = ()) -> list[int]:
    """The challenger's validation faces (indices, and their image ids) the champion in folder ``champion`` was not
    fitted on (its split.json).

    By id when both sides have them: the champion may have been fitted on another faces version,
    whose indices do not index this one's images. By index for a champion from before versions.
    """
    split = json.loads((champion / "split.json").read_text())
    if validation_ids and "fit_ids" in split:
        fitted_ids = set(split["fit_ids"])
        return [index for index, identity in zip(validation, validation_ids, strict=True) if identity not in fitted_ids]
    fitted = set(split["fit"])
    return [index for index in validation if index not in fitted]


def validation_image_log_prob(run_folder: Path, judged: list[int]) -> float:
    """A run's mean image-space log p (nats per face) of its validation faces ``judged``, from its scores.csv."""
    import pandas as pd

    scores = pd.read_csv(run_folder / "scores.csv")
    found = scores[(scores["part"] == "validation") & scores["index"].isin(judged)]
    if len(found) != len(judged):
        raise ChampionError(f"{run_folder / 'scores.csv'} lacks validation faces {sorted(set(judged) - set(found['index']))}")
    return float(found["image_log_prob"].mean())


def champion_path(models_dir: Path) -> Path:
    return models_dir / "champion"


def resolve_champion(models_dir: Path) -> ChampionFolder | None:
    """The champion the link names now, resolved once: read every file of it from ``.path``; None when there is none.

    A link whose folder holds no record (a purged champion) names no champion.
    """
    try:
        target = os.readlink(champion_path(models_dir))
    except (FileNotFoundError, NotADirectoryError):
        return None
    folder = models_dir / target
    try:
        record = json.loads((folder / RECORD).read_text())
    except FileNotFoundError:
        return None
    return ChampionFolder(folder, ChampionRecord(**record))


def read_champion(models_dir: Path) -> ChampionRecord | None:
    """The current champion's record, or None before the first promotion."""
    champion = resolve_champion(models_dir)
    return champion.record if champion else None


def append_leaderboard(models_dir: Path, row: dict[str, object]) -> list[dict[str, object]]:
    """Add one challenger's row to models/leaderboard.json (written whole, atomically); returns every row."""
    models_dir.mkdir(parents=True, exist_ok=True)
    path = models_dir / LEADERBOARD
    # One writer at a time (retrainings triggered by new faces can finish together): read, append
    # and replace under an exclusive lock, through a temporary file of this process's own.
    with open(models_dir / f"{LEADERBOARD}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(path.read_text()) if path.is_file() else []
        pause_point("leaderboard-read")  # test-only: a second writer waits on the lock here, never reads stale rows
        rows.append(row)
        write_file(path, json.dumps(rows, indent=1).encode())
    return rows


def pause_point(name: str) -> None:
    """Test-only: with FACEFLOW_PAUSE_DIR set, say ``name`` was reached (by this process) and wait to be let go on."""
    folder = os.environ.get(PAUSE_VARIABLE)
    if not folder or name not in os.environ.get(PAUSE_AT_VARIABLE, "").split(","):
        return
    reached, go = Path(folder) / f"{name}.{os.getpid()}.reached", Path(folder) / f"{name}.{os.getpid()}.go"
    reached.write_text(str(os.getpid()))
    while not go.exists():  # a test's own hook: it polls a file the test writes
        time.sleep(0.05)
    reached.unlink(missing_ok=True)  # first: once the test sees its go taken, this pause's reached is gone
    go.unlink()


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
