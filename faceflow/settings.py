"""The one place that reads faceflow's environment variables."""

from __future__ import annotations

import os
from pathlib import Path

DATA_FILE_VARIABLE = "FACEFLOW_DATA_FILE"


def data_file_from_environment() -> Path | None:
    """The olivettifaces.mat named by FACEFLOW_DATA_FILE, if set."""
    value = os.environ.get(DATA_FILE_VARIABLE, "").strip()
    return Path(value) if value else None
