"""The one place that publishes Prefect artifacts: tables, markdown, figures, progress.

Tables are rounded for reading (artifacts.tables). A task publishes its own artifact when it
computes, so a run that fails part-way still shows what finished.
"""

from __future__ import annotations

from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactUpdate

from artifacts.markdown import figure_markdown
from artifacts.tables import readable_rows


def publish_table(key: str, rows: list[dict[str, object]], description: str) -> None:
    create_table_artifact(readable_rows(rows), key=key, description=description)


def publish_markdown(key: str, markdown: str, description: str) -> UUID:
    return create_markdown_artifact(markdown, key=key, description=description)


def publish_figure(key: str, title: str, png: bytes, description: str, caption: str = "") -> None:
    publish_markdown(key, figure_markdown(title, png, caption), description)


def update_markdown(artifact_id: UUID, markdown: str) -> None:
    """Replace a markdown artifact's content in place, as Prefect updates a progress artifact."""
    with get_client(sync_client=True) as client:
        client.update_artifact(artifact_id=artifact_id, artifact=ArtifactUpdate(data=markdown))


def start_progress(key: str, description: str) -> UUID:
    return create_progress_artifact(0.0, key=key, description=description)


def update_progress(artifact_id: UUID, percent: float) -> None:
    update_progress_artifact(artifact_id, percent)
