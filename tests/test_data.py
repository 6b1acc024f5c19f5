from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from faceflow.config import DataConfig
from tasks.data import DataUnavailableError, load_faces, split_indices, tuning_split_indices
from tasks.olivetti import DataFileError, read_olivetti_mat


def test_real_faces_match_scikit_learn_values(faces) -> None:
    assert faces.images.shape == (400, 64, 64)
    assert faces.images.dtype == np.float32
    assert faces.images.reshape(400, -1).mean() == pytest.approx(0.5470425, abs=1e-6)
    np.testing.assert_allclose(faces.images[0, 0, :4], [0.30991736, 0.3677686, 0.41735536, 0.44214877], rtol=1e-6)
    assert faces.images.min() == 0.0 and faces.images.max() == 1.0
    assert np.array_equal(faces.target, np.repeat(np.arange(40), 10))


def test_same_file_gives_same_content_key(data_file: Path, faces) -> None:
    assert load_faces(data_file).key == faces.key


def test_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.mat"
    with pytest.raises(DataFileError, match="nope.mat"):
        read_olivetti_mat(missing)


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.mat"
    garbage.write_bytes(b"this is not a MATLAB file" * 10)
    with pytest.raises(DataFileError, match="garbage.mat"):
        read_olivetti_mat(garbage)


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    small = tmp_path / "small.mat"
    scipy.io.savemat(small, {"faces": np.zeros((4096, 10), dtype=np.uint8)})
    with pytest.raises(DataFileError, match=r"small.mat.*\(4096, 10\)"):
        read_olivetti_mat(small)


def test_no_network_and_no_file_says_how_to_provide_data() -> None:
    def offline_download():  # the only fake: the internet we cannot reach
        raise urllib.error.URLError("network unreachable")

    with pytest.raises(DataUnavailableError) as caught:
        load_faces(None, download=offline_download)
    assert "--data-file" in str(caught.value) and "FACEFLOW_DATA_FILE" in str(caught.value)


def test_split_holds_out_two_per_person_disjointly() -> None:
    target = np.repeat(np.arange(40), 10)
    split = split_indices(target, DataConfig(validation_per_person=1))
    assert len(split.heldout) == 80 and len(split.validation) == 40 and len(split.fit) == 280
    assert np.bincount(target[split.heldout]).tolist() == [2] * 40
    everything = np.concatenate([split.fit, split.validation, split.heldout])
    assert sorted(everything.tolist()) == list(range(400))
    default = split_indices(target, DataConfig())  # no validation part: PCA and flow fit all 8 others
    assert np.array_equal(default.heldout, split.heldout) and len(default.validation) == 0
    assert np.array_equal(default.fit, np.sort(np.concatenate([split.fit, split.validation])))


def test_split_is_seeded() -> None:
    target = np.repeat(np.arange(40), 10)
    first = split_indices(target, DataConfig(split_seed=3))
    again = split_indices(target, DataConfig(split_seed=3))
    other = split_indices(target, DataConfig(split_seed=4))
    assert np.array_equal(first.heldout, again.heldout) and first.key == again.key
    assert not np.array_equal(first.heldout, other.heldout)


@pytest.mark.parametrize("validation_per_person", [0, 1, 2])
def test_tuning_split_drops_the_heldout_faces_and_judges_on_the_default_validation_faces(validation_per_person: int) -> None:
    target = np.repeat(np.arange(40), 10)
    run = split_indices(target, DataConfig(split_seed=5, validation_per_person=1))
    tuning = tuning_split_indices(target, DataConfig(split_seed=5, validation_per_person=validation_per_person))
    assert np.array_equal(tuning.heldout, run.validation)  # the judge: one image per person
    used = np.concatenate([tuning.fit, tuning.validation, tuning.heldout])
    assert len(used) == len(set(used.tolist())) == 320
    assert not set(used.tolist()) & set(run.heldout.tolist())
    assert np.bincount(target[tuning.validation], minlength=40).tolist() == [validation_per_person] * 40
