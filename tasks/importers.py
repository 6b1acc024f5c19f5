"""What can be ingested into the face store, read and checked before the store is touched.

Three layouts: a folder with one sub-folder of images per person (PNG, JPEG, PGM; the
ImageFolder convention), an ``.npz`` with ``images`` (n, 64, 64) and ``people`` (n,), and a
``.mat`` in the Olivetti layout (``faces``: 4096 x n, one image per column). The Olivetti faces
themselves are one more importer: they become version 1 on first use. Every problem is one line
naming the file or field (``IngestError``); nothing is written until a whole input has read clean.

Sizes are bounded before anything is decoded: an image file over MAX_IMAGE_BYTES, or whose
header announces over MAX_IMAGE_PIXELS, and an .npz or .mat whose headers announce over
MAX_ARCHIVE_BYTES of arrays, are refused from their headers alone. With ``root`` (the inbox, for
a run a deployment started) every path read, symlinks resolved, must lie inside it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from faceflow.arrays import ArchiveError, announced_arrays, size_text
from faceflow.confinement import ConfinementError, confined
from faceflow.settings import INBOX_DIR_VARIABLE
from tasks.data import open_store
from tasks.olivetti import OLIVETTI_IMAGES_PER_PERSON, DataFileError, checked_faces_array
from tasks.store import IMAGE_SHAPE, AddResult, StoreError, check_images, check_person

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm")
# A face is 64x64: larger photos are resized, up to 4096x4096 (16.8 megapixels) and 32 MiB a file.
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_IMAGE_BYTES = 32 * 2**20
# What one .npz or .mat may announce, all its arrays together: 2 GiB, over 130,000 float32 faces.
MAX_ARCHIVE_BYTES = 2 * 2**30
# Bytes per element of each MATLAB class scipy's whosmat names (others count 8).
_MATLAB_ITEMSIZE = {"double": 8, "single": 4, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4,
                    "int64": 8, "uint64": 8, "logical": 1, "char": 2}


class IngestError(StoreError):
    """An input that cannot be ingested; the message names the file or field."""


@dataclass
class Incoming:
    """Checked images on their way into the store, and what was done to them on the way."""

    images: np.ndarray  # (n, 64, 64) float32 in [0, 1]
    people: list[str]
    sources: list[str]  # where each image came from, as recorded in the manifest
    notes: list[str] = field(default_factory=list)  # one line per converted or resized file


def read_input(path: Path, resize: bool = True, root: Path | None = None) -> Incoming:
    """The images of ``path`` (a folder of people, an .npz or a .mat), checked; IngestError otherwise.

    With ``root``, ``path`` (relative: to ``root``) and everything read under it must lie inside ``root``.
    """
    path = Path(path)
    if root is not None:
        path = _inside(path, root, relative=True)
    if not path.exists():
        raise IngestError(f"{path}: does not exist")
    if path.is_dir():
        return read_folder(path, resize, root)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return read_npz(path)
    if suffix == ".mat":
        return read_mat(path)
    raise IngestError(f"{path}: expected a folder with one sub-folder of images per person, an .npz or a .mat")


def _inside(path: Path, root: Path, relative: bool = False) -> Path:
    try:
        return confined(path, root, "path", INBOX_DIR_VARIABLE, relative_to=root if relative else None)
    except ConfinementError as error:
        raise IngestError(str(error)) from None


def read_folder(root: Path, resize: bool = True, inbox: Path | None = None) -> Incoming:
    """One sub-folder per person, named by the person; hidden files (a leading '.') are skipped.

    With ``inbox``, every sub-folder and file must resolve inside it (no symlink out).
    """
    entries = sorted(entry for entry in root.iterdir() if not entry.name.startswith("."))
    if not entries:
        raise IngestError(f"{root}: empty folder; expected one sub-folder of images per person")
    images, people, sources, notes = [], [], [], []
    for person_folder in entries:
        if inbox is not None:
            _inside(person_folder, inbox)
        if not person_folder.is_dir():
            raise IngestError(f"{person_folder}: a file where a folder of one person's images is expected")
        person = _checked(lambda: check_person(person_folder.name, f"{person_folder}"))
        files = sorted(entry for entry in person_folder.iterdir() if not entry.name.startswith("."))
        if not files:
            raise IngestError(f"{person_folder}: empty folder; expected images of {person}")
        for file in files:
            if inbox is not None:
                _inside(file, inbox)
            image, note = read_image(file, resize)
            images.append(image)
            people.append(person)
            sources.append(f"{root.name}/{person_folder.name}/{file.name}")
            if note:
                notes.append(f"{file}: {note}")
    return Incoming(np.stack(images), people, sources, notes)


def read_image(file: Path, resize: bool = True) -> tuple[np.ndarray, str]:
    """One image as 64x64 float32 in [0, 1], and what was done to it ('' when nothing)."""
    from PIL import Image, UnidentifiedImageError

    if file.is_dir():
        raise IngestError(f"{file}: a folder where an image is expected")
    if file.suffix.lower() not in IMAGE_SUFFIXES:
        raise IngestError(f"{file}: not an image (expected {', '.join(IMAGE_SUFFIXES)})")
    size = file.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise IngestError(f"{file}: {size:,} bytes; image files over {MAX_IMAGE_BYTES:,} bytes are refused")
    done = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a hostile size is refused, not decoded
            # Pillow's own limit, checked on the header when the file is opened: warned above it (an
            # error here), refused at twice it. faceflow's is lower than Pillow's 89 megapixels.
            Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
            with Image.open(file) as opened:
                opened.load()  # decodes now: a truncated or corrupt file fails here, not later
                mode, size = opened.mode, opened.size
                if mode.startswith("I;16") or mode == "I":  # 16-bit grayscale (PNG, PGM)
                    pixels = np.asarray(opened, dtype=np.float32) / 65535.0
                else:
                    if mode != "L":
                        done.append(f"converted {mode} to grayscale")
                        opened = opened.convert("L")
                    pixels = np.asarray(opened, dtype=np.float32) / 255.0
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise IngestError(f"{file}: refused before decoding ({error}); images over {MAX_IMAGE_PIXELS:,} pixels "
                          "(4096x4096) are refused") from None
    except UnidentifiedImageError:
        raise IngestError(f"{file}: not a readable image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise IngestError(f"{file}: cannot be decoded ({error})") from None
    if size != IMAGE_SHAPE[::-1]:
        if not resize:
            raise IngestError(f"{file}: is {size[0]}x{size[1]}, not 64x64 (--no-resize refuses instead of resizing)")
        resized = Image.fromarray(pixels).resize(IMAGE_SHAPE[::-1], Image.Resampling.LANCZOS)
        pixels = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)  # Lanczos overshoots at edges
        done.append(f"resized {size[0]}x{size[1]} to 64x64")
    _checked(lambda: check_images(pixels[None], lambda _: str(file)))
    return pixels, ", ".join(done)


def read_npz(path: Path) -> Incoming:
    """``images`` (n, 64, 64) in [0, 1] (uint8: 0..255) and ``people`` (n,) labels; sized from its headers first."""
    try:
        announced_arrays(path, str(path), MAX_ARCHIVE_BYTES)
    except ArchiveError as error:
        raise IngestError(str(error)) from None
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as error:  # numpy raises BadZipFile, ValueError, OSError, EOFError
        raise IngestError(f"{path}: not a readable .npz ({str(error) or type(error).__name__})") from None
    with archive:
        missing = [name for name in ("images", "people") if name not in archive.files]
        if missing:
            raise IngestError(f"{path}: no field {missing[0]!r} (it holds {', '.join(archive.files) or 'nothing'})")
        try:
            images, people = archive["images"], archive["people"]
        except ValueError as error:  # an object array, which would need pickle
            raise IngestError(f"{path}: a field needs pickle to read ({error}); save strings and numbers only") from None
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise IngestError(f"{path}: field 'images' has shape {images.shape}; expected (n, 64, 64)")
    if people.ndim != 1 or len(people) != len(images):
        raise IngestError(f"{path}: field 'people' has shape {people.shape} but 'images' holds {len(images)} images; expected ({len(images)},)")
    if len(images) == 0:
        raise IngestError(f"{path}: field 'images' holds no image")
    notes = []
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
        notes.append(f"{path}: field 'images' is uint8, divided by 255")
    elif not np.issubdtype(images.dtype, np.floating):
        raise IngestError(f"{path}: field 'images' holds {images.dtype}; expected floats in [0, 1] or uint8")
    images = _checked(lambda: check_images(images.astype(np.float32), lambda i: f"{path}: field 'images'" + (f"[{i}]" if i >= 0 else "")))
    names = [_checked(lambda: check_person(name, f"{path}: field 'people'[{i}]")) for i, name in enumerate(people.tolist())]
    return Incoming(images, names, [f"{path.name}[{i}]" for i in range(len(images))], notes)


def read_mat(path: Path) -> Incoming:
    """A .mat in the Olivetti layout: ``faces`` 4096 x n, 10 consecutive images per person, named <file>-NN."""
    _check_mat_size(path)
    try:
        raw = checked_faces_array(path, columns=None)
    except DataFileError as error:
        raise IngestError(str(error)) from None
    n = raw.shape[1]
    if n % OLIVETTI_IMAGES_PER_PERSON:
        raise IngestError(
            f"{path}: field 'faces' holds {n} images; the Olivetti layout has {OLIVETTI_IMAGES_PER_PERSON} per person"
        )
    images = _olivetti_normalised(raw)
    prefix = _checked(lambda: check_person(path.stem, f"{path} (its name gives the people's names)"))
    people = [f"{prefix}-{i // OLIVETTI_IMAGES_PER_PERSON:02d}" for i in range(n)]
    images = _checked(lambda: check_images(images, lambda i: f"{path}: field 'faces'" + (f" column {i}" if i >= 0 else "")))
    return Incoming(images, people, [f"{path.name}[{i}]" for i in range(n)])


def _check_mat_size(path: Path) -> None:
    """Refuse a .mat whose variable headers announce over MAX_ARCHIVE_BYTES, before any is decompressed."""
    import scipy.io

    if not path.is_file():
        return  # checked_faces_array names what is wrong
    try:
        variables = scipy.io.whosmat(path)
    except Exception as error:  # scipy's readers raise many kinds
        raise IngestError(f"{path}: not a readable MATLAB .mat file ({str(error) or type(error).__name__})") from None
    total = 0
    for name, shape, kind in variables:
        total += math.prod(shape) * _MATLAB_ITEMSIZE.get(kind, 8)
        if total > MAX_ARCHIVE_BYTES:
            raise IngestError(f"{path}: its headers announce {size_text(total)} of arrays or more (variable {name!r}: "
                              f"shape {shape}, {kind}); the limit is {size_text(MAX_ARCHIVE_BYTES)}")


def _olivetti_normalised(raw: np.ndarray) -> np.ndarray:
    """As scikit-learn's fetch_olivetti_faces: global min-max to [0, 1], each column a transposed 64x64 image."""
    faces = raw.T.astype(np.float32)
    faces -= faces.min()
    faces /= faces.max()
    return np.ascontiguousarray(faces.reshape(len(faces), *IMAGE_SHAPE).transpose(0, 2, 1))


