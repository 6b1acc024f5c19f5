from __future__ import annotations

import hashlib
import http.server
import threading
import time
import urllib.error
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from faceflow.config import MIN_IMAGES_TO_SPLIT, DataConfig
from tasks.data import DataUnavailableError, FaceLabels, load_faces, split_indices, tuning_split_indices
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


def test_split_parts_are_disjoint_cover_every_image_and_follow_the_fractions(faces) -> None:
    split = split_indices(faces, DataConfig(validation_fraction=0.1))
    everything = np.concatenate([split.fit, split.validation, split.heldout])
    assert sorted(everything.tolist()) == list(range(400))
    # Per-image hashes: the counts are near the fractions, not exact (0.2 and 0.1 of 400).
    assert 60 <= len(split.heldout) <= 100 and 25 <= len(split.validation) <= 55
    assert split.fitted_whole == ()  # every Olivetti person has 10 images
    default = split_indices(faces, DataConfig())  # no validation part: PCA and flow fit every other image
    assert np.array_equal(default.heldout, split.heldout) and len(default.validation) == 0
    assert np.array_equal(default.fit, np.sort(np.concatenate([split.fit, split.validation])))


def test_an_images_part_depends_on_its_id_and_the_seed_only(faces) -> None:
    config = DataConfig(validation_fraction=0.1)
    split = split_indices(faces, config)
    # The same images in reverse order: each keeps its part (by id, not by position).
    reverse = FaceLabels.of(faces.image_ids[::-1], [faces.people[t] for t in faces.target[::-1]])
    reversed_split = split_indices(reverse, config)
    for part in ("fit", "validation", "heldout"):
        assert sorted(faces.image_ids[i] for i in getattr(split, part)) == sorted(
            reverse.image_ids[i] for i in getattr(reversed_split, part)
        )


def test_a_person_with_too_few_images_is_fitted_on_whole(faces) -> None:
    keep = [i for i in range(400) if faces.target[i] != 5 or i % 10 < MIN_IMAGES_TO_SPLIT - 1]
    labels = FaceLabels.of([faces.image_ids[i] for i in keep], [faces.people[faces.target[i]] for i in keep])
    split = split_indices(labels, DataConfig(heldout_fraction=0.5))
    few = np.flatnonzero(labels.target == labels.people.index("olivetti-05"))
    assert len(few) == MIN_IMAGES_TO_SPLIT - 1 and set(few.tolist()) <= set(split.fit.tolist())
    assert split.fitted_whole == ("olivetti-05",)


def test_split_is_seeded(faces) -> None:
    first = split_indices(faces, DataConfig(split_seed=3))
    again = split_indices(faces, DataConfig(split_seed=3))
    other = split_indices(faces, DataConfig(split_seed=4))
    assert np.array_equal(first.heldout, again.heldout) and first.key == again.key
    assert not np.array_equal(first.heldout, other.heldout)


@pytest.mark.parametrize("validation_fraction", [0.0, 0.1, 0.2])
def test_tuning_split_drops_the_heldout_faces_and_judges_on_the_retraining_validation_faces(faces, validation_fraction: float) -> None:
    run = split_indices(faces, DataConfig(split_seed=5, validation_fraction=0.1))
    tuning = tuning_split_indices(faces, DataConfig(split_seed=5, validation_fraction=validation_fraction))
    assert np.array_equal(tuning.heldout, run.validation)  # the judge: a retraining run's validation faces
    used = np.concatenate([tuning.fit, tuning.validation, tuning.heldout])
    assert len(used) == len(set(used.tolist())) == 400 - len(run.heldout)
    assert not set(used.tolist()) & set(run.heldout.tolist())
    assert (len(tuning.validation) == 0) == (validation_fraction == 0.0)


@dataclass(frozen=True)
class Mirror:
    url: str
    statuses: list[int]  # the HTTP status of every request, in order


@contextmanager
def flaky_mirror(payload: bytes, failures: int) -> Iterator[Mirror]:
    """The internet's copy of olivettifaces.mat, on 127.0.0.1: its first ``failures`` requests get 503, then the file."""
    statuses: list[int] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            status = 503 if len(statuses) < failures else 200
            statuses.append(status)
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload) if status == 200 else 0))
            self.end_headers()
            if status == 200:
                self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Mirror(f"http://127.0.0.1:{server.server_port}/files/5976027", statuses)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_fetch_faces_retries_a_failing_download_three_times_2_10_30_s_apart(
    tmp_path: Path, data_file: Path, prefect_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: on first use without a data file, the download is retried 3 times (2, 10, 30 s), by the task itself.

    Only the internet is faked: scikit-learn's download of the Olivetti file is pointed at a mirror on
    127.0.0.1 that fails the first 3 attempts (2 requests each: faceflow asks scikit-learn for one retry
    of its own), then serves the file.
    """
    import sklearn.datasets._olivetti_faces as olivetti
    from prefect import flow
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from commands.runner import flush_to_api
    from commands.server import local_server
    from support import client
    from tasks.steps import fetch_faces

    payload = data_file.read_bytes()
    for variable, value in (("SCIKIT_LEARN_DATA", tmp_path / "sklearn"), ("FACEFLOW_FACES_DIR", tmp_path / "faces"),
                            ("no_proxy", "127.0.0.1"), ("NO_PROXY", "127.0.0.1")):  # a user's proxy never sees the mirror
        monkeypatch.setenv(variable, str(value))
    monkeypatch.delenv("FACEFLOW_DATA_FILE", raising=False)

    @flow(name="fetch-only")
    def fetch_only() -> int:
        return len(fetch_faces(None, "latest").images)

    with flaky_mirror(payload, failures=6) as mirror, local_server(prefect_home, timeout=300) as server:
        monkeypatch.setattr(olivetti, "FACES", olivetti.RemoteFileMetadata(
            filename="olivettifaces.mat", url=mirror.url,
            checksum=hashlib.sha256(payload).hexdigest()))
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            state = fetch_only(return_state=True)
            flush_to_api()  # task run states reach the server as events
        assert state.is_completed() and state.result() == 400, state.message
        assert mirror.statuses == [503] * 6 + [200]
        deadline = time.monotonic() + 60
        with client(server.api_url) as prefect:
            while True:  # until the server has recorded the task run's last state (events arrive in their own time)
                runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
                history = sorted(prefect.read_task_run_states(runs[0].id), key=lambda s: s.timestamp) if runs else []
                if (history and history[-1].name == "Completed") or time.monotonic() > deadline:
                    break
                time.sleep(0.2)  # poll interval of the bounded wait (60 s) for the recorded states
    assert len(runs) == 1, f"the server recorded {len(runs)} task runs of the flow run within 60 s"
    (run,) = runs
    assert run.name.startswith("fetch_faces") and run.run_count == 4
    names = [s.name for s in history]
    assert names[-7:] == ["AwaitingRetry", "Retrying"] * 3 + ["Completed"], names
    waits = [(s.state_details.scheduled_time - s.timestamp).total_seconds() for s in history if s.name == "AwaitingRetry"]
    assert waits == [pytest.approx(delay, abs=1.0) for delay in (2, 10, 30)], waits
