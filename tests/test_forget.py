"""Forgetting a person: a version without them, a stale champion replaced whatever the margin, and `--purge`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from commands.runner import flush_to_api
from commands.server import local_server
from conftest import copy_home
from faceflow.config import DataConfig
from support import client, faceflow, store_snapshot
from tasks.data import FaceLabels, split_indices
from tasks.store import FaceStore, StoreError

FORGOTTEN = "olivetti-03"


def olivetti_store(root: Path, faces) -> FaceStore:
    store = FaceStore(root)
    store.add(faces.images, [f"olivetti-{t:02d}" for t in faces.target], [f"olivetti[{i}]" for i in range(len(faces.target))])
    return store


def files_holding(root: Path, pixels: np.ndarray) -> list[Path]:
    """Files under ``root`` that contain one of these images' float32 bytes."""
    needles = [np.ascontiguousarray(image, dtype="<f4").tobytes() for image in pixels]
    return [path for path in root.rglob("*") if path.is_file() and any(n in path.read_bytes() for n in needles)]


def test_forgetting_writes_a_version_without_them_that_reads_no_shard_of_theirs(tmp_path: Path, faces) -> None:
    store = olivetti_store(tmp_path / "faces", faces)
    first = store.latest()
    theirs = faces.images[faces.target == 3]
    done = store.forget(FORGOTTEN)
    version = store.latest()
    assert done.version == version and version.number == 2 and version.forgotten == (FORGOTTEN,)
    assert done.images == 10 and done.retired == (first.id,) and store.retired() == {first.id: (FORGOTTEN,)}
    after = store.read(version)
    assert FORGOTTEN not in after.people and len(after.image_ids) == 390 and version.people == 39
    before = store.read(first)
    kept = [i for i, person in enumerate(before.people) if person != FORGOTTEN]
    assert after.image_ids == tuple(before.image_ids[i] for i in kept)  # the others keep their ids, in order ...
    assert np.array_equal(after.images, before.images[kept])  # ... and their pixels
    config = DataConfig(validation_fraction=0.1)
    parts_before = split_indices(FaceLabels.of(before.image_ids, before.people), config)
    parts_after = split_indices(FaceLabels.of(after.image_ids, after.people), config)
    part = {before.image_ids[i]: name for name in ("fit", "validation", "heldout") for i in getattr(parts_before, name)}
    assert all(part[after.image_ids[i]] == name for name in ("fit", "validation", "heldout") for i in getattr(parts_after, name))
    # Version 2 reads none of the shards holding their pixels: those only version 1 reads.
    shards_of_2 = [store.root / "images" / shard for shard in version.shards]
    assert not [shard for shard in files_holding(store.root / "images", theirs) if shard in shards_of_2]
    assert files_holding(store.root / "images", theirs)  # not purged: version 1 still holds them


def test_purging_deletes_every_version_and_shard_that_held_them(tmp_path: Path, faces) -> None:
    store = olivetti_store(tmp_path / "faces", faces)
    first = store.latest()
    done = store.forget(FORGOTTEN)
    assert [v.id for v in store.purge(done.retired)] == [first.id]
    assert [v.number for v in store.versions()] == [2] and not files_holding(store.root, faces.images[faces.target == 3])
    assert len(store.read(store.latest()).image_ids) == 390  # the version without them reads whole


def test_forgetting_someone_not_there_or_everyone_is_refused_and_the_store_unchanged(tmp_path: Path, faces) -> None:
    from tasks.forgetting import Places, forget_person

    store = olivetti_store(tmp_path / "faces", faces)
    before = store_snapshot(store.root)
    with pytest.raises(StoreError, match=r"person 'nobody' is not in faces version 1 \(.*\); it holds olivetti-00"):
        store.forget("nobody")
    with pytest.raises(StoreError, match="'../x' is not a valid name"):
        store.forget("../x")
    assert store_snapshot(store.root) == before
    store.forget(FORGOTTEN)
    again = store_snapshot(store.root)
    with pytest.raises(StoreError, match=rf"person '{FORGOTTEN}' was forgotten in faces version 2 already; --purge"):
        forget_person(FORGOTTEN, False, store, Places(tmp_path / "m", tmp_path / "r", tmp_path / "i", tmp_path / "l", tmp_path / "c"))
    assert store_snapshot(store.root) == again
    alone = FaceStore(tmp_path / "alone")
    alone.add(faces.images[:10], ["solo"] * 10, [f"s{i}" for i in range(10)])
    with pytest.raises(StoreError, match="'solo' is everyone in faces version 1"):
        alone.forget("solo")
    assert [v.number for v in alone.versions()] == [1]


# (epochs, promotion margin): a first champion on version 1; after forgetting, a worse challenger
# under a margin no challenger could clear, which replaces the stale champion all the same.
CHALLENGERS = ((150, 0.5), (40, 100.0))


