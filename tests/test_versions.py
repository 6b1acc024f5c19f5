"""The pipeline's view of a face store that grows: a split stable under growth, endpoints by person or id."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faceflow.config import DataConfig, FaceflowConfig
from tasks.data import FacesVersionError, interpolation_endpoints, open_faces, split_indices
from tasks.importers import read_input
from tasks.store import FaceStore

HELD_BACK = (3, 11, 22, 37)  # Olivetti people kept out of version 1, ingested as PNG folders in version 2
GROWN = "olivetti-00"  # a person of version 1 who gets 2 more photos in version 2


def _png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(path)


def grown_store(root: Path, faces) -> Path:
    """Version 1: Olivetti less 4 people. Version 2: those 4 as PNG folders and 2 more photos of olivetti-00."""
    store = FaceStore(root / "faces")
    kept = np.flatnonzero(~np.isin(faces.target, HELD_BACK))
    store.add(faces.images[kept], [faces.person_of(i) for i in kept], [f"olivetti[{i}]" for i in kept])
    incoming = root / "incoming"
    for person in HELD_BACK:
        for k, index in enumerate(np.flatnonzero(faces.target == person)):
            _png(incoming / f"olivetti-{person:02d}" / f"{k}.png", faces.images[index])
    for k, index in enumerate(np.flatnonzero(faces.target == 0)[:2]):
        _png(incoming / GROWN / f"mirrored-{k}.png", faces.images[index][:, ::-1])  # new photos: new ids
    read = read_input(incoming)
    assert store.add(read.images, read.people, read.sources).version.number == 2
    return store.root


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, faces) -> Path:
    return grown_store(tmp_path_factory.mktemp("grown"), faces)


def part_by_rule(image_id: str, config: DataConfig) -> str:
    """docs/data.md's rule: u = sha256("faceflow-split:<seed>:<id>") as a number in [0, 1); held-out below h, then validation."""
    digest = hashlib.sha256(f"faceflow-split:{config.split_seed}:{image_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < config.heldout_fraction:
        return "heldout"
    return "validation" if u < config.heldout_fraction + config.validation_fraction else "fit"


def parts_by_id(faces, config: DataConfig) -> dict[str, str]:
    split = split_indices(faces, config)
    return {faces.image_ids[i]: part for part in ("fit", "validation", "heldout") for i in getattr(split, part)}


@pytest.mark.parametrize("config", [DataConfig(), DataConfig(validation_fraction=0.1), DataConfig(split_seed=7, heldout_fraction=0.3)])
def test_adding_people_and_photos_moves_no_existing_image_to_another_part(store: Path, config: DataConfig) -> None:
    first, second = open_faces(None, "1", store), open_faces(None, "2", store)
    assert len(second.people) == len(first.people) + 4 and len(second.images) == len(first.images) + 42
    before, after = parts_by_id(first, config), parts_by_id(second, config)
    assert set(before) < set(after)
    moved = {identity: (part, after[identity]) for identity, part in before.items() if after[identity] != part}
    assert not moved
    # The grown person's 2 new photos take parts of their own; the 10 old ones keep theirs.
    grown = {second.image_ids[i] for i in range(len(second.images)) if second.person_of(i) == GROWN}
    old = {first.image_ids[i] for i in range(len(first.images)) if first.person_of(i) == GROWN}
    assert len(old) == 10 and old < grown and len(grown - old) == 2
    assert {identity: after[identity] for identity in old} == {identity: before[identity] for identity in old}
    # Every image's part, old or new, is the one its own id gives (docs/data.md), computed here from that rule alone.
    assert after == {identity: part_by_rule(identity, config) for identity in second.image_ids}


def test_faces_name_their_version_and_key_by_its_id(store: Path) -> None:
    latest, second = open_faces(None, "latest", store), open_faces(None, "2", store)
    assert latest.version == second.version and latest.key == second.key and latest.version_number == 2
    assert open_faces(None, second.version[:8], store).key == second.key
    assert open_faces(None, "1", store).key != second.key


def test_an_unknown_version_is_refused_naming_the_field(store: Path) -> None:
    for reference in ("3", "abcdef12", "yesterday"):
        with pytest.raises(FacesVersionError, match=r"^data\.faces_version: faces version"):
            open_faces(None, reference, store)


def test_endpoints_by_person_index_and_by_id(store: Path) -> None:
    faces = open_faces(None, "2", store)
    a, b = interpolation_endpoints(faces, FaceflowConfig(interpolate={"face_a": "olivetti-11:2", "face_b": "olivetti-00:11"}))
    assert faces.person_of(a) == "olivetti-11" and faces.person_of(b) == GROWN
    assert a == np.flatnonzero(faces.target == faces.people.index("olivetti-11"))[2]
    assert b == np.flatnonzero(faces.target == faces.people.index(GROWN))[11]  # the second new photo
    by_id = FaceflowConfig(interpolate={"face_a": faces.image_ids[a], "face_b": faces.image_ids[b][:10]})
    assert interpolation_endpoints(faces, by_id) == (a, b)


@pytest.mark.parametrize(
    ("endpoints", "message"),
    [
        ({"face_a": "olivetti-11:0", "face_b": "olivetti-11:3"}, "both person olivetti-11"),
        ({"face_a": "olivetti-11:10"}, "interpolate.face_a: olivetti-11 has 10 images"),
        ({"face_b": "olivetti-40:0"}, "interpolate.face_b: no person 'olivetti-40'"),
        ({"face_b": "0123456789abcdef"}, "interpolate.face_b: '0123456789abcdef' is no image id"),
    ],
)
def test_bad_endpoints_are_refused_naming_the_field(store: Path, endpoints: dict, message: str) -> None:
    faces = open_faces(None, "2", store)
    with pytest.raises(FacesVersionError, match=message):
        interpolation_endpoints(faces, FaceflowConfig(interpolate=endpoints))


def test_an_endpoint_of_a_person_only_in_version_2_is_refused_on_version_1(store: Path) -> None:
    config = FaceflowConfig(interpolate={"face_b": "olivetti-22:0"})
    assert interpolation_endpoints(open_faces(None, "2", store), config)
    with pytest.raises(FacesVersionError, match="interpolate.face_b: no person 'olivetti-22'"):
        interpolation_endpoints(open_faces(None, "1", store), config)
