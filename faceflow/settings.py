"""The one place that reads faceflow's environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

DATA_FILE_VARIABLE = "FACEFLOW_DATA_FILE"
API_URL_VARIABLE = "PREFECT_API_URL"
HOME_VARIABLE = "PREFECT_HOME"
SERVER_START_TIMEOUT_VARIABLE = "FACEFLOW_SERVER_START_TIMEOUT"
# A loaded 2-core machine has taken over 20 s (Prefect's own limit) to start a server, and
# creating its database on first use takes longer still.
DEFAULT_SERVER_START_TIMEOUT = 180.0
DOWNLOAD_TIMEOUT_VARIABLE = "FACEFLOW_DOWNLOAD_TIMEOUT"
DEFAULT_DOWNLOAD_TIMEOUT = 30.0  # per network read; the whole file is 1.4 MB
MODELS_DIR_VARIABLE = "FACEFLOW_MODELS_DIR"
FACES_DIR_VARIABLE = "FACEFLOW_FACES_DIR"
INBOX_DIR_VARIABLE = "FACEFLOW_INBOX_DIR"
OUTPUTS_DIR_VARIABLE = "FACEFLOW_OUTPUTS_DIR"
CHECKPOINT_SECONDS_VARIABLE = "FACEFLOW_CHECKPOINT_SECONDS"
DEFAULT_CHECKPOINT_SECONDS = 30.0  # a default training takes about 10 s and never writes one
REDIS_URL_VARIABLE = "FACEFLOW_REDIS_URL"
REDIS_URL_FORM = "redis://[user:password@]host[:port][/db] or rediss://... (TLS)"
LOCK_SECONDS_VARIABLE = "FACEFLOW_LOCK_SECONDS"
# How long a Redis cache lock holds before it expires: 5x the longest default training (10-60 s),
# so a lock left by a dead machine blocks identical steps elsewhere for at most 5 minutes.
DEFAULT_LOCK_SECONDS = 300.0
ALERT_BLOCK_VARIABLE = "FACEFLOW_ALERT_BLOCK"
# Prefect's own setting (and its older name): seconds between a flow run's heartbeat events.
HEARTBEAT_VARIABLES = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")
# Prefect's minimum, and what `faceflow ui` gives its worker's flow runs unless told otherwise.
MINIMUM_HEARTBEAT_SECONDS = 30


class SettingError(ValueError):
    """An environment variable holds a value faceflow cannot use."""


def data_file_from_environment() -> Path | None:
    """The olivettifaces.mat named by FACEFLOW_DATA_FILE, if set."""
    value = os.environ.get(DATA_FILE_VARIABLE, "").strip()
    return Path(value) if value else None


def api_url_from_environment() -> str | None:
    """PREFECT_API_URL, if set: the Prefect server every faceflow command then uses."""
    return os.environ.get(API_URL_VARIABLE, "").strip() or None


def models_dir() -> Path:
    """Where the champion model and the leaderboard live (FACEFLOW_MODELS_DIR, default ./models)."""
    return Path(os.environ.get(MODELS_DIR_VARIABLE, "").strip() or "models").expanduser().absolute()


def faces_dir() -> Path:
    """The face store: every image and every version (FACEFLOW_FACES_DIR, default ./faces)."""
    return Path(os.environ.get(FACES_DIR_VARIABLE, "").strip() or "faces").expanduser().absolute()


def inbox_dir() -> Path:
    """The one folder the ingest deployment reads from, and deployment forms' data files (FACEFLOW_INBOX_DIR, default ./inbox)."""
    return Path(os.environ.get(INBOX_DIR_VARIABLE, "").strip() or "inbox").expanduser().absolute()


def outputs_dir() -> Path:
    """The folder deployment forms' output_dir must lie in (FACEFLOW_OUTPUTS_DIR, default ./outputs)."""
    return Path(os.environ.get(OUTPUTS_DIR_VARIABLE, "").strip() or "outputs").expanduser().absolute()


def result_storage() -> Path:
    """Where Prefect stores task results: PREFECT_RESULTS_LOCAL_STORAGE_PATH, else PREFECT_HOME/storage."""
    value = os.environ.get("PREFECT_RESULTS_LOCAL_STORAGE_PATH", "").strip()
    return Path(value).expanduser().resolve() if value else prefect_home() / "storage"


def prefect_home() -> Path:
    """PREFECT_HOME as Prefect resolves it: the variable, else ~/.prefect."""
    return Path(os.environ.get(HOME_VARIABLE, "").strip() or "~/.prefect").expanduser().resolve()