@pytest.fixture(scope="module")
def forgotten(tmp_path_factory: pytest.TempPathFactory, data_file: Path, migrated_home: Path, faces) -> dict:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.forget import faceflow_forget
    from flows.retrain import RETRAIN_CONFIG, faceflow_retrain

    root = tmp_path_factory.mktemp("forget")
    config = RETRAIN_CONFIG.model_copy(update={
        "output_dir": root / "outputs", "data": RETRAIN_CONFIG.data.model_copy(update={"data_file": data_file}),
        "sample": RETRAIN_CONFIG.sample.model_copy(update={"n_samples": 4}),
    })
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FACEFLOW_MODELS_DIR", str(root / "models"))
        patch.setenv("FACEFLOW_FACES_DIR", str(root / "faces"))
        # Version 1 is the Olivetti faces less one image: its id, and so every cache key computed from it,
        # is this module's own, and the purge deletes no other test's cached results.
        FaceStore(root / "faces").add(faces.images[:-1], [f"olivetti-{t:02d}" for t in faces.target[:-1]],
                                      [f"olivetti[{i}]" for i in range(len(faces.target) - 1)])
        home = copy_home(migrated_home, root / "home")
        env = dict(os.environ)  # this session's PREFECT_HOME: where the flows run here store their results
        with local_server(home, timeout=300) as server, temporary_settings({PREFECT_API_URL: server.api_url}):
            found: dict = {"root": root, "results": []}

            def retrain(epochs: int, margin: float):
                trained = config.model_copy(update={"train": config.train.model_copy(update={"epochs": epochs})})
                found["results"].append(faceflow_retrain(config=trained, promotion_margin=margin))

            def champion() -> dict:
                shown = subprocess.run(faceflow("champion", "--json"), env=env, cwd=root, capture_output=True, text=True, timeout=300)
                assert shown.returncode == 0, shown.stderr
                return json.loads(shown.stdout)

            retrain(*CHALLENGERS[0])
            found["before"] = champion()
            found["forget"] = faceflow_forget(person=FORGOTTEN, output_dirs=[root / "outputs"])
            found["stale"] = champion()
            retrain(*CHALLENGERS[1])
            found["after"] = champion()
            with client(server.api_url) as prefect:
                found["task_runs"] = prefect.read_task_runs()
            flush_to_api()
            found["purge"] = subprocess.run(
                faceflow("forget", FORGOTTEN, "--purge", "--outputs", str(root / "outputs"), "--json"),
                env=env, cwd=root, capture_output=True, text=True, timeout=300,
            )
            yield found


def test_a_champion_fitted_on_a_forgotten_person_is_stale_and_replaced_whatever_the_margin(forgotten: dict) -> None:
    first, second = forgotten["results"]
    assert first.promoted and forgotten["before"]["stale"] is None
    version_1 = forgotten["before"]["faces_version"]
    assert forgotten["forget"]["retired"] == [version_1] and forgotten["forget"]["version"]["number"] == 2
    assert f"faces version {version_1[:12]}, which holds {FORGOTTEN}, since forgotten" in forgotten["stale"]["stale"]
    assert second.promoted and "the champion is stale" in second.reason and "whatever the margin" in second.reason
    assert second.challenger["validation log p"] < first.challenger["validation log p"]  # worse (40 epochs against 150)
    after = forgotten["after"]
    assert after["stale"] is None and after["faces_version"] == forgotten["forget"]["version"]["id"]


def test_purge_leaves_no_file_derived_from_the_versions_that_held_them(forgotten: dict, faces) -> None:
    purge = forgotten["purge"]
    assert purge.returncode == 0, purge.stderr
    done = json.loads(purge.stdout.strip().splitlines()[-1])
    root, version_1 = forgotten["root"], forgotten["before"]["faces_version"]
    assert done["version"] is None and done["purged"]["versions"] == [f"1 ({version_1[:12]})"]
    # Every image of theirs is gone from every file: store, run folders, models, cached results.
    assert not files_holding(root, faces.images[faces.target == 3])
    # No run folder or champion from version 1 remains; the champion on version 2 does.
    configs = [json.loads(p.read_text())["data"]["faces_version"] for p in (root / "outputs").glob("run-*/config.json")]
    assert configs and version_1 not in configs
    records = [json.loads(p.read_text()) for p in (root / "models").glob("champion-*/champion.json")]
    assert [r["faces_version"] for r in records] == [forgotten["after"]["faces_version"]]
    assert (root / "models" / "champion" / "model.pt").is_file()
    # Every result a task run on version 1 stored is deleted; those of version 2 stay.
    stored = {1: [], 2: []}
    for run in forgotten["task_runs"]:
        key = getattr(run.state.data, "storage_key", None) if run.state else None
        for number, version in ((1, version_1), (2, forgotten["after"]["faces_version"])):
            if key and f"faces:{version[:12]}" in run.tags:
                stored[number].append(Path(key))
    assert stored[1] and stored[2]
    assert not [path for path in stored[1] if path.exists()] and all(path.exists() for path in stored[2])
    assert done["purged"]["cached_results"] == len(set(stored[1]))
