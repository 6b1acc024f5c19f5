"""The face store: content-addressed images, immutable versions, one writer at a time, no partial version."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from support import store_snapshot
from tasks.data import open_store
from tasks.store import FaceStore, StoreError, UnknownVersionError, image_id

REPO_ROOT = Path(__file__).resolve().parent.parent


def new_faces(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 64, 64), dtype=np.float32)


def test_first_use_makes_the_olivetti_faces_version_1(tmp_path: Path, data_file: Path, faces) -> None:
    store, version = open_store(tmp_path / "faces", data_file)
    assert (version.number, version.images, version.people, version.added, version.parent) == (1, 400, 40, 400, None)
    read = store.read(version)
    assert np.array_equal(read.images, faces.images)  # exactly the arrays the pipeline has always read
    assert read.people == tuple(f"olivetti-{t:02d}" for t in faces.target)
    assert read.image_ids == tuple(image_id(image) for image in faces.images)
    manifest = tmp_path / "faces" / "versions" / version.id / "manifest.csv"
    assert version.id == hashlib.sha256(manifest.read_bytes()).hexdigest()  # named by its content
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    assert list(table.columns) == ["image_id", "person", "source", "added_in", "shard", "row"]
    assert table["person"].nunique() == 40 and set(table["added_in"]) == {"1"}
    assert (tmp_path / "faces" / "LATEST").read_text().strip() == version.id
    before = store_snapshot(tmp_path / "faces")
    assert open_store(tmp_path / "faces", data_file)[1] == version  # a second use adds nothing
    assert store_snapshot(tmp_path / "faces") == before
    # Version 1's id depends on the faces, not on where the store or the data file is.
    assert open_store(tmp_path / "elsewhere", data_file)[1].id == version.id


def test_a_version_adds_only_new_images_and_leaves_the_previous_one_as_it_was(tmp_path: Path) -> None:
    store = FaceStore(tmp_path / "faces")
    first_images = new_faces(20, 0)
    first = store.add(first_images, [f"p{i % 4}" for i in range(20)], [f"a[{i}]" for i in range(20)]).version
    assert first is not None and first.number == 1
    first_files = store_snapshot(tmp_path / "faces" / "versions" / first.id)

    fresh = new_faces(5, 1)
    offered = np.concatenate([first_images[:3], fresh, fresh[:1]])  # 3 held already, 5 new, 1 repeated
    people = ["p0", "p1", "p9", "p0", "p2", "new-person", "new-person", "new-person"][: len(offered) - 1] + ["p0"]
    result = store.add(offered, people, [f"b[{i}]" for i in range(len(offered))])
    second = result.version
    assert second is not None and (second.number, second.parent) == (2, first.id)
    assert (result.added, result.duplicates, result.repeated) == (5, 3, 1)
    assert (second.images, second.added, second.duplicates) == (25, 5, 4)
    read = store.read(second)
    assert np.array_equal(read.images, np.concatenate([first_images, fresh]))
    assert read.added_in.tolist() == [1] * 20 + [2] * 5
    # Each image once on disk: the shards hold exactly the 25 distinct images.
    stored = sum(len(np.load(shard)) for shard in (tmp_path / "faces" / "images").glob("*.npy"))
    assert stored == 25
    assert store_snapshot(tmp_path / "faces" / "versions" / first.id) == first_files  # immutable
    assert np.array_equal(store.read(first).images, first_images)
    assert store.verify(second) == []

    again = store.add(fresh, ["x"] * 5, ["c"] * 5)  # nothing new: no version
    assert again.version is None and again.duplicates == 5 and store.latest() == second


def test_versions_are_found_by_number_id_prefix_or_latest_and_an_unknown_one_is_named(tmp_path: Path) -> None:
    store = FaceStore(tmp_path / "faces")
    with pytest.raises(UnknownVersionError, match="holds no version"):
        store.resolve(None)
    first = store.add(new_faces(4, 0), ["a", "a", "b", "b"], list("wxyz")).version
    second = store.add(new_faces(4, 1), ["c"] * 4, list("wxyz")).version
    assert store.resolve(None) == store.resolve("latest") == store.resolve("2") == second
    assert store.resolve(first.id[:8]) == store.resolve(first.id) == store.resolve("v1") == first
    for unknown in ("3", "deadbeef00", "abc"):
        with pytest.raises(UnknownVersionError, match=f"'{unknown}' is not a version"):
            store.resolve(unknown)


@pytest.mark.parametrize(
    "problem, match",
    [
        ("nan", r"image 2 \(s\[2\]\): holds NaN"),
        ("constant", r"image 1 \(s\[1\]\): every pixel is 0.5, a constant image"),
        ("range", r"image 0 \(s\[0\]\): pixels outside \[0, 1\]"),
        ("label", r"image 3 \(s\[3\]\): person label 'bad name/' is not a valid name"),
        ("empty-label", r"image 3 \(s\[3\]\): person label empty is not a valid name"),
        ("lengths", r"4 images, 3 people and 4 sources"),
        ("shape", r"images have shape \(4, 32, 32\)"),
    ],
)
def test_bad_images_or_labels_are_refused_and_the_store_is_unchanged(tmp_path: Path, problem: str, match: str) -> None:
    store = FaceStore(tmp_path / "faces")
    store.add(new_faces(4, 0), ["a"] * 4, ["first"] * 4)
    before = store_snapshot(tmp_path / "faces")
    images, people = new_faces(4, 1), ["b", "b", "b", "b"]
    if problem == "nan":
        images[2, 5, 5] = np.nan
    elif problem == "constant":
        images[1] = 0.5
    elif problem == "range":
        images[0, 0, 0] = 1.5
    elif problem == "label":
        people[3] = "bad name/"
    elif problem == "empty-label":
        people[3] = ""
    elif problem == "lengths":
        people = people[:3]
    elif problem == "shape":
        images = images[:, :32, :32]
    with pytest.raises(StoreError, match=match):
        store.add(images, people, [f"s[{i}]" for i in range(4)])
    assert store_snapshot(tmp_path / "faces") == before


ADD_IN_A_CHILD = """
import signal, resource, sys
import numpy as np
from pathlib import Path
from tasks.store import FaceStore
root, n, seed, limit = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if limit:  # a full disk, for real: writes past `limit` bytes fail with EFBIG
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
images = np.random.default_rng(seed).random((n, 64, 64), dtype=np.float32)
result = FaceStore(root).add(images, [f"child-{seed}-{i % 7}" for i in range(n)], [f"child{seed}[{i}]" for i in range(n)])
print(result.version.number, result.added)
"""


def _child(root: Path, n: int, seed: int, limit: int = 0) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", ADD_IN_A_CHILD, str(root), str(n), str(seed), str(limit)],
        env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_a_full_disk_during_an_ingest_leaves_no_partial_version(tmp_path: Path) -> None:
    store = FaceStore(tmp_path / "faces")
    store.add(new_faces(4, 0), ["a"] * 4, ["first"] * 4)
    before = store_snapshot(tmp_path / "faces")
    child = _child(tmp_path / "faces", 200, 1, limit=1 << 20)  # a 3.3 MB shard, 1 MB of room
    _, error = child.communicate(timeout=120)
    assert child.returncode != 0 and "File too large" in error, error
    assert store_snapshot(tmp_path / "faces") == before
    assert [v.number for v in store.versions()] == [1]
    assert store.add(new_faces(3, 2), ["b"] * 3, ["next"] * 3).version.number == 2  # the next writer is not blocked


def test_a_writer_killed_mid_ingest_leaves_no_partial_version(tmp_path: Path) -> None:
    store = FaceStore(tmp_path / "faces")
    store.add(new_faces(4, 0), ["a"] * 4, ["first"] * 4)
    child = _child(tmp_path / "faces", 5000, 1)  # an 82 MB shard: the kill lands while it is written
    staging = tmp_path / "faces" / ".staging"
    deadline = time.monotonic() + 120
    while not any(staging.glob("*/*.npy")) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # poll interval of the bounded wait (120 s) for the staged shard file
    assert child.poll() is None, "the child finished before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    assert [v.number for v in store.versions()] == [1] and store.latest().number == 1
    nxt = store.add(new_faces(3, 2), ["b"] * 3, ["next"] * 3).version
    assert nxt.number == 2 and nxt.images == 7
    assert not any(staging.iterdir()) if staging.exists() else True  # the next writer cleared what the kill left
    assert len(list((tmp_path / "faces" / "images").glob("*.npy"))) == 2


DIE_BEFORE_THE_POINTER = """
import os, signal, sys
import numpy as np
from pathlib import Path
import tasks.store
from tasks.store import FaceStore
write_file = tasks.store.write_file

