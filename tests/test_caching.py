from __future__ import annotations

from pathlib import Path

from faceflow.keys import content_key, project_source_digest
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


def test_code_digest_is_stable_within_a_process() -> None:
    assert project_source_digest() == project_source_digest() and len(project_source_digest()) == 64
