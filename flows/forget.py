"""Forget a person: a new faces version without them, announced like any new version; ``purge`` deletes the rest.

The new version triggers the weekly-retrain deployment (prefect.yaml) as an ingest does: a
champion fitted on a version that held the person is stale, and that retraining replaces it
whatever the margin.

A purge also deletes what the Prefect server holds of them, found by provenance, not by looking
at pixels: every artifact of a flow run that ran a task tagged with a retired version
(``faces:<id>``: reports, samples, interpolations, progress, tables) and of the run that started
it (a retraining's), the dataset cards of the retired versions (which show the faces they added),
and the persisted results of those runs and tasks. Artifacts are deleted through the API.
"""

from __future__ import annotations

import getpass
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from artifacts.publish import publish_markdown
from faceflow.caching import cache_index, checkpoint_folder, lock_folder, version_tag
from faceflow.confinement import confine_output_dirs
from faceflow.settings import faces_dir, models_dir, result_storage
from flows.ingest import announce_version, who_asked
from tasks.forgetting import Found, Places, ServerSide, forget_person, scan
from tasks.steps import ChampionVariable
from tasks.store import PERSON_PATTERN, FaceStore

PAGE = 200  # the API's own page size
DATASET_CARD = "faceflow-faces"


def places_here(output_dirs: Iterable[Path]) -> Places:
    """Where this machine's faceflow writes: the shared registry, result storage and its index, local locks and checkpoints."""
    return Places(models=models_dir(), results=result_storage(), index=cache_index(), locks=lock_folder(),
                  checkpoints=checkpoint_folder(), output_dirs=tuple(Path(d) for d in output_dirs))


class PrefectServer(ServerSide):
    """The server at PREFECT_API_URL: what it holds computed from retired versions, found by the runs' tags."""

    def find(self, retired: set[str], numbers: Mapping[str, int]) -> Found:
        from prefect import get_client
        from prefect.client.schemas.filters import (
            ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId, TaskRunFilter,
            TaskRunFilterId, TaskRunFilterTags,
        )

        found = Found()
        with get_client(sync_client=True) as client:
            task_runs = []
            for version in sorted(retired):
                task_runs += _pages(lambda offset, tag=version_tag(version): client.read_task_runs(
                    task_run_filter=TaskRunFilter(tags=TaskRunFilterTags(all_=[tag])), limit=PAGE, offset=offset))
            run_ids = {run.flow_run_id for run in task_runs if run.flow_run_id}
            runs = _pages(lambda offset: client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=sorted(run_ids))), limit=PAGE, offset=offset)) if run_ids else []
            starters = {run.parent_task_run_id for run in runs if run.parent_task_run_id}
            if starters:  # the retraining (or sweep) that started a pipeline on a retired version
                parents = _pages(lambda offset: client.read_task_runs(
                    task_run_filter=TaskRunFilter(id=TaskRunFilterId(any_=sorted(starters))), limit=PAGE, offset=offset))
                new = {run.flow_run_id for run in parents if run.flow_run_id} - run_ids
                run_ids |= new
                if new:
                    runs += _pages(lambda offset: client.read_flow_runs(
                        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=sorted(new))), limit=PAGE, offset=offset))
            for run in [*task_runs, *runs]:
                key = getattr(run.state.data, "storage_key", None) if run.state else None
                if key:
                    found.flow_results.append(Path(key))
            if run_ids:
                for artifact in _pages(lambda offset: client.read_artifacts(
                        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=sorted(run_ids))),
                        limit=PAGE, offset=offset)):
                    found.artifacts.append((str(artifact.id), f"{artifact.key or artifact.type} of flow run {artifact.flow_run_id}"))
            shorts = {version[:12] for version in retired}
            wanted = {number for number in numbers.values()}
            for artifact in _pages(lambda offset: client.read_artifacts(
                    artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[DATASET_CARD])), limit=PAGE, offset=offset)):
                if _card_of(artifact.description or "", shorts, wanted) and str(artifact.id) not in dict(found.artifacts):
                    found.artifacts.append((str(artifact.id), f"dataset card: {artifact.description}"))
        return found

    def delete(self, found: Found) -> int:
        from prefect import get_client

        with get_client(sync_client=True) as client:
            for identity, _ in found.artifacts:
                client.delete_artifact(UUID(identity))
        return len(found.artifacts)


def _pages(read) -> list[Any]:  # type: ignore[no-untyped-def]
    """Every item of a paged read: ``read(offset)`` until a short page."""
    items: list[Any] = []
    while True:
        page = read(len(items))
        items += page
        if len(page) < PAGE:
            return items