def _positive_seconds(variable: str, default: float) -> float:
    value = os.environ.get(variable, "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise SettingError(f"{variable}={value!r}: expected a number of seconds > 0")
    return seconds


def server_start_timeout() -> float:
    """Seconds to wait for a Prefect server to answer (FACEFLOW_SERVER_START_TIMEOUT, default 180)."""
    return _positive_seconds(SERVER_START_TIMEOUT_VARIABLE, DEFAULT_SERVER_START_TIMEOUT)


def download_timeout() -> float:
    """Seconds any one network read of the data download may take (FACEFLOW_DOWNLOAD_TIMEOUT, default 30)."""
    return _positive_seconds(DOWNLOAD_TIMEOUT_VARIABLE, DEFAULT_DOWNLOAD_TIMEOUT)


def checkpoint_seconds() -> float:
    """Seconds between a training's resumable checkpoints (FACEFLOW_CHECKPOINT_SECONDS, default 30)."""
    return _positive_seconds(CHECKPOINT_SECONDS_VARIABLE, DEFAULT_CHECKPOINT_SECONDS)


def lock_seconds() -> float:
    """Seconds a Redis cache lock holds before it expires (FACEFLOW_LOCK_SECONDS, default 300)."""
    return _positive_seconds(LOCK_SECONDS_VARIABLE, DEFAULT_LOCK_SECONDS)


def redis_url() -> str | None:
    """FACEFLOW_REDIS_URL, if set: the Redis server that holds the cache's locks, checked (SettingError if malformed)."""
    value = os.environ.get(REDIS_URL_VARIABLE, "").strip()
    if not value:
        return None
    problem = _redis_url_problem(value) or redis_credentials_problem(value)
    if problem:
        raise SettingError(f"{REDIS_URL_VARIABLE}={_without_password(value)!r}: {problem}; expected {REDIS_URL_FORM}")
    return value


def _redis_url_problem(value: str) -> str | None:
    """What is wrong with a Redis URL (scheme, host, port, database number), or None."""
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss"):
        return f"the scheme is {parts.scheme + '://' if parts.scheme else 'missing'}, not redis:// or rediss://"
    try:
        port = parts.port
    except ValueError:
        return "the port is not a number from 1 to 65535"
    if not parts.hostname:
        return "the host is missing"
    if port == 0:
        return "the port is not a number from 1 to 65535"
    database = parts.path.strip("/")
    if database and not database.isdigit():
        return f"the database {database!r} is not a number"
    return None


def _without_password(url: str) -> str:
    """``url`` with its password, if any, shown as ***: error messages end up in logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{parts.netloc.rpartition('@')[2]}").geturl()


def alert_block() -> tuple[str, str] | None:
    """The notification block alerts go to, as (block type slug, block name), from FACEFLOW_ALERT_BLOCK; None if unset.

    The value is ``<block-type-slug>/<block-name>``, e.g. ``custom-webhook/faceflow-alerts`` or
    ``slack-webhook/ml-team``: any Prefect notification block saved on the server.
    """
    value = os.environ.get(ALERT_BLOCK_VARIABLE, "").strip()
    if not value:
        return None
    slug, _, name = value.partition("/")
    if not slug or not name or "/" in name:
        raise SettingError(f"{ALERT_BLOCK_VARIABLE}={value!r}: expected <block-type-slug>/<block-name>, "
                           "e.g. custom-webhook/faceflow-alerts")
    return slug, name


def heartbeat_seconds() -> int:
    """Seconds between flow run heartbeats for `faceflow ui`'s worker: PREFECT_FLOWS_HEARTBEAT_FREQUENCY, default 30.

    Prefect's own default is 180 s and its minimum 30 s; the crash automation (commands/alerts.py)
    waits three heartbeat intervals, so a shorter heartbeat marks a dead run Crashed sooner.
    """
    for variable in HEARTBEAT_VARIABLES:
        value = os.environ.get(variable, "").strip()
        if value:
            if not value.isdigit() or int(value) < MINIMUM_HEARTBEAT_SECONDS:
                raise SettingError(f"{variable}={value!r}: expected a whole number of seconds >= {MINIMUM_HEARTBEAT_SECONDS}")
            return int(value)
    return MINIMUM_HEARTBEAT_SECONDS


# The Prefect server's basic auth (docs/operations.md, Security). Prefect's own settings: the server
# requires PREFECT_SERVER_API_AUTH_STRING, every client sends PREFECT_API_AUTH_STRING. faceflow reads
# the string from PREFECT_API_AUTH_STRING or from the file FACEFLOW_AUTH_FILE names, and never prints it.
AUTH_STRING_VARIABLE = "PREFECT_API_AUTH_STRING"
SERVER_AUTH_STRING_VARIABLE = "PREFECT_SERVER_API_AUTH_STRING"
AUTH_FILE_VARIABLE = "FACEFLOW_AUTH_FILE"
CSRF_VARIABLE = "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED"
AUTH_STRING_FORM = "user:password, each part printable with no spaces, the password at least 12 characters"
MINIMUM_PASSWORD_LENGTH = 12
DASK_TLS_VARIABLES = ("FACEFLOW_DASK_TLS_CA", "FACEFLOW_DASK_TLS_CERT", "FACEFLOW_DASK_TLS_KEY")


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` names this machine only: localhost, 127.0.0.0/8 or ::1."""
    import ipaddress

    if not host:
        return False
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_string() -> str | None:
    """The Prefect server's auth string, from PREFECT_API_AUTH_STRING or FACEFLOW_AUTH_FILE; None if neither is set.

    A malformed string (or an unreadable file) raises SettingError naming where it came from,
    never the string itself.
    """
    value = os.environ.get(AUTH_STRING_VARIABLE, "")
    source = AUTH_STRING_VARIABLE
    path = os.environ.get(AUTH_FILE_VARIABLE, "").strip()
    if not value.strip() and path:
        source = f"the file {AUTH_FILE_VARIABLE}={path}"
        try:
            mode = Path(path).stat().st_mode
            value = Path(path).read_text().strip()
        except (OSError, UnicodeDecodeError) as error:
            raise SettingError(f"{AUTH_FILE_VARIABLE}={path}: cannot be read ({type(error).__name__}: "
                               f"{getattr(error, 'strerror', None) or 'not text'})") from None
        if mode & 0o077:
            raise SettingError(f"{AUTH_FILE_VARIABLE}={path}: others can read it (mode {mode & 0o777:o}); "
                               f"`chmod 600 {path}` first")
    elif not value.strip():
        return None
    user, colon, password = value.partition(":")
    if (not colon or not user or not password or not value.isprintable() or any(c.isspace() for c in value)
            or len(password) < MINIMUM_PASSWORD_LENGTH):
        raise SettingError(f"{source}: the auth string is malformed (not shown); expected {AUTH_STRING_FORM}")
    return value


def apply_auth_string() -> str | None:
    """Check the auth string and put it where Prefect's client, and every process started from here, reads it."""
    value = auth_string()
    if value is not None:
        os.environ[AUTH_STRING_VARIABLE] = value
    return value


def redis_credentials_problem(value: str) -> str | None:
    """Why a checked Redis URL may not be used as it is: a host beyond this machine with no password."""
    parts = urlsplit(value)
    if not is_loopback(parts.hostname) and not parts.password:
        return (f"{parts.hostname} is not this machine, and the URL has no password: anyone who reaches it could "
                "stall every cached step; give redis://user:password@host or redis://:password@host (rediss:// for TLS)")
    return None


def dask_tls() -> dict[str, str] | None:
    """The Dask TLS files {"ca", "cert", "key"} from FACEFLOW_DASK_TLS_CA/CERT/KEY, each readable; None if none is set."""
    values = {variable: os.environ.get(variable, "").strip() for variable in DASK_TLS_VARIABLES}
    if not any(values.values()):
        return None
    missing = [variable for variable, value in values.items() if not value]
    if missing:
        raise SettingError(f"{', '.join(missing)} not set: Dask's TLS needs all of {', '.join(DASK_TLS_VARIABLES)} "
                           "(the CA's certificate, this machine's certificate and its key, PEM files)")
    for variable, value in values.items():
        try:
            with open(value, "rb") as file:
                start = file.read(64)
        except OSError as error:
            raise SettingError(f"{variable}={value}: cannot be read ({error.strerror})") from None
        if b"-----BEGIN" not in start:
            raise SettingError(f"{variable}={value}: not a PEM file (no -----BEGIN line)")
    return dict(zip(("ca", "cert", "key"), values.values()))


def dask_address_problem(address: str, tls: dict[str, str] | None) -> str | None:
    """Why a sweep may not connect to the Dask scheduler at ``address`` with these TLS files, or None."""
    scheme, found, rest = address.partition("://")
    if not found:
        scheme, rest = "tcp", address
    host = urlsplit(f"//{rest}").hostname
    if tls is not None and scheme != "tls":
        return f"{DASK_TLS_VARIABLES[0]} and the others are set: give the scheduler as tls://host:port"
    if tls is None and scheme == "tls":
        return f"a tls:// scheduler needs {', '.join(DASK_TLS_VARIABLES)} set"
    if tls is None and not is_loopback(host):
        return (f"{host} is not this machine: a Dask scheduler beyond it must use TLS (tls://host:port, with "
                f"{', '.join(DASK_TLS_VARIABLES)}); without it anyone who reaches it runs code on every worker")
    return None