def dying_write(path, data):  # the writer dies of SIGKILL between its commit (the version folder) and the pointer
    if Path(path).name == "LATEST":
        os.kill(os.getpid(), signal.SIGKILL)
    write_file(path, data)

tasks.store.write_file = dying_write
FaceStore(Path(sys.argv[1])).add(np.random.default_rng(1).random((3, 64, 64), dtype=np.float32), ["b"] * 3, ["second"] * 3)
"""


def test_a_writer_killed_between_its_commit_and_the_pointer_leaves_latest_right_and_the_next_writer_repairs_it(
    tmp_path: Path,
) -> None:
    root = tmp_path / "faces"
    store = FaceStore(root)
    first = store.add(new_faces(4, 0), ["a"] * 4, ["first"] * 4).version
    child = subprocess.run([sys.executable, "-c", DIE_BEFORE_THE_POINTER, str(root)], env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    second = store.resolve("2")  # committed: its folder is in place, whole
    assert (root / "LATEST").read_text().strip() == first.id  # the pointer was left one behind
    # Readers go by the version folders, not by the stale pointer.
    assert store.latest() == second and store.resolve("latest") == second
    # The next writer, holding the lock, repairs the pointer even when it writes no version of its own.
    assert store.add(new_faces(4, 0), ["a"] * 4, ["first"] * 4).version is None
    assert (root / "LATEST").read_text().strip() == second.id


def test_two_ingests_at_once_both_land(tmp_path: Path) -> None:
    store = FaceStore(tmp_path / "faces")
    store.add(new_faces(4, 0), ["a"] * 4, ["first"] * 4)
    children = [_child(tmp_path / "faces", 3000, seed) for seed in (1, 2)]
    outputs = [child.communicate(timeout=300) for child in children]
    assert [child.returncode for child in children] == [0, 0], outputs
    assert sorted(int(out.split()[0]) for out, _ in outputs) == [2, 3]
    latest = store.latest()
    assert (latest.number, latest.images) == (3, 6004)
    ids = set(store.read(latest).image_ids)
    for seed in (1, 2):
        assert {image_id(image) for image in new_faces(3000, seed)} <= ids