def _card_of(description: str, shorts: set[str], numbers: set[int]) -> bool:
    """Whether a dataset card's description names one of the retired versions (by id, else by number)."""
    if any(short in description for short in shorts):
        return True
    match = re.match(r"Faces version (\d+)\b", description)
    return bool(match) and "(" not in description.split(":")[0] and int(match.group(1)) in numbers


def forget_here(person: str, purge: bool, output_dirs: list[Path], asked_by: str | None = None,
                server: ServerSide | None = None) -> dict[str, Any]:
    """Forget ``person`` in the face store; with ``purge`` delete what was computed from them (``server``: on it too)."""
    return forget_person(person, purge, FaceStore(faces_dir()), places_here(output_dirs),
                         asked_by or f"user {getpass.getuser()}", server, alias=ChampionVariable() if server else None)


def verify_here(person: str, output_dirs: list[Path], server: ServerSide | None = None) -> list[str]:
    """What still holds ``person`` (tasks.forgetting.scan) here and, given ``server``, on it."""
    return scan(person, FaceStore(faces_dir()), places_here(output_dirs), server)


@task(name="forget_person", cache_policy=NO_CACHE)
def forget_task(person: str, purge: bool, output_dirs: list[Path]) -> dict[str, Any]:
    """Write the version without them; with purge, delete what was computed from the versions that held them, here and on the server."""
    done = forget_here(person, purge, output_dirs, who_asked(), PrefectServer())
    publish_markdown("faceflow-forget", forget_markdown(done), f"Erasure {done['erasure']}: the version without them, and what was deleted")
    return done


def forget_markdown(done: dict[str, Any]) -> str:
    version, purged = done["version"], done["purged"]
    lines = [f"### Erasure {done['erasure']}: forgot {done['person']}", ""]
    if version:
        lines.append(f"Faces version {version['number']} (`{version['id'][:12]}`) holds none of their "
                     f"{done['images']} images: {version['images']} images of {version['people']} people.")
    else:
        lines.append(f"Forgotten in faces version {done['forgotten_in']['number']} already.")
    held = len(done["retired"])
    lines.append(f"{held} version{'' if held == 1 else 's'} held them; a champion fitted on one is stale until the next retraining.")
    if purged:
        lines += ["", f"Removed by erasure {done['erasure']}: {len(purged['versions'])} versions, "
                      f"{len(purged['run_folders'])} run folders, {len(purged['champions'])} champion folders, "
                      f"{purged['cached_results']} cached task results, {purged['checkpoints']} checkpoints, "
                      f"{purged['flow_results']} persisted run results, {purged['artifacts']} artifacts."]
    return "\n".join(lines) + "\n"


@flow(name="faceflow-forget")
def faceflow_forget(
    person: Annotated[str, Field(pattern=PERSON_PATTERN.pattern, description="The person's label in the face store "
                                 "(`faceflow faces latest` lists them): letters, digits, '.', '_', '-'.")],
    purge: Annotated[bool, Field(description="Also delete the older versions that hold them, and every run folder, "
                                             "champion, cached result, checkpoint and artifact computed from those versions.")] = False,
    output_dirs: Annotated[list[Path], Field(description="Folders of run folders to purge, besides those the leaderboard names.")] = [Path("outputs")],  # noqa: B006
) -> dict[str, Any]:
    """Write a faces version without ``person`` (announced, so retraining replaces a champion that saw them)."""
    output_dirs = confine_output_dirs(output_dirs, "output_dirs")  # from a deployment: inside FACEFLOW_OUTPUTS_DIR
    done = forget_task(person, purge, output_dirs)
    version = done["version"]
    if version is not None:
        announce_version(version, version["parent"], [], forgotten=[person])
    if done["purged"] and done["purged"]["champions"] and not (models_dir() / "champion").exists():
        get_run_logger().warning("the champion was fitted on a purged version and is deleted: none until the next retraining")
    return done


@flow(name="faceflow-forget-verify")
def faceflow_forget_verify(
    person: Annotated[str, Field(pattern=PERSON_PATTERN.pattern, description="A person the erasure log names.")],
    output_dirs: Annotated[list[Path], Field(description="Folders of run folders to look in, besides those the leaderboard names.")] = [Path("outputs")],  # noqa: B006
) -> list[str]:
    """Every place that still holds the person's faces or something computed from them: empty after a purge."""
    return verify_here(person, confine_output_dirs(output_dirs, "output_dirs"), PrefectServer())
