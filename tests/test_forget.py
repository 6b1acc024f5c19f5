"""Forgetting a person: a version without them, a stale champion replaced whatever the margin, and `--purge`.

The module's server test ingests a visitor (their dataset card on the server), trains on them,
forgets olivetti-00 (a default-era interpolation endpoint: retraining goes on), then purges the
visitor with the CLI and checks, independently of the purge's own bookkeeping, that no file,
cached result, lock, checkpoint, persisted result, champion or artifact derived from them is left.
Training is light (one narrow flow, few epochs): quality is not under test here.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from uuid import UUID

import numpy as np
import pytest

from commands.runner import flush_to_api
from commands.server import local_server
from conftest import REPO_ROOT, copy_home
from faceflow.config import DataConfig
from support import LIGHT_TRAIN, client, faceflow, store_snapshot
from tasks.data import FaceLabels, split_indices
from tasks.store import FaceStore, StoreError, image_ids

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


# (epochs, promotion margin): a first champion; after forgetting, a worse challenger under a margin no
# challenger could clear, which replaces the stale champion all the same.
CHALLENGERS = ((30, 0.5), (2, 100.0))
ENDPOINT_PERSON = "olivetti-00"  # the old fixed default endpoint: forgetting them must not stop retraining
VISITOR = "visitor-0"


def visitor_faces(faces) -> np.ndarray:
    """Ten faces no one else has: olivetti-39's, mirrored left to right."""
    return np.ascontiguousarray(faces.images[faces.target == 39][:, :, ::-1])


def version_events(api_url: str) -> list[dict]:
    import httpx

    answer = httpx.post(f"{api_url}/events/filter", json={"filter": {"event": {"name": ["faceflow.faces.version.created"]}},
                                                          "limit": 50}, timeout=30)
    answer.raise_for_status()
    return answer.json()["events"]


def retrain_trigger_automation(api_url: str) -> UUID:
    """A deployment of faceflow-retrain with prefect.yaml's own trigger on new versions: returns the deployment's id.

    No worker runs it: the test checks that the automation creates the retraining run.
    """
    import yaml
    from prefect.events.actions import RunDeployment
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    [retrain] = [d for d in spec["deployments"] if d["name"] == "weekly-retrain"]
    [trigger] = retrain["triggers"]
    with client(api_url) as prefect:
        flow_id = prefect.create_flow_from_name("faceflow-retrain")
        deployment = prefect.create_deployment(flow_id=flow_id, name="weekly-retrain", entrypoint=retrain["entrypoint"])
        prefect.create_automation(AutomationCore(
            name="retrain on new faces", enabled=True,
            trigger=EventTrigger(match=trigger["match"], expect=set(trigger["expect"]), posture=Posture.Reactive, threshold=1),
            actions=[RunDeployment(source="selected", deployment_id=deployment)],
        ))
    return deployment


def runs_of(api_url: str, deployment: UUID) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with client(api_url) as prefect:
        return prefect.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment])))


def every(read) -> list:  # type: ignore[no-untyped-def]
    """Every item of a paged API read (pages of 200, the server's limit)."""
    items: list = []
    while page := read(len(items)):
        items += page
        if len(page) < 200:
            break
    return items


def wait_until(condition, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.5)  # poll interval of this bounded wait (timeout above)
    raise AssertionError(f"{what}: not within {timeout} s")


