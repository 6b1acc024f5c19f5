"""The one place that reads faceflow's environment variables."""

from __future__ import annotations

import os
from pathlib import Path

DATA_FILE_VARIABLE = "FACEFLOW_DATA_FILE"
API_URL_VARIABLE = "PREFECT_API_URL"
HOME_VARIABLE = "PREFECT_HOME"
SERVER_START_TIMEOUT_VARIABLE = "FACEFLOW_SERVER_START_TIMEOUT"
# A loaded 2-core machine has taken over 20 s (Prefect's own limit) to start a server, and
# creating its database on first use takes longer still.
DEFAULT_SERVER_START_TIMEOUT = 180.0


class SettingError(ValueError):
    """An environment variable holds a value faceflow cannot use."""


def data_file_from_environment() -> Path | None:
    """The olivettifaces.mat named by FACEFLOW_DATA_FILE, if set."""
    value = os.environ.get(DATA_FILE_VARIABLE, "").strip()
    return Path(value) if value else None


def api_url_from_environment() -> str | None:
    """PREFECT_API_URL, if set: the Prefect server every faceflow command then uses."""
    return os.environ.get(API_URL_VARIABLE, "").strip() or None


def prefect_home() -> Path:
    """PREFECT_HOME as Prefect resolves it: the variable, else ~/.prefect."""
    return Path(os.environ.get(HOME_VARIABLE, "").strip() or "~/.prefect").expanduser().resolve()


def server_start_timeout() -> float:
    """Seconds to wait for a Prefect server to answer (FACEFLOW_SERVER_START_TIMEOUT, default 180)."""
    value = os.environ.get(SERVER_START_TIMEOUT_VARIABLE, "").strip()
    if not value:
        return DEFAULT_SERVER_START_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise SettingError(f"{SERVER_START_TIMEOUT_VARIABLE}={value!r}: expected a number of seconds > 0")
    return seconds
