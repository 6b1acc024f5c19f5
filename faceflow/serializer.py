"""Task and flow results stored as arrays and JSON, read back without running code.

Prefect's default result serializer is cloudpickle: reading a result runs whatever the file
says, and the result storage is shared between machines (docs/operations.md). faceflow's steps
and flows store their results with ``ArraysSerializer`` instead: one uncompressed .npz per result
(base64, as the record around it is JSON text), its ``tree`` member the structure as JSON and one
``.npy`` member per array (faceflow.arrays). Reading it rebuilds only what ``allow_stored``
registered (faceflow's frozen result dataclasses, its config models) from plain values: no module
is imported and no object is unpickled because a file said so.

A Prefect result record names its own serializer, and Prefect reads it with the one named: a
record rewritten to name ``pickle`` would be unpickled whatever the task was given. So the
results live in ``VerifiedResultStorage``, which refuses a record that does not name
``ArraysSerializer`` before Prefect parses it (a warning names the file; the step computes again).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import uuid
from pathlib import Path, PurePath
from typing import Any, Literal

import numpy as np
from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import LocalFileSystem
from prefect.serializers import Serializer
from pydantic import BaseModel

from faceflow.arrays import ArchiveError, npz_bytes, read_npz
from faceflow.stored_types import _ALLOWED, StoredFailure, StoredResultError, _name, allow_stored  # noqa: F401 (re-exported)

SERIALIZER_TYPE = "faceflow-arrays"
# The largest result read back: a cached step of 40,000 faces holds their images (650 MB) and more.
MAX_RESULT_BYTES = 8 * 2**30

NEVER_SAVED_ID = uuid.uuid5(uuid.NAMESPACE_URL, "faceflow:verified-results")

class ArraysSerializer(Serializer):
    """Results as an .npz of arrays plus ``tree.json``; reading builds only registered types, from plain values."""

    type: Literal["faceflow-arrays"] = SERIALIZER_TYPE

    def dumps(self, obj: Any) -> bytes:
        arrays: list[np.ndarray] = []
        tree = _encode(obj, arrays)
        members = {"tree": np.frombuffer(json.dumps(tree).encode(), dtype=np.uint8)}
        # base64, as Prefect's own serializers: the record that holds it is JSON text.
        return base64.b64encode(npz_bytes(members | {f"a{index}": array for index, array in enumerate(arrays)}))

    def loads(self, blob: bytes) -> Any:
        try:
            members = read_npz(base64.b64decode(blob, validate=True), "a stored result", MAX_RESULT_BYTES)
            tree = json.loads(members.pop("tree").tobytes())
        except (ArchiveError, KeyError, ValueError, binascii.Error) as error:
            raise StoredResultError(f"not a result faceflow stored ({error})") from None
        return _decode(tree, members)


def _encode(value: Any, arrays: list[np.ndarray]) -> Any:
    def stored(array: np.ndarray) -> int:
        if array.dtype.hasobject:
            raise TypeError("an array of Python objects is not stored (it would need pickle)")
        arrays.append(array)
        return len(arrays) - 1

    if value is None or isinstance(value, (bool, int, float, str)) and not isinstance(value, np.generic):
        return value
    if isinstance(value, np.ndarray):
        return {"array": stored(value)}
    if isinstance(value, np.generic):
        return {"scalar": stored(np.asarray(value))}
    if isinstance(value, bytes):
        return {"bytes": stored(np.frombuffer(value, dtype=np.uint8))}
    if isinstance(value, PurePath):
        return {"path": str(value)}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [_encode(item, arrays) for item in value]}
    if isinstance(value, dict):
        return {"dict": [[_encode(key, arrays), _encode(item, arrays)] for key, item in value.items()]}
    if isinstance(value, BaseException):
        return {"error": _name(type(value)), "message": str(value)}
    name = _name(type(value))
    if _ALLOWED.get(name) is not type(value):
        raise TypeError(f"{name} is not a type faceflow stores (faceflow.serializer.allow_stored)")
    if isinstance(value, BaseModel):
        return {"model": name, "data": value.model_dump(mode="json")}
    return {"dataclass": name, "fields": {field.name: _encode(getattr(value, field.name), arrays)
                                          for field in dataclasses.fields(value) if field.init}}


def _decode(node: Any, arrays: dict[str, np.ndarray]) -> Any:
    if not isinstance(node, (dict, list)):
        return node
    if not isinstance(node, dict) or len(node) not in (1, 2):
        raise StoredResultError(f"not a result faceflow stored (an unexpected {type(node).__name__})")
    kind = next(iter(node))
    if kind in ("array", "scalar", "bytes"):
        array = arrays.get(f"a{node[kind]}")
        if array is None:
            raise StoredResultError(f"not a result faceflow stored (array {node[kind]!r} is missing)")
        return array if kind == "array" else array[()] if kind == "scalar" else array.tobytes()
    if kind == "path":
        return Path(node["path"])
    if kind in ("list", "tuple"):
        items = [_decode(item, arrays) for item in node[kind]]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {_decode(key, arrays): _decode(item, arrays) for key, item in node["dict"]}
    if kind == "error":
        return StoredFailure(f"{node['error']}: {node['message']}")
    if kind in ("model", "dataclass"):
        cls = _ALLOWED.get(node[kind])
        if cls is None:
            raise StoredResultError(f"a stored result holds a {node[kind]!r}, which faceflow does not read from storage")
        if kind == "model":
            return cls.model_validate(node["data"])
        return cls(**{name: _decode(item, arrays) for name, item in node["fields"].items()})
    raise StoredResultError(f"not a result faceflow stored (an entry of kind {kind!r})")


class VerifiedResultStorage(LocalFileSystem):
    """Prefect's local result storage (the same folder), refusing any record not written by ArraysSerializer.

    The folder is Prefect's at each use (PREFECT_RESULTS_LOCAL_STORAGE_PATH, else
    $PREFECT_HOME/storage), as for the default storage, not where it was at import.
    """

    _block_type_name = "faceflow verified results"
    _block_type_slug = "faceflow-verified-results"

    def model_post_init(self, context: Any) -> None:
        super().model_post_init(context)
        # Prefect wants a task's storage block saved on the server, so that a reader given only a
        # record's metadata can load the block by its id. This one is the same on every machine and
        # is never loaded by id: its id names no saved block, so such a reader fails instead of
        # reading the file with a plain LocalFileSystem, which would run a pickle.
        self._block_document_id = NEVER_SAVED_ID

    def _resolve_path(self, path: str) -> Path:
        if self.basepath is None:
            from prefect.settings import get_current_settings

            return LocalFileSystem(basepath=str(get_current_settings().results.local_storage_path))._resolve_path(path)
        return super()._resolve_path(path)

    async def aread_path(self, path: str) -> bytes:
        return self._read_verified(path)

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        return self._read_verified(path)

    def _read_verified(self, path: str) -> bytes:
        resolved = self._resolve_path(path)
        if not resolved.is_file():
            raise ValueError(f"Path {resolved} does not exist or is not a file.")
        return _verified(resolved, resolved.read_bytes())


def _verified(path: Path, content: bytes) -> bytes:
    """``content`` when it is a result record naming ArraysSerializer; StoredResultError naming ``path`` otherwise."""
    problem = _record_problem(content)
    if problem:
        message = f"{path}: refused, {problem}; it is not read, and the step computes its result again"
        _logger().warning(message)
        raise StoredResultError(message)
    return content


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The run's logger (the UI shows the warning) inside a run, else faceflow's."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("faceflow.results")


def _record_problem(content: bytes) -> str | None:
    try:
        record = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return "not a Prefect result record (not JSON)"
    if not isinstance(record, dict) or set(record) != {"metadata", "result"} or not isinstance(record["metadata"], dict):
        return "not a Prefect result record"
    serializer = record["metadata"].get("serializer")
    named = serializer.get("type") if isinstance(serializer, dict) else None
    if named != SERIALIZER_TYPE:
        return f"its record names the serializer {named!r}, and faceflow reads only {SERIALIZER_TYPE!r} (no pickle)"
    return None


RESULTS = {"result_serializer": ArraysSerializer(), "result_storage": VerifiedResultStorage()}