@pytest.fixture(scope="module")
def forgotten(tmp_path_factory: pytest.TempPathFactory, data_file: Path, migrated_home: Path, faces) -> dict:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.forget import faceflow_forget
    from flows.ingest import faceflow_ingest
    from flows.retrain import RETRAIN_CONFIG, faceflow_retrain
    from faceflow.caching import cache_index, checkpoint_folder, lock_folder

    root = tmp_path_factory.mktemp("forget")
    config = RETRAIN_CONFIG.model_copy(update={
        "output_dir": root / "elsewhere",  # found by the purge only through the leaderboard's run folder paths
        "data": RETRAIN_CONFIG.data.model_copy(update={"data_file": data_file}),
        "sample": RETRAIN_CONFIG.sample.model_copy(update={"n_samples": 4}),
        "baselines": RETRAIN_CONFIG.baselines.model_copy(update={"gmm_max_components": 2}),
    })
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FACEFLOW_MODELS_DIR", str(root / "models"))
        patch.setenv("FACEFLOW_FACES_DIR", str(root / "faces"))
        # Version 1 is the Olivetti faces less one image: its id, and so every cache key computed from it,
        # is this module's own, and the purge deletes no other test's cached results.
        FaceStore(root / "faces").add(faces.images[:-1], [f"olivetti-{t:02d}" for t in faces.target[:-1]],
                                      [f"olivetti[{i}]" for i in range(len(faces.target) - 1)])
        visitor = tmp_path_factory.mktemp("input") / "visitor.npz"  # outside root, which is scanned for their pixels
        np.savez(visitor, images=visitor_faces(faces), people=np.array([VISITOR] * 10))
        home = copy_home(migrated_home, root / "home")
        with local_server(home, timeout=300) as server, temporary_settings({PREFECT_API_URL: server.api_url}):
            env = {**os.environ, "PREFECT_API_URL": server.api_url}  # the session's PREFECT_HOME holds the results
            found: dict = {"root": root, "results": [], "api_url": server.api_url}

            def retrain(epochs: int, margin: float):
                trained = config.model_copy(update={"train": config.train.model_copy(update={**LIGHT_TRAIN, "epochs": epochs})})
                found["results"].append(faceflow_retrain(config=trained, promotion_margin=margin))

            def champion() -> dict:
                shown = subprocess.run(faceflow("champion", "--json"), env=env, cwd=root, capture_output=True, text=True, timeout=300)
                assert shown.returncode == 0, shown.stderr
                return json.loads(shown.stdout)

            found["ingest"] = faceflow_ingest(path=visitor)  # version 2: the visitor's dataset card is on the server
            retrain(*CHALLENGERS[0])
            found["before"] = champion()
            deployment = retrain_trigger_automation(server.api_url)
            found["forget"] = faceflow_forget(person=ENDPOINT_PERSON, output_dirs=[root / "outputs"])
            found["triggered"] = wait_until(lambda: runs_of(server.api_url, deployment), 60, "the automation's retraining run")
            found["events"] = wait_until(lambda: [e for e in version_events(server.api_url) if e["payload"].get("forgotten")],
                                         60, "the forget's version event in the server's event store")
            found["stale"] = champion()
            retrain(*CHALLENGERS[1])
            found["after"] = champion()
            found["version_3_people"] = {r["image_id"]: r["person"] for r in FaceStore(root / "faces").manifest(
                FaceStore(root / "faces").resolve("3"))}
            found["after_config"] = json.loads((Path(found["results"][1].challenger["run folder"]) / "config.json").read_text())
            with client(server.api_url) as prefect:
                found["task_runs"] = every(lambda offset: prefect.read_task_runs(limit=200, offset=offset))
                found["flow_runs"] = every(lambda offset: prefect.read_flow_runs(limit=200, offset=offset))
                found["artifacts_before"] = every(lambda offset: prefect.read_artifacts(limit=200, offset=offset))
            # What a killed training and a killed task would leave: a checkpoint and lock files, by a key of version 3.
            version_3 = found["after"]["faces_version"]
            key = next(k for k in (cache_index() / version_3[:12]).read_text().split() if k.startswith("train_realnvp-"))
            found["leftovers"] = [checkpoint_folder() / f"{key}.pt", lock_folder() / f"{key}.lock", lock_folder() / f"{key}.pid"]
            for path in found["leftovers"]:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"left by a killed run")
            flush_to_api()
            run_cli = lambda *arguments: subprocess.run(  # noqa: E731
                faceflow(*arguments), env=env, cwd=root, capture_output=True, text=True, timeout=300)
            found["purge"] = run_cli("forget", VISITOR, "--purge", "--json")
            found["files_holding"] = files_holding(root, visitor_faces(faces))
            found["champions_left"] = sorted((root / "models").glob("champion-*"))
            found["variable"] = _variable(server.api_url)
            found["link"] = (root / "models" / "champion").is_symlink()
            with client(server.api_url) as prefect:
                found["artifacts_after"] = every(lambda offset: prefect.read_artifacts(limit=200, offset=offset))
            found["verify"] = run_cli("forget", VISITOR, "--verify")
            found["again"] = run_cli("forget", VISITOR)
            found["reingest"] = run_cli("ingest", str(visitor))
            retrain(*CHALLENGERS[0])  # after the purge: no champion, so a first one, on the version without the visitor
            found["readmit"] = run_cli("ingest", str(visitor), "--readmit")
            yield found


