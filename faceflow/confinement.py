"""Paths a deployment form can name stay inside their folders.

Anyone who can fill in a deployment's form in the UI chooses what a worker reads and where it
writes, with the worker's rights: the ingest deployment reads only under FACEFLOW_INBOX_DIR, a
form's ``data.data_file`` is FACEFLOW_DATA_FILE or a file in the inbox, and its ``output_dir``
(the forget deployment's ``output_dirs``) lies under FACEFLOW_OUTPUTS_DIR. A path is resolved
with its symlinks before it is compared, so a link that leads out of the folder is refused too.
A relative output folder is taken inside FACEFLOW_OUTPUTS_DIR, and the forms' default
(``outputs``) is that folder itself, so a machine whose outputs live elsewhere still runs its
schedules.

The CLI is not confined: `faceflow ingest ~/photos` reads what its user can read already. A
flow run is confined when a deployment started it (``prefect.runtime.deployment.id``), which a
flow called in the CLI's own process never is.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from faceflow.config import FaceflowConfig
from faceflow.settings import (
    DATA_FILE_VARIABLE, INBOX_DIR_VARIABLE, OUTPUTS_DIR_VARIABLE, data_file_from_environment, inbox_dir, outputs_dir,
)


DEFAULT_OUTPUT_DIR = FaceflowConfig.model_fields["output_dir"].default  # outputs: in a deployment, FACEFLOW_OUTPUTS_DIR


class ConfinementError(ValueError):
    """A path that leaves the folder it must stay in; the message names the field, the path and the folder."""


def from_deployment() -> bool:
    """Whether this flow run was started from a deployment (the UI's forms, schedules, triggers)."""
    from prefect.runtime import deployment

    return deployment.id is not None


def confined(path: Path, root: Path, field: str, variable: str, relative_to: Path | None = None) -> Path:
    """``path`` resolved (symlinks followed), if it lies inside ``root``; ConfinementError otherwise.

    A relative ``path`` is taken relative to ``relative_to`` (default: the working directory, as
    the code that uses it would take it).
    """
    path = Path(path).expanduser()
    if not path.is_absolute() and relative_to is not None:
        path = relative_to / path
    resolved, folder = path.resolve(), root.resolve()
    if resolved != folder and folder not in resolved.parents:
        via = f" (a symlink to {resolved})" if path.absolute() != resolved and _is_link_on_the_way(path) else ""
        raise ConfinementError(f"{field} {str(path)!r}{via} is outside {folder}: a deployment reads and writes only "
                               f"inside the folder {variable} names")
    return resolved


def _is_link_on_the_way(path: Path) -> bool:
    path = path.absolute()
    return any(part.is_symlink() for part in (path, *path.parents))


def confine_forms(configs: Iterable[FaceflowConfig]) -> list[FaceflowConfig]:
    """The configs as a run should use them; in a flow run a deployment started, their paths checked first.

    From a deployment, ``output_dir`` is taken inside FACEFLOW_OUTPUTS_DIR: the form's default
    (``outputs``) is that folder itself, another relative path a folder inside it, and an absolute
    path must lie in it; the config returned names the folder resolved. The data file must be
    FACEFLOW_DATA_FILE or lie in the inbox. Anywhere else (the CLI) the configs are returned as given.
    """
    configs = list(configs)
    if not from_deployment():
        return configs
    return [_confined_form(config) for config in configs]


def confine_output_dirs(paths: Iterable[Path], field: str) -> list[Path]:
    """Output folders a form names (the forget deployment's ``output_dirs``): from a deployment, each taken
    inside FACEFLOW_OUTPUTS_DIR as a config's ``output_dir`` is; anywhere else, as given."""
    paths = [Path(path) for path in paths]
    if not from_deployment():
        return paths
    return [_output_dir(path, field) for path in paths]


def _output_dir(path: Path, field: str) -> Path:
    folder = outputs_dir()
    path = Path(path).expanduser()
    return confined(folder if path == DEFAULT_OUTPUT_DIR else path, folder, field, OUTPUTS_DIR_VARIABLE, relative_to=folder)


def _confined_form(config: FaceflowConfig) -> FaceflowConfig:
    output_dir = _output_dir(config.output_dir, "output_dir")
    data_file = config.data.data_file
    allowed = data_file_from_environment()
    if data_file is not None and not (allowed is not None and Path(data_file).resolve() == allowed.resolve()):
        confined(data_file, inbox_dir(), "data.data_file", f"{INBOX_DIR_VARIABLE} (or {DATA_FILE_VARIABLE} itself)")
    return config.model_copy(update={"output_dir": output_dir})
