from __future__ import annotations

from pathlib import Path

from faceflow.keys import content_key
from faceflow.config import FaceflowConfig


def test_a_files_key_follows_its_content(tmp_path: Path) -> None:
    data = tmp_path / "faces.mat"
    data.write_bytes(b"first")
    first = content_key(data)
    assert content_key(data) == first
    data.write_bytes(b"second")
    assert content_key(data) != first


def test_config_keys_follow_every_field() -> None:
    base = FaceflowConfig()
    assert content_key(base) == content_key(FaceflowConfig())
    changed = base.model_copy(update={"sample": base.sample.model_copy(update={"n_samples": 3})})
    assert content_key(changed) != content_key(base)


def test_a_lock_file_caught_between_its_creation_and_its_content_is_a_held_lock(tmp_path: Path) -> None:
    """Prefect creates a lock file, then writes it; a second identical run reading in between failed on its JSON."""
    from faceflow.caching import ProcessLockManager

    locks = ProcessLockManager(tmp_path)
    taken = ProcessLockManager(tmp_path)  # the other run, in the middle of taking the lock
    (tmp_path / "report-abc.lock").touch()
    assert locks.is_locked("report-abc")
    assert not locks.is_lock_holder("report-abc", "second run")
    (tmp_path / "report-abc.lock").unlink()
    assert taken.acquire_lock("report-abc", holder="first run")
    assert locks.is_lock_holder("report-abc", "first run")  # once written, the holder is read, not a stale guess
    assert not locks.acquire_lock("report-abc", holder="second run", acquire_timeout=0.3)
    taken.release_lock("report-abc", holder="first run")
    assert locks.acquire_lock("report-abc", holder="second run", acquire_timeout=0.3)
