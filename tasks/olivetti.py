"""Read and check olivettifaces.mat: the one place that knows the file's format.

Every way the file can be unusable is reported in one line that names the file and what is
wrong, before any work starts: the CLI calls this before it starts a server, and the
fetch task calls it again for runs started from a deployment.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from faceflow.config import N_PIXELS

IMAGE_SHAPE = (64, 64)
VARIABLE = "faces"
# The Olivetti file's layout, this reader's knowledge only: 40 people x 10 consecutive images,
# one image per column. The pipeline itself takes any version of the face store.
OLIVETTI_IMAGES_PER_PERSON = 10
OLIVETTI_IMAGES = 40 * OLIVETTI_IMAGES_PER_PERSON
EXPECTED_SHAPE = (N_PIXELS, OLIVETTI_IMAGES)


class DataFileError(ValueError):
    """The given olivettifaces.mat cannot be used."""


def _load_matlab(path: Path) -> dict[str, object]:
    name = repr(str(path))
    if not path.exists():
        raise DataFileError(f"data file {name} does not exist")
    if not path.is_file():
        raise DataFileError(f"data file {name} is not a file (a directory?)")
    if path.stat().st_size == 0:
        raise DataFileError(f"data file {name} is empty")
    try:
        return scipy.io.loadmat(path)
    except Exception as error:  # scipy's readers raise many kinds (MatReadError, ValueError, zlib.error, ...)
        reason = str(error) or type(error).__name__
        raise DataFileError(f"data file {name} is not a readable MATLAB .mat file ({reason})") from None


def checked_faces_array(path: Path, columns: int | None = OLIVETTI_IMAGES) -> np.ndarray:
    """The raw ``faces`` variable of ``path``, after every check the pipeline relies on.

    ``columns``: the image count required (the Olivetti file's 400), or None for any count, as
    an ingested file in the same layout may hold.
    """
    name = repr(str(path))
    contents = _load_matlab(path)
    if VARIABLE not in contents:
        held = ", ".join(repr(k) for k in contents if not k.startswith("__")) or "nothing"
        raise DataFileError(f"data file {name} has no variable {VARIABLE!r} (it holds {held})")
    raw = np.asarray(contents[VARIABLE])
    if not np.issubdtype(raw.dtype, np.number) or np.issubdtype(raw.dtype, np.complexfloating):
        raise DataFileError(f"data file {name}: {VARIABLE!r} holds {raw.dtype} values; expected real numbers (pixel levels)")
    expected = (N_PIXELS, columns if columns is not None else "n")
    if raw.ndim != 2 or raw.shape[0] != N_PIXELS or (columns is not None and raw.shape[1] != columns) or raw.shape[1] == 0:
        transposed = raw.ndim == 2 and raw.shape[1] == N_PIXELS
        hint = "; it looks transposed: save faces.T" if transposed else ""
        raise DataFileError(
            f"data file {name}: {VARIABLE!r} has shape {raw.shape}; expected {expected}, "
            f"one 64x64 image per column{hint}"
        )
    finite = np.isfinite(raw)
    if not finite.all():
        raise DataFileError(f"data file {name}: {VARIABLE!r} holds {int((~finite).sum())} non-finite values (NaN or inf)")
    if raw.min() == raw.max():
        raise DataFileError(f"data file {name}: every pixel of {VARIABLE!r} is {raw.min()}: there is nothing to learn")
    return raw


def read_olivetti_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images and targets from a local olivettifaces.mat, normalised exactly as scikit-learn does."""
    faces = checked_faces_array(path).T.astype(np.float32)
    faces -= faces.min()
    faces /= faces.max()
    images = faces.reshape(OLIVETTI_IMAGES, *IMAGE_SHAPE).transpose(0, 2, 1)
    target = np.repeat(np.arange(OLIVETTI_IMAGES // OLIVETTI_IMAGES_PER_PERSON), OLIVETTI_IMAGES_PER_PERSON)
    return np.ascontiguousarray(images), target