def _variable(api_url: str):
    from tasks.champion import CHAMPION_VARIABLE

    with client(api_url) as prefect:
        variable = prefect.read_variable_by_name(CHAMPION_VARIABLE)
    return variable.value if variable else None


def test_a_champion_fitted_on_a_forgotten_person_is_stale_and_replaced_whatever_the_margin(forgotten: dict) -> None:
    first, second = forgotten["results"][:2]
    assert first.promoted and forgotten["before"]["stale"] is None
    version_2 = forgotten["before"]["faces_version"]
    assert version_2 in forgotten["forget"]["retired"] and forgotten["forget"]["version"]["number"] == 3
    assert f"faces version {version_2[:12]}, which holds {ENDPOINT_PERSON}, since forgotten" in forgotten["stale"]["stale"]
    assert second.promoted and "the champion is stale" in second.reason and "whatever the margin" in second.reason
    assert second.challenger["validation log p"] < first.challenger["validation log p"]  # worse (2 epochs against 30)


def test_forgetting_the_default_endpoint_person_leaves_retraining_working_on_faces_without_them(forgotten: dict, faces) -> None:
    after = forgotten["after"]
    assert after["stale"] is None and after["faces_version"] == forgotten["forget"]["version"]["id"]
    theirs = set(image_ids(faces.images[faces.target == 0]))
    # The champion's run used the version's own default endpoints, none of the forgotten person.
    config = forgotten["after_config"]
    assert config["interpolate"]["face_a"] not in theirs and config["interpolate"]["face_b"] not in theirs
    people = forgotten["version_3_people"]
    assert people[config["interpolate"]["face_a"]] == "olivetti-01" and ENDPOINT_PERSON not in people.values()


def test_a_forget_announces_the_version_and_its_trigger_starts_a_retraining(forgotten: dict) -> None:
    matching = [e for e in forgotten["events"] if e["payload"].get("forgotten") == [ENDPOINT_PERSON]]
    assert len(matching) == 1, forgotten["events"]
    [event] = matching
    assert event["payload"]["number"] == 3 and event["resource"]["prefect.resource.id"] == f"faceflow.faces.version.{event['payload']['version']}"
    assert len(forgotten["triggered"]) >= 1  # prefect.yaml's trigger, as an automation, made a weekly-retrain run


def _derived_runs(forgotten: dict, retired: set[str]) -> tuple[list, set]:
    """Independently of the purge: task runs tagged with a retired version, and their flow runs and those runs' parents."""
    tags = {f"faces:{v[:12]}" for v in retired}
    tasks = [run for run in forgotten["task_runs"] if tags & set(run.tags)]
    flows = {run.flow_run_id for run in tasks}
    by_id = {run.id: run for run in forgotten["task_runs"]}
    parents = {by_id[f.parent_task_run_id].flow_run_id for f in forgotten["flow_runs"]
               if f.id in flows and f.parent_task_run_id in by_id}
    return tasks, flows | parents