@dataclass(frozen=True)
class Ingested:
    """What one ingest did, and what the dataset card shows of it."""

    result: AddResult
    notes: list[str]  # one line per converted or resized file
    people_counts: dict[str, int]  # images per person in the version now latest
    new_people: list[str]  # people the new version brought
    new_images: np.ndarray  # (up to MONTAGE_LIMIT, 64, 64): the images the new version added


MONTAGE_LIMIT = 64  # the card shows at most this many of the new faces


def ingest(path: Path, resize: bool, store_root: Path, data_file: Path | None, inbox: Path | None = None,
           models: Path | None = None, readmit: bool = False, asked_by: str = "user") -> Ingested:
    """Read and check ``path`` whole, then add it to the store at ``store_root`` as a new version.

    Bad input raises IngestError before the store is touched (on first use, version 1 is made
    from the Olivetti faces only once the input has read clean). With ``inbox``, everything
    read must lie inside it (read_input). An image the erasure log of the registry ``models``
    forgot is refused naming the erasure; with ``readmit`` it is added and the readmission logged.
    """
    from tasks.forgetting import append_erasure, forgotten_images, now_utc

    incoming = read_input(path, resize, inbox)
    store, _ = open_store(store_root, data_file)
    forgotten = forgotten_images(models) if models is not None else {}
    result = _checked(lambda: store.add(incoming.images, incoming.people, incoming.sources, forgotten, readmit))
    latest = result.version or result.previous
    assert latest is not None  # open_store made version 1 at least
    if result.version is not None and forgotten and models is not None:
        back = [row for row in store.manifest(result.version)
                if row["added_in"] == str(result.version.number) and row["image_id"] in forgotten]
        if back:
            append_erasure(models, {"kind": "readmit", "time": now_utc(), "asked_by": asked_by,
                                    "person": ", ".join(sorted({row["person"] for row in back})), "source": str(path),
                                    "version_written": result.version.to_json(), "readmitted_from": sorted({forgotten[row["image_id"]] for row in back}),
                                    "image_ids": sorted(row["image_id"] for row in back)})
    rows = store.manifest(latest)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["person"]] = counts.get(row["person"], 0) + 1
    before = {row["person"] for row in store.manifest(result.previous)} if result.previous and result.version else set(counts)
    new_images = np.empty((0, *IMAGE_SHAPE), dtype=np.float32)
    if result.version is not None:  # its last shard holds exactly the images it added
        new_images = np.array(np.load(store.root / "images" / result.version.shards[-1], mmap_mode="r")[:MONTAGE_LIMIT])
    return Ingested(result, incoming.notes, counts, sorted(set(counts) - before), new_images)


def summary(ingested: Ingested) -> dict[str, object]:
    """What an ingest did, as plain JSON-able data: the flow's result and `faceflow ingest --json`."""
    result = ingested.result
    return {"version": result.version.to_json() if result.version else None,
            "previous": result.previous.to_json() if result.previous else None,
            "added": result.added, "duplicates": result.duplicates, "repeated": result.repeated,
            "relabelled": result.relabelled, "new_people": ingested.new_people, "converted": len(ingested.notes)}


def _checked(check: Callable[[], object]):  # type: ignore[no-untyped-def]
    """A store check's StoreError as an IngestError (the message already names the file or field)."""
    try:
        return check()
    except IngestError:
        raise
    except StoreError as error:
        raise IngestError(str(error)) from None
