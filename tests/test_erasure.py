"""The erasure record and its check, without a server: the log, re-ingest refused, readmission, promotion refused,
a purge that deletes nothing half, and a scan that notices each kind of copy a purge could leave."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from faceflow.config import FaceflowConfig
from support import faceflow, store_snapshot
from tasks.champion import ChampionRecord
from tasks.data import FaceLabels, FacesVersionError, check_config_against, interpolation_endpoints
from tasks.forgetting import (
    Places, forget_person, forgotten_endpoints, forgotten_images, read_erasures, retired_reason, scan,
)
from tasks.importers import ingest
from tasks.registry import leaderboard, promote
from tasks.store import FaceStore, StoreError, image_ids

PERSON = "olivetti-00"


class Alias:
    def __init__(self) -> None:
        self.record: dict | None = {"seed": 1}

    def get(self) -> dict | None:
        return self.record

    def set(self, record: dict | None) -> None:
        self.record = record


def olivetti(root: Path, faces) -> FaceStore:
    store = FaceStore(root)
    store.add(faces.images, [f"olivetti-{t:02d}" for t in faces.target], [f"olivetti[{i}]" for i in range(len(faces.target))])
    return store


def places(root: Path) -> Places:
    return Places(models=root / "models", results=root / "results", index=root / "results" / ".faceflow-cache-index",
                  locks=root / "locks", checkpoints=root / "checkpoints", output_dirs=(root / "outputs",))


def derived_files(root: Path, version: str, key: str, name: str) -> dict[str, Path]:
    """One of each file faceflow derives from ``version``: a run folder, a champion (current), a cached result
    with its lock files and checkpoint, noted in the cache index; as a run and a retraining leave them."""
    where = places(root)
    run = where.output_dirs[0] / f"run-{name}"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"data": {"faces_version": version}}))
    champion = where.models / f"champion-{name}"
    champion.mkdir(parents=True)
    (champion / "champion.json").write_text(json.dumps({"faces_version": version, "run_folder": str(run)}))
    link = where.models / "champion"
    link.unlink(missing_ok=True)
    link.symlink_to(champion.name)
    for folder in (where.results, where.index, where.locks, where.checkpoints):
        folder.mkdir(parents=True, exist_ok=True)
    with open(where.index / version[:12], "a") as index:
        index.write(key + "\n")
    files = {"run folder": run, "champion": champion, "cached result": where.results / key,
             "lock file": where.locks / f"{key}.lock", "checkpoint": where.checkpoints / f"{key}.pt"}
    for kind in ("cached result", "lock file", "checkpoint"):
        files[kind].write_bytes(b"derived")
    return files


def test_forget_logs_the_erasure_and_purge_deletes_every_kind_and_the_scan_then_finds_nothing(tmp_path: Path, faces) -> None:
    store = olivetti(tmp_path / "faces", faces)
    version_1 = store.latest().id
    files = derived_files(tmp_path, version_1, "train_realnvp-abc", "one")
    alias = Alias()
    done = forget_person(PERSON, True, store, places(tmp_path), "user tester", alias=alias)
    assert all(not path.exists() for path in files.values()), [k for k, p in files.items() if p.exists()]
    assert not (tmp_path / "models" / "champion").is_symlink() and alias.record is None  # link and alias cleared
    assert [p.name for p in (tmp_path / "results" / ".faceflow-cache-index").iterdir()] == [f"{version_1[:12]}.purged"]
    [entry] = read_erasures(tmp_path / "models")
    theirs = set(image_ids(faces.images[faces.target == 0]))
    assert entry["erasure"] == done["erasure"] == 1 and entry["person"] == PERSON and entry["asked_by"] == "user tester"
    assert entry["kind"] == "purge" and set(entry["image_ids"]) == theirs and entry["retired"] == [{"id": version_1, "number": 1}]
    assert entry["deleted"] == {"versions": 1, "run_folders": 1, "champions": 1, "cached_results": 1, "lock_files": 1,
                                "checkpoints": 1, "cache_index": 1, "flow_results": 0, "artifacts": 0}
    assert entry["version_written"]["number"] == 2
    assert "pixels" not in json.dumps(entry) and len(json.dumps(entry)) < 2_000  # ids and counts, never an image
    assert scan(PERSON, store, places(tmp_path)) == []


DELETIONS = {
    "run folder": "run_folders", "champion": "champions", "cached result": "cached_results", "lock file": "lock_files",
    "checkpoint": "checkpoints",
}


@pytest.mark.parametrize("kind", [*DELETIONS, "shard"])
def test_a_purge_that_skips_one_kind_is_caught_by_the_scan(tmp_path: Path, faces, kind: str, monkeypatch) -> None:
    """Break each deletion once: the scan names what was left."""
    import tasks.forgetting as forgetting

    store = olivetti(tmp_path / "faces", faces)
    files = derived_files(tmp_path, store.latest().id, "fit_pca-abc", "one")
    if kind == "shard":
        monkeypatch.setattr(FaceStore, "_tidy", lambda self: None)  # the shards only the purged versions read stay
    else:
        real = forgetting.plan_purge

        def skipping(*args, **kwargs):
            plan = real(*args, **kwargs)
            setattr(plan, DELETIONS[kind], [])
            return plan

        monkeypatch.setattr(forgetting, "plan_purge", skipping)
    forget_person(PERSON, True, store, places(tmp_path))
    monkeypatch.undo()
    found = scan(PERSON, store, places(tmp_path))
    if kind == "shard":
        assert any("holds 10 of their images" in line for line in found), found
    else:
        assert files[kind].exists() and any(str(files[kind]) in line for line in found), found


def test_reingesting_a_forgotten_image_is_refused_naming_the_erasure_and_readmit_is_logged(tmp_path: Path, faces) -> None:
    store = olivetti(tmp_path / "faces", faces)
    models = tmp_path / "models"
    forget_person(PERSON, False, store, places(tmp_path), "user tester")
    theirs = faces.images[faces.target == 0]
    offered = tmp_path / "back.npz"
    np.savez(offered, images=theirs[:3], people=np.array(["someone-else"] * 3))
    before = store_snapshot(store.root)
    with pytest.raises(StoreError, match=r"image 0 \(back.npz\[0\]\): image [0-9a-f]{12} was forgotten by erasure 1 "
                                         rf"\({PERSON}\) \(3 offered images were\); --readmit"):
        ingest(offered, True, store.root, None, models=models)
    assert store_snapshot(store.root) == before and len(read_erasures(models)) == 1
    done = ingest(offered, True, store.root, None, models=models, readmit=True, asked_by="user tester")
    assert done.result.added == 3
    readmitted = read_erasures(models)[-1]
    assert readmitted["kind"] == "readmit" and readmitted["erasure"] == 2 and readmitted["readmitted_from"] == [f"erasure 1 ({PERSON})"]
    assert readmitted["image_ids"] == sorted(image_ids(theirs[:3]))
    assert len(forgotten_images(models)) == 7  # the other 7 stay forgotten


def test_the_cli_refuses_reingest_and_accepts_readmit(tmp_path: Path, faces) -> None:
    store = olivetti(tmp_path / "faces", faces)
    forget_person(PERSON, False, store, places(tmp_path), "user tester")
    offered = tmp_path / "back.npz"
    np.savez(offered, images=faces.images[faces.target == 0][:2], people=np.array(["x", "x"]))
    env = {**os.environ, "FACEFLOW_FACES_DIR": str(store.root), "FACEFLOW_MODELS_DIR": str(tmp_path / "models"),
           "PREFECT_HOME": str(tmp_path / "home")}
    refused = subprocess.run(faceflow("ingest", str(offered)), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "forgotten by erasure 1" in refused.stderr
    accepted = subprocess.run(faceflow("ingest", str(offered), "--readmit"), env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
    assert accepted.returncode == 0, accepted.stderr
    assert read_erasures(tmp_path / "models")[-1]["asked_by"].startswith("user ")


def test_a_challenger_fitted_on_a_retired_version_is_never_promoted(tmp_path: Path, faces) -> None:
    store = olivetti(tmp_path / "faces", faces)
    version_1 = store.latest().id
    run = tmp_path / "run-x"
    run.mkdir()
    for name in ("model.pt", "pca.npz", "split.json", "metrics.json"):
        (run / name).write_text("{}")
    record = ChampionRecord(str(run), "id", 1, "d", 1.0, 1.0, "now", {}, faces_version=version_1)
    models = tmp_path / "models"
    check = lambda challenger: retired_reason(store, challenger.faces_version)  # noqa: E731
    first = promote(run, record, {"why": "first"}, models, Alias(), judged_against=None, admit=check)
    assert first.folder is not None  # not retired yet: promoted
    store.forget(PERSON)
    before = sorted(p.name for p in models.iterdir() if p.is_dir())
    second = promote(run, record, {"why": "second"}, models, Alias(), judged_against=first.folder.name, admit=check)
    assert second.folder is None
    assert second.refused.startswith(f"challenger not promoted: fitted on faces version {version_1[:12]}, which holds {PERSON}")
    assert sorted(p.name for p in models.iterdir() if p.is_dir()) == before
    assert leaderboard(models)[-1]["promoted"] is False and "which holds" in leaderboard(models)[-1]["why"]


def test_default_endpoints_come_from_the_version_and_a_forgotten_endpoint_is_refused_naming_the_field(tmp_path: Path, faces) -> None:
    store = olivetti(tmp_path / "faces", faces)
    forget_person(PERSON, False, store, places(tmp_path))
    rows = store.manifest(store.latest())
    labels = FaceLabels.of([r["image_id"] for r in rows], [r["person"] for r in rows])
    a, b = interpolation_endpoints(labels, FaceflowConfig())
    assert (labels.people[labels.target[a]], labels.people[labels.target[b]]) == ("olivetti-01", "olivetti-02")
    assert (a, b) == (0, 10)  # the first image of each
    forgotten = forgotten_endpoints(tmp_path / "models")
    with pytest.raises(FacesVersionError, match=f"interpolate.face_a: {PERSON} was forgotten by erasure 1; name another person"):
        check_config_against(labels, FaceflowConfig(interpolate={"face_a": f"{PERSON}:0"}), forgotten)
    erased = image_ids(faces.images[faces.target == 0])[4]
    with pytest.raises(FacesVersionError, match=f"interpolate.face_b: image '{erased[:10]}' is of a person who was forgotten by erasure 1"):
        check_config_against(labels, FaceflowConfig(interpolate={"face_b": erased[:10]}), forgotten)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["nobody"], "person 'nobody' is not in faces version"),
        (["../x"], "'../x' is not a valid name"),
        (["olivetti-00"], "person 'olivetti-00' was forgotten in faces version 2 already; --purge"),
        (["olivetti-05", "--verify"], "person 'olivetti-05' was never forgotten here"),
        (["olivetti-00", "--verify", "--purge"], "--verify changes nothing and --purge deletes"),
    ],
)
def test_bad_forget_input_is_one_line_and_changes_nothing(tmp_path: Path, faces, arguments: list[str], message: str) -> None:
    store = olivetti(tmp_path / "faces", faces)
    forget_person(PERSON, False, store, places(tmp_path))
    before = store_snapshot(tmp_path)
    env = {**os.environ, "FACEFLOW_FACES_DIR": str(store.root), "FACEFLOW_MODELS_DIR": str(tmp_path / "models"),
           "PREFECT_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run(faceflow("forget", *arguments), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("faceflow forget refused: ") and done.stderr.count("\n") == 1 and message in done.stderr
    shutil.rmtree(tmp_path / "home", ignore_errors=True)  # a server started for --verify keeps its database there
    assert store_snapshot(tmp_path) == before
