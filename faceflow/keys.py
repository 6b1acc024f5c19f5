"""Content keys: digests of what determines a result, never of pickled objects.

Fitted estimators and torch modules do not pickle byte-for-byte the same twice, so a key
hashed from them would change every time. Every step's result is a ``Keyed`` value: it
carries ``key``, a digest of its own inputs' keys and parameters (faceflow.caching turns
these into Prefect cache keys).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel

# Bump when a task's output changes meaning without its source changing (e.g. a
# dependency's behaviour); it is part of every key.
KEY_VERSION = "1"


@runtime_checkable
class Keyed(Protocol):
    """A task result addressed by its content."""

    key: str


def _identity(value: Any) -> Any:
    """A JSON-able stand-in for a task input that determines its output."""
    if isinstance(value, Keyed):
        return {"key": value.key}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return {"path": str(value), "sha256": file_sha256(value) if value.is_file() else None}
    if isinstance(value, (list, tuple)):
        return [_identity(item) for item in value]
    if isinstance(value, dict):
        return {str(k): _identity(v) for k, v in sorted(value.items())}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(
        f"cannot build a cache key from a {type(value).__name__}; return a Keyed value instead"
    )


def content_key(*parts: Any) -> str:
    """A short hex digest of the identities of ``parts``."""
    payload = json.dumps([KEY_VERSION, *(_identity(p) for p in parts)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def array_digest(array: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes."""
    digest = hashlib.sha256(f"{array.dtype}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=1)
def project_source_digest() -> str:
    """sha256 over faceflow's source and its numerical libraries' versions.

    Any change to either invalidates every cached result.

    Coarser than per-task source, but a task's output also depends on the helpers it
    calls, and a stale model is worse than a retrain.
    """
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    # Results also depend on the numerical libraries: an upgrade must not reuse old models.
    for library in ("numpy", "scipy", "scikit-learn", "torch", "normflows"):
        digest.update(f"{library}=={importlib.metadata.version(library)}".encode())
    for package in ("faceflow", "tasks", "artifacts"):
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
