"""`faceflow ingest` and `faceflow faces` with real files: PNG/JPEG folders, .npz, .mat, and every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support import store_snapshot, write_png
from tasks.store import FaceStore, image_id

REPO_ROOT = Path(__file__).resolve().parent.parent
HELD_BACK = (3, 11, 22, 37)  # Olivetti people kept out of version 1, ingested as PNG folders


def faceflow(*arguments: str, store: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "FACEFLOW_FACES_DIR": str(store)}
    return subprocess.run(
        [sys.executable, "-m", "commands.cli", *arguments], env=environment, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def store(tmp_path: Path, faces) -> Path:
    """A store whose version 1 is the Olivetti faces less the held-back people."""
    kept = ~np.isin(faces.target, HELD_BACK)
    indices = np.flatnonzero(kept)
    FaceStore(tmp_path / "faces").add(
        faces.images[kept], [f"olivetti-{faces.target[i]:02d}" for i in indices], [f"olivetti[{i}]" for i in indices]
    )
    return tmp_path / "faces"


def test_people_held_back_from_version_1_arrive_as_png_folders_in_version_2(tmp_path: Path, store: Path, faces) -> None:
    expected: dict[str, str] = {}  # image id -> person
    for person in HELD_BACK:
        for k, index in enumerate(np.flatnonzero(faces.target == person)):
            read_back = write_png(tmp_path / "new" / f"olivetti-{person:02d}" / f"{k}.png", faces.images[index])
            expected[image_id(read_back)] = f"olivetti-{person:02d}"
    first = FaceStore(store).latest()
    first_files = store_snapshot(store / "versions" / first.id)

    done = faceflow("ingest", str(tmp_path / "new"), "--json", store=store)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.splitlines()[-1])
    assert (answer["added"], answer["duplicates"], answer["converted"]) == (40, 0, 0)
    second = FaceStore(store).resolve("2")
    assert (second.images, second.people, second.added, second.parent) == (400, 40, 40, first.id)
    read = FaceStore(store).read(second)
    arrived = {i: p for i, p, n in zip(read.image_ids, read.people, read.added_in) if n == 2}
    assert arrived == expected  # ids are the sha256 of the decoded pixels, people the folder names
    assert read.image_ids[:360] == FaceStore(store).read(first).image_ids  # the old images keep their place
    assert store_snapshot(store / "versions" / first.id) == first_files

    again = faceflow("ingest", str(tmp_path / "new"), store=store)  # exact duplicates: skipped, counted, no version
    assert again.returncode == 0 and "nothing new: all 40 images are already in version 2" in again.stdout
    listing = faceflow("faces", "--json", store=store)
    assert [(v["number"], v["images"], v["added"]) for v in json.loads(listing.stdout)] == [(1, 360, 360), (2, 400, 40)]
    people = faceflow("faces", "2", "--json", store=store)
    assert json.loads(people.stdout)["people"]["olivetti-37"] == 10


def test_colour_and_other_sizes_are_converted_and_said_per_file_or_refused_with_no_resize(tmp_path: Path, store: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "in" / "ann").mkdir(parents=True)
    Image.fromarray((rng.random((112, 92, 3)) * 255).astype(np.uint8)).save(tmp_path / "in" / "ann" / "a.jpg")
    write_png(tmp_path / "in" / "ann" / "b.png", rng.random((64, 64)))
    before = store_snapshot(store)
    refused = faceflow("ingest", str(tmp_path / "in"), "--no-resize", store=store)
    assert refused.returncode == 2 and "a.jpg: is 92x112, not 64x64" in refused.stderr
    assert store_snapshot(store) == before
    done = faceflow("ingest", str(tmp_path / "in"), store=store)
    assert done.returncode == 0, done.stderr
    assert f"{tmp_path / 'in' / 'ann' / 'a.jpg'}: converted RGB to grayscale, resized 92x112 to 64x64" in done.stderr
    assert "b.png" not in done.stderr  # nothing was done to it, nothing is said
    assert FaceStore(store).latest().people == 37


def test_an_npz_and_an_olivetti_layout_mat_are_ingested(tmp_path: Path, store: Path, data_file: Path) -> None:
    images = np.random.default_rng(1).random((6, 64, 64), dtype=np.float32)
    np.savez(tmp_path / "more.npz", images=images, people=np.array(["kim", "kim", "lee", "lee", "lee", "kim"]))
    done = faceflow("ingest", str(tmp_path / "more.npz"), store=store)
    assert done.returncode == 0, done.stderr
    version = FaceStore(store).latest()
    assert (version.number, version.images, version.people) == (2, 366, 38)
    assert FaceStore(store).read(version).sources[-1] == "more.npz[5]"
    # The Olivetti file itself: the 360 faces already held are skipped, the 40 held back arrive.
    done = faceflow("ingest", str(data_file), store=store)
    assert done.returncode == 0, done.stderr
    assert "40 added, 360 duplicates skipped" in done.stdout
    assert FaceStore(store).latest().images == 406


def test_a_duplicate_offered_under_another_name_keeps_its_stored_name_and_is_reported(tmp_path: Path, store: Path, faces) -> None:
    stored = faces.images[0]  # olivetti-00's first image, in version 1
    new = np.random.default_rng(4).random((64, 64), dtype=np.float32)
    np.savez(tmp_path / "bob.npz", images=np.stack([stored, new]), people=np.array(["bob", "bob"]))
    done = faceflow("ingest", str(tmp_path / "bob.npz"), store=store)
    assert done.returncode == 0, done.stderr
    assert "1 duplicates carry another person's name here; the stored name stays" in done.stderr
    assert "1 added, 1 duplicates skipped" in done.stdout
    rows = {row["image_id"]: row for row in FaceStore(store).manifest(FaceStore(store).latest())}
    assert rows[image_id(stored)]["person"] == "olivetti-00" and rows[image_id(stored)]["added_in"] == "1"
    assert rows[image_id(new)]["person"] == "bob"
    assert sum(row["person"] == "bob" for row in rows.values()) == 1


def _pgm(path: Path, levels: np.ndarray, maxval: int) -> None:
    """A binary (P5) PGM written byte by byte: 8-bit levels, or 16-bit big-endian ones."""
    body = levels.astype(">u2" if maxval > 255 else "u1").tobytes()
    path.write_bytes(f"P5\n{levels.shape[1]} {levels.shape[0]}\n{maxval}\n".encode() + body)


def test_16_bit_png_and_pgm_any_suffix_case_and_dot_files_skipped(tmp_path: Path, store: Path) -> None:
    """docs/data.md: .png .jpg .jpeg .pgm in any case; 8-bit levels / 255, 16-bit / 65535; names starting with '.' skipped."""
    rng = np.random.default_rng(5)
    ann = tmp_path / "in" / "ann"
    ann.mkdir(parents=True)
    eight = [rng.integers(0, 256, size=(64, 64), dtype=np.uint8) for _ in range(4)]
    sixteen = [rng.integers(0, 65536, size=(64, 64), dtype=np.uint16) for _ in range(2)]
    Image.fromarray(eight[0]).save(ann / "a.PNG")
    _pgm(ann / "b.pgm", eight[1], 255)
    _pgm(ann / "c.PGM", sixteen[0], 65535)
    Image.fromarray(sixteen[1]).save(ann / "d.png")  # Pillow writes uint16 as a 16-bit grayscale PNG
    Image.fromarray(eight[2]).save(ann / "e.JPG", quality=95)
    Image.fromarray(eight[3]).save(ann / "f.Jpeg", quality=95)
    # What a desktop leaves behind, none of it an image: every one would be refused if it were read.
    (ann / "._a.PNG").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (ann / ".thumbnails").mkdir()
    (tmp_path / "in" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "in" / ".cache").mkdir()
    (tmp_path / "in" / ".cache" / "notes.txt").write_text("not a person")

    done = faceflow("ingest", str(tmp_path / "in"), "--json", store=store)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.splitlines()[-1])
    assert (answer["added"], answer["duplicates"], answer["converted"], answer["new_people"]) == (6, 0, 0, ["ann"])
    read = FaceStore(store).read(FaceStore(store).latest())
    arrived = {source: image for source, image, n in zip(read.sources, read.images, read.added_in) if n == 2}
    assert sorted(arrived) == [f"in/ann/{name}" for name in ("a.PNG", "b.pgm", "c.PGM", "d.png", "e.JPG", "f.Jpeg")]
    exact = {"a.PNG": eight[0] / np.float32(255), "b.pgm": eight[1] / np.float32(255),
             "c.PGM": sixteen[0] / np.float32(65535), "d.png": sixteen[1] / np.float32(65535)}
    for name, expected in exact.items():
        np.testing.assert_array_equal(arrived[f"in/ann/{name}"], expected.astype(np.float32), err_msg=name)
    for name, levels in (("e.JPG", eight[2]), ("f.Jpeg", eight[3])):  # lossy: near the levels written, / 255
        assert np.abs(arrived[f"in/ann/{name}"] - levels / 255.0).mean() < 0.05, name


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path to ingest, what the one-line error must name)."""
    good = np.random.default_rng(2).random((64, 64))
    cases: dict[str, tuple[Path, str]] = {}

    def person(case: str, name: str = "pat") -> Path:
        folder = tmp / case / name
        folder.mkdir(parents=True)
        write_png(folder / "ok.png", good)
        return folder

    (person("not-an-image") / "notes.png").write_text("this is not a PNG")
    cases["not-an-image"] = (tmp / "not-an-image", "notes.png: not a readable image")
    (person("wrong-suffix") / "notes.txt").write_text("hello")
    cases["wrong-suffix"] = (tmp / "wrong-suffix", "notes.txt: not an image")
    folder = person("truncated")
    whole = (folder / "ok.png").read_bytes()
    (folder / "cut.png").write_bytes(whole[: len(whole) // 2])
    cases["truncated"] = (tmp / "truncated", "cut.png: cannot be decoded")
    folder = person("bad-jpeg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 200)
    cases["bad-jpeg"] = (tmp / "bad-jpeg", "broken.jpg")
    (tmp / "empty").mkdir()
    cases["empty"] = (tmp / "empty", "empty: empty folder")
    person("empty-person")
    (tmp / "empty-person" / "nobody").mkdir()
    cases["empty-person"] = (tmp / "empty-person", "nobody: empty folder; expected images of nobody")
    person("file-not-folder")
    write_png(tmp / "file-not-folder" / "loose.png", good)
    cases["file-not-folder"] = (tmp / "file-not-folder", "loose.png: a file where a folder of one person's images is expected")
    person("bad-label", "bad name!")
    cases["bad-label"] = (tmp / "bad-label", "person label 'bad name!' is not a valid name")
    folder = person("constant")
    Image.fromarray(np.full((64, 64), 128, dtype=np.uint8)).save(folder / "grey.png")
    cases["constant"] = (tmp / "constant", "grey.png: every pixel is")
    images = np.random.default_rng(3).random((4, 64, 64), dtype=np.float32)
    np.savez(tmp / "lengths.npz", images=images, people=np.array(["a", "b", "c"]))
    cases["lengths"] = (tmp / "lengths.npz", "lengths.npz: field 'people' has shape (3,) but 'images' holds 4 images")
    nan = images.copy()
    nan[2, 1, 1] = np.nan
    np.savez(tmp / "nan.npz", images=nan, people=np.array(["a"] * 4))
    cases["nan"] = (tmp / "nan.npz", "nan.npz: field 'images'[2]: holds NaN")
    np.savez(tmp / "label.npz", images=images, people=np.array(["a", "", "b", "c"]))
    cases["npz-label"] = (tmp / "label.npz", "label.npz: field 'people'[1]: person label empty")
    np.savez(tmp / "nopeople.npz", images=images)
    cases["npz-field"] = (tmp / "nopeople.npz", "nopeople.npz: no field 'people'")
    cases["missing"] = (tmp / "no-such-thing", "no-such-thing: does not exist")
    return cases


def test_every_bad_input_is_one_line_naming_it_exit_2_and_the_store_unchanged(tmp_path: Path, store: Path) -> None:
    before = store_snapshot(store)
    for case, (path, named) in _bad_inputs(tmp_path / "bad").items():
        refused = faceflow("ingest", str(path), store=store)
        assert refused.returncode == 2, (case, refused.stdout, refused.stderr)
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("faceflow ingest refused: ") and named in lines[0], (case, lines)
        assert store_snapshot(store) == before, case
    refused = faceflow("faces", "9", store=store)
    assert refused.returncode == 2 and "faces version '9' is not a version" in refused.stderr


def test_bad_input_to_an_empty_store_does_not_even_make_version_1(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    refused = faceflow("ingest", str(tmp_path / "empty"), store=tmp_path / "faces")
    assert refused.returncode == 2 and not (tmp_path / "faces").exists()
