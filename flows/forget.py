"""Forget a person: a new faces version without them, announced like any new version; ``purge`` deletes the rest.

The new version triggers the weekly-retrain deployment (prefect.yaml) as an ingest does: a
champion fitted on a version that held the person is stale, and that retraining replaces it
whatever the margin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from artifacts.publish import publish_markdown
from faceflow.caching import cache_index, lock_folder
from faceflow.settings import faces_dir, models_dir, result_storage
from flows.ingest import announce_version
from tasks.forgetting import forget_person
from tasks.steps import ChampionVariable
from tasks.store import PERSON_PATTERN, FaceStore


def forget_here(person: str, purge: bool, output_dirs: list[Path]) -> dict[str, Any]:
    """Forget ``person`` in this machine's face store; with ``purge`` delete what was computed from them."""
    return forget_person(person, purge, FaceStore(faces_dir()), output_dirs, models_dir(), result_storage(),
                         lock_folder(), cache_index())


@task(name="forget_person", cache_policy=NO_CACHE)
def forget_task(person: str, purge: bool, output_dirs: list[Path]) -> dict[str, Any]:
    """Write the version without them; with purge, delete older versions, run folders, champions and cached results."""
    done = forget_here(person, purge, output_dirs)
    publish_markdown("faceflow-forget", forget_markdown(done), f"Forgot {person}: the version without them, and what was deleted")
    return done


def forget_markdown(done: dict[str, Any]) -> str:
    version, purged = done["version"], done["purged"]
    lines = [f"### Forgot {done['person']}", ""]
    if version:
        lines.append(f"Faces version {version['number']} (`{version['id'][:12]}`) holds none of their "
                     f"{done['images']} images: {version['images']} images of {version['people']} people.")
    else:
        lines.append(f"Forgotten in faces version {done['forgotten_in']['number']} already.")
    held = len(done["retired"])
    lines.append(f"{held} version{'' if held == 1 else 's'} held them; a champion fitted on one is stale until the next retraining.")
    if purged:
        lines += ["", f"Purged: {len(purged['versions'])} versions, {len(purged['run_folders'])} run folders, "
                      f"{len(purged['champions'])} champion folders, {purged['cached_results']} cached task results."]
    return "\n".join(lines) + "\n"


@flow(name="faceflow-forget")
def faceflow_forget(
    person: Annotated[str, Field(pattern=PERSON_PATTERN.pattern, description="The person's label in the face store "
                                 "(`faceflow faces latest` lists them): letters, digits, '.', '_', '-'.")],
    purge: Annotated[bool, Field(description="Also delete the older versions that hold them, and every run folder, "
                                             "champion and cached result computed from those versions.")] = False,
    output_dirs: Annotated[list[Path], Field(description="Folders of run folders to purge, besides those the leaderboard names.")] = [Path("outputs")],  # noqa: B006
) -> dict[str, Any]:
    """Write a faces version without ``person`` (announced, so retraining replaces a champion that saw them)."""
    done = forget_task(person, purge, output_dirs)
    version = done["version"]
    if version is not None:
        announce_version(version, version["parent"], [], forgotten=[person])
    if done["purged"] and done["purged"]["champions"] and not (models_dir() / "champion").exists():
        ChampionVariable().set(None)  # the champion was fitted on them: none until the next retraining
        get_run_logger().warning("the champion was fitted on a purged version and is deleted: none until the next retraining")
    return done