def test_purge_leaves_nothing_derived_from_the_visitor_anywhere(forgotten: dict, faces) -> None:
    from faceflow.caching import checkpoint_folder, lock_folder

    purge = forgotten["purge"]
    assert purge.returncode == 0, purge.stderr
    done = json.loads(purge.stdout.strip().splitlines()[-1])
    root = forgotten["root"]
    retired = set(done["retired"])
    version_2, version_3 = forgotten["before"]["faces_version"], forgotten["after"]["faces_version"]
    assert retired == {version_2, version_3} and len(done["purged"]["versions"]) == 2
    # Every image of theirs is gone from every file: store, run folders, models.
    assert not forgotten["files_holding"]
    # No run folder (found only through the leaderboard: elsewhere/) or champion from those versions remains.
    assert not [p for p in (root / "elsewhere").glob("run-*/config.json") if json.loads(p.read_text())["data"]["faces_version"] in retired]
    assert done["purged"]["run_folders"] and all(Path(p).parent == root / "elsewhere" for p in done["purged"]["run_folders"])
    assert not forgotten["champions_left"]
    # The current champion was fitted on version 3: its link and the Variable are cleared.
    assert not forgotten["link"] and forgotten["variable"] is None
    # Every result a task run on those versions stored, its locks and checkpoint, and each run's persisted result: gone.
    tasks, flows = _derived_runs(forgotten, retired)
    stored = [Path(run.state.data.storage_key) for run in tasks if getattr(run.state.data, "storage_key", None)]
    stored += [Path(f.state.data.storage_key) for f in forgotten["flow_runs"]
               if f.id in flows and getattr(f.state.data, "storage_key", None)]
    assert stored and not [path for path in stored if path.exists()]
    keys = {Path(run.state.data.storage_key).name for run in tasks if getattr(run.state.data, "storage_key", None)}
    assert keys and not [k for k in keys if (checkpoint_folder() / f"{k}.pt").exists() or (lock_folder() / f"{k}.lock").exists()
                         or (lock_folder() / f"{k}.pid").exists()]
    assert not [path for path in forgotten["leftovers"] if path.exists()]
    # Every artifact of those runs (reports, samples, interpolations, cards) is deleted from the server.
    before = [a for a in forgotten["artifacts_before"] if a.flow_run_id in flows]
    card = [a for a in forgotten["artifacts_before"] if a.key == "faceflow-faces" and version_2[:12] in (a.description or "")]
    assert before and card and any("data:image/png;base64," in str(a.data) for a in before + card)
    left = {a.id for a in forgotten["artifacts_after"]}
    assert not [a for a in before + card if a.id in left]
    assert done["purged"]["artifacts"] == len({a.id for a in before + card})


def test_after_the_purge_verify_finds_nothing_and_they_stay_forgotten(forgotten: dict) -> None:
    verify = forgotten["verify"]
    assert verify.returncode == 0 and f"nothing of {VISITOR} found" in verify.stdout, verify.stdout + verify.stderr
    again = forgotten["again"]
    assert again.returncode == 2 and "was forgotten in faces version 4 already" in again.stderr
    reingest = forgotten["reingest"]
    last = reingest.stderr.strip().splitlines()[-1]
    assert reingest.returncode == 2 and last.startswith("faceflow ingest refused: ") and "forgotten by erasure 2 (visitor-0)" in last
    third = forgotten["results"][2]
    assert third.promoted and third.reason == "first champion"
    assert forgotten["readmit"].returncode == 0, forgotten["readmit"].stderr
    log = [json.loads(line) for line in (forgotten["root"] / "models" / "erasures.jsonl").read_text().splitlines()]
    assert [(e["erasure"], e["kind"], e["person"]) for e in log] == [
        (1, "forget", ENDPOINT_PERSON), (2, "purge", VISITOR), (3, "readmit", VISITOR)]
    assert log[1]["deleted"]["artifacts"] > 0 and log[1]["deleted"]["checkpoints"] == 1 and log[1]["deleted"]["lock_files"] == 2
