"""The types faceflow stores as task results, registered without importing Prefect.

``tasks/results.py`` registers its dataclasses at import, and the CLI imports it before any check:
Prefect (which creates its home on import) stays out of that path. ``faceflow.serializer`` reads
this registry when it rebuilds a stored result.
"""

from __future__ import annotations

import dataclasses

from pydantic import BaseModel

_ALLOWED: dict[str, type] = {}


class StoredResultError(ValueError):
    """A stored result that is not one faceflow wrote; the message names the file or what is wrong."""


class StoredFailure(RuntimeError):
    """A failed step's exception as read back from storage: its type's name and message, not the object."""


def allow_stored(*classes: type) -> None:
    """Let results of these dataclasses or pydantic models be stored and read back (by their qualified names)."""
    for cls in classes:
        if not (dataclasses.is_dataclass(cls) or issubclass(cls, BaseModel)):
            raise TypeError(f"{cls.__qualname__}: only dataclasses and pydantic models are stored")
        _ALLOWED[_name(cls)] = cls


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
