"""Ingest: new people and photos into the face store as a new version, announced as a Prefect event.

The event ``faceflow.faces.version.created`` is what the weekly-retrain deployment's trigger
(prefect.yaml) listens for: new faces are trained on and judged without waiting for Monday.
"""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.runtime import deployment, flow_run
from pydantic import Field

from tasks.steps import ingest_faces

VERSION_CREATED = "faceflow.faces.version.created"


def who_asked() -> str:
    """Who asked for this run (the erasure log records it): the deployment run, else the user running it."""
    if deployment.id:
        return f"deployment run {flow_run.name}"
    return f"user {getpass.getuser()}"


def announce_version(version: dict[str, Any], previous: str | None, new_people: list[str], forgotten: list[str] = ()) -> None:
    """Emit ``faceflow.faces.version.created`` with the version and its counts (the Event Feed shows it).

    ``previous`` is the id of the version before; ``forgotten`` the people it forgot (flows/forget.py).
    """
    emit_event(
        event=VERSION_CREATED,
        resource={"prefect.resource.id": f"faceflow.faces.version.{version['id']}",
                  "prefect.resource.name": f"faces version {version['number']}"},
        payload={"version": version["id"], "number": version["number"], "images": version["images"],
                 "people": version["people"], "added": version["added"], "new_people": new_people,
                 "forgotten": list(forgotten), "previous": previous},
    )


@flow(name="faceflow-ingest")
def faceflow_ingest(
    path: Annotated[Path, Field(description="A folder with one sub-folder of images per person (PNG, JPEG, PGM), "
                                            "an .npz with images (n, 64, 64) and people (n,), or a .mat in the Olivetti layout; "
                                            "inside the inbox folder (FACEFLOW_INBOX_DIR; a relative path is taken from it).")],
    resize: Annotated[bool, Field(description="Resize images that are not 64x64 (said per file); off: refuse them.")] = True,
    readmit: Annotated[bool, Field(description="Accept images of a forgotten person (refused otherwise, naming the "
                                               "erasure); the readmission is recorded in the erasure log.")] = False,
) -> dict[str, Any]:
    """Add faces to the face store as a new version (the latest plus every image it does not hold); announce it."""
    summary = ingest_faces(path, resize, readmit, who_asked())
    if summary["version"] is None:
        get_run_logger().info(f"nothing new: every image of {path} is already in the store")
    else:
        previous = summary["previous"]
        announce_version(summary["version"], previous["id"] if previous else None, summary["new_people"])
    return summary
