"""Nothing read from shared storage runs code; what a deployment reads stays in its folder; sizes are bounded before decoding.

A pickle that would create a marker file stands in for an attacker's code: it replaces a
champion's PCA, or a cached step's result in the shared result storage, and the marker must
never appear. Hostile inputs to `faceflow ingest` (an image whose header announces 20,000 x
20,000 pixels, an .npz or .mat whose headers announce 10^9 faces) are refused from their headers
alone, in one line naming the file and the limit, with the face store untouched.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT
from faceflow.arrays import ArchiveError, npz_bytes, read_npz
from faceflow.serializer import SERIALIZER_TYPE, ArraysSerializer, StoredResultError
from support import faceflow, store_snapshot, write_png

MARKER = "code-ran"


class _RunsCode:
    """A pickle that runs code when loaded: it creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _cli(*arguments: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(faceflow(*arguments), env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A CLI environment of this test's own: no server recorded, so commands run here, without one."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return env | {"PREFECT_HOME": str(tmp_path / "home"), "FACEFLOW_FACES_DIR": str(tmp_path / "faces"),
                  "FACEFLOW_MODELS_DIR": str(tmp_path / "models"), "PYTHONPATH": str(REPO_ROOT)} | extra


# --- the champion's PCA -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def champion_files(faces) -> dict[str, bytes]:
    """A quick champion's model.pt and pca.npz, as a run folder holds them."""
    from faceflow.config import DataConfig, PCAConfig, TrainConfig
    from tasks.data import split_indices
    from tasks.pca import fit_pca_on
    from tasks.train import make_batches, train_flow

    quick = TrainConfig(epochs=1, num_layers=2, hidden_units=16, device="cpu")
    split = split_indices(faces, DataConfig(validation_fraction=0.1))
    pca = fit_pca_on(faces, split, PCAConfig(n_components=16))
    trained = train_flow(make_batches(pca, split, quick, seed=0), quick, seed=0, device="cpu")
    return {"model.pt": trained.checkpoint, "pca.npz": pca.estimator}


def _champion(models: Path, files: dict[str, bytes]) -> Path:
    folder = models / "champion-test-0"
    folder.mkdir(parents=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    from tasks.champion import RECORD, ChampionRecord

    record = ChampionRecord(str(folder), "test", 0, "test", 0.0, 0.0, "2026-12-06T00:00:00+00:00", {})
    (folder / RECORD).write_text(json.dumps(record.to_json()))  # a champion folder holds its record
    (models / "champion").symlink_to(folder.name)
    return folder


PCA_ATTACKS = {
    "pca.npz replaced by a pickle": (lambda folder, marker: (folder / "pca.npz").write_bytes(pickle.dumps(_RunsCode(marker))),
                                     "pca.npz: not a readable .npz"),
    "a champion of before pca.npz, its pca.joblib a pickle": (
        lambda folder, marker: ((folder / "pca.npz").unlink(), (folder / "pca.joblib").write_bytes(pickle.dumps(_RunsCode(marker)))),
        "pca.joblib: a pickle, which faceflow no longer loads"),
}


@pytest.mark.parametrize("attack", PCA_ATTACKS)
def test_a_champion_pca_that_is_a_pickle_is_refused_naming_the_file_and_runs_nothing(
        tmp_path: Path, champion_files: dict[str, bytes], attack: str) -> None:
    tamper, message = PCA_ATTACKS[attack]
    env = _env(tmp_path)
    folder = _champion(tmp_path / "models", champion_files)
    drawn = _cli("sample", "--n", "2", "--out", str(tmp_path / "before"), env=env, cwd=tmp_path)
    assert drawn.returncode == 0, drawn.stderr  # the champion works before it is tampered with
    marker = tmp_path / MARKER
    tamper(folder, marker)
    for command in (["sample", "--n", "2", "--out", str(tmp_path / "after")], ["score", str(tmp_path / "before" / "samples.npy")]):
        refused = _cli(*command, env=env, cwd=tmp_path)
        assert refused.returncode == 1, (command, refused.stdout, refused.stderr)
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and f"{folder}/{message}" in lines[0]  # the resolved folder, refused.stderr
        assert not marker.exists()
    assert not (tmp_path / "after").exists()


# --- cached results in the shared result storage ------------------------------------------------------------------

SPLIT_PROGRAM = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from prefect import flow
    from faceflow.config import DataConfig
    from tasks.data import load_faces
    from tasks.steps import split_faces

    @flow
    def split_only(data_file: str) -> dict:
        state = split_faces(load_faces(Path(data_file)), DataConfig(), return_state=True)
        return {"state": state.name, "fit": len(state.result().fit)}

    print(json.dumps(split_only(sys.argv[1])), flush=True)
""")


def _pickled_record(marker: Path) -> bytes:
    """A Prefect result record as Prefect's pickle serializer writes one, whose pickle creates ``marker``."""
    return json.dumps({
        "metadata": {"storage_key": None, "expiration": None, "prefect_version": "3.9.1", "storage_block_id": None,
                     "serializer": {"type": "pickle", "picklelib": "cloudpickle", "picklelib_version": None}},
        "result": base64.b64encode(pickle.dumps(_RunsCode(marker))).decode(),
    }).encode()


def test_a_cached_result_rewritten_as_a_pickle_is_refused_naming_the_file_and_computed_again(
        tmp_path: Path, prefect_home: Path, data_file: Path) -> None:
    from commands.server import local_server

    results = tmp_path / "results"
    env = _env(tmp_path, PREFECT_HOME=str(prefect_home), PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(results))
    marker = tmp_path / MARKER

    def run() -> tuple[dict, str]:
        done = subprocess.run([sys.executable, "-c", SPLIT_PROGRAM, str(data_file)], env=env, cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr

    with local_server(prefect_home, timeout=300) as server:
        env["PREFECT_API_URL"] = server.api_url
        first, _ = run()
        [stored] = results.glob("split_faces-*")
        record = json.loads(stored.read_bytes())
        assert first["state"] == "Completed" and record["metadata"]["serializer"]["type"] == SERIALIZER_TYPE
        assert run()[0]["state"] == "Cached"  # the record as faceflow wrote it is read back
        stored.write_bytes(_pickled_record(marker))
        again, log = run()
    assert not marker.exists()
    assert again == first  # computed again, not read
    assert f"{stored}: refused, its record names the serializer 'pickle'" in log
    assert json.loads(stored.read_bytes())["metadata"]["serializer"]["type"] == SERIALIZER_TYPE  # written anew


def test_a_stored_result_is_rebuilt_only_from_plain_values_of_registered_types() -> None:
    from tasks.results import Split

    serializer = ArraysSerializer()
    split = Split("k", np.arange(3), np.arange(3, 5), np.arange(5, 6), ("ann",), ("a", "b", "c", "d", "e", "f"))
    back = serializer.loads(serializer.dumps(split))
    assert back.key == split.key and back.fitted_whole == ("ann",) and np.array_equal(back.heldout, split.heldout)
    unknown = json.dumps({"dataclass": "os.system", "fields": {"command": "touch code-ran"}}).encode()
    with pytest.raises(StoredResultError, match="holds a 'os.system', which faceflow does not read"):
        serializer.loads(base64.b64encode(npz_bytes({"tree": np.frombuffer(unknown, dtype=np.uint8)})))
    with pytest.raises(TypeError, match="not a type faceflow stores"):
        serializer.dumps(_RunsCode(Path("x")))
    with pytest.raises(StoredResultError, match="would need pickle"):
        serializer.loads(base64.b64encode(_object_npz(pickle.dumps(_RunsCode(Path("x"))))))


def _object_npz(content: bytes) -> bytes:
    """An .npz whose one member's header says it holds Python objects (which np.load would unpickle)."""
    from numpy.lib import format as npy_format
    import io

    header = io.BytesIO()
    npy_format.write_array_header_1_0(header, {"descr": "|O", "fortran_order": False, "shape": (1,)})
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as writer:
        writer.writestr("tree.npy", header.getvalue() + content)
    return archive.getvalue()


# --- ingest: sizes announced by headers ---------------------------------------------------------------------------


def _announcing_png(path: Path, width: int, height: int) -> Path:
    """A real 8x8 PNG whose header (IHDR, its CRC made good) announces ``width`` x ``height``: a decompression bomb's shape."""
    write_png(path, np.zeros((8, 8)))
    content = bytearray(path.read_bytes())
    content[16:24] = struct.pack(">II", width, height)
    content[29:33] = struct.pack(">I", zlib.crc32(bytes(content[12:29])))
    path.write_bytes(bytes(content))
    return path


def _write_bytes(path: Path, count: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(count))
    return path


def _announcing_npz(path: Path, count: int) -> Path:
    """An .npz whose ``images`` header announces ``count`` 64x64 float32 faces; the data is a few bytes."""
    from numpy.lib import format as npy_format
    import io

    header = io.BytesIO()
    npy_format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (count, 64, 64)})
    people = io.BytesIO()
    np.save(people, np.array(["ann"] * 2))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("images.npy", header.getvalue() + bytes(64))
        archive.writestr("people.npy", people.getvalue())
    return path


def _announcing_mat(path: Path, count: int) -> Path:
    """An uncompressed .mat whose ``faces`` header announces 4096 x ``count`` uint8 pixels; it holds one column."""
    import scipy.io

    scipy.io.savemat(path, {"faces": np.ones((4096, 1), dtype=np.uint8)}, do_compression=False)
    content = path.read_bytes()
    dimensions = struct.pack("<iiii", 5, 8, 4096, 1)
    assert content.count(dimensions) == 1
    path.write_bytes(content.replace(dimensions, struct.pack("<iiii", 5, 8, 4096, count)))
    return path


HOSTILE = {
    "a PNG announcing 20,000 x 20,000 pixels": (
        lambda tmp: _announcing_png(tmp / "people" / "ann" / "huge.png", 20_000, 20_000).parent.parent,
        ["huge.png: refused before decoding", "(400000000 pixels)", "over 16,777,216 pixels (4096x4096)"]),
    "a PNG announcing 5,000 x 5,000 pixels (under Pillow's own limit)": (
        lambda tmp: _announcing_png(tmp / "people" / "ann" / "big.png", 5_000, 5_000).parent.parent,
        ["big.png: refused before decoding", "(25000000 pixels)", "over 16,777,216 pixels (4096x4096)"]),
    "an image file of 33 MiB": (
        lambda tmp: _write_bytes(tmp / "people" / "ann" / "heavy.png", 33 * 2**20).parent.parent,
        ["heavy.png: 34,603,008 bytes; image files over 33,554,432 bytes are refused"]),
    "an .npz announcing 10^9 faces": (
        lambda tmp: _announcing_npz(tmp / "many.npz", 10**9),
        ["many.npz: its headers announce 14.9 TiB", "shape (1000000000, 64, 64)", "the limit is 2.0 GiB"]),
    "a .mat announcing 10^9 faces": (
        lambda tmp: _announcing_mat(tmp / "many.mat", 10**9),
        ["many.mat: its headers announce 3.7 TiB", "(4096, 1000000000)", "the limit is 2.0 GiB"]),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_faceflow_ingest_refuses_what_its_headers_announce_too_big_before_decoding(tmp_path: Path, case: str) -> None:
    make, expected = HOSTILE[case]
    path = make(tmp_path)
    env = _env(tmp_path)
    (tmp_path / "faces").mkdir()
    before = store_snapshot(tmp_path / "faces")
    refused = _cli("ingest", str(path), env=env, cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("faceflow ingest refused: ") and all(e in lines[0] for e in expected), lines
    assert store_snapshot(tmp_path / "faces") == before


def test_archive_headers_are_read_before_any_data() -> None:
    blob = npz_bytes({"images": np.zeros((2, 64, 64), np.float32)})
    assert read_npz(blob, "small.npz", max_bytes=2 * 64 * 64 * 4)["images"].shape == (2, 64, 64)
    with pytest.raises(ArchiveError, match=r"small.npz: its headers announce 32.0 KiB .* the limit is 32.0 KiB"):
        read_npz(blob, "small.npz", max_bytes=2 * 64 * 64 * 4 - 1)


# --- ingest: the inbox --------------------------------------------------------------------------------------------


def _people(root: Path) -> Path:
    for person in ("ann", "bob"):
        for index in range(2):
            write_png(root / person / f"{index}.png", np.random.default_rng(index).random((64, 64)))
    return root


def test_with_an_inbox_everything_read_lies_inside_it_symlinks_resolved(tmp_path: Path) -> None:
    from tasks.importers import IngestError, read_input

    inbox, outside = tmp_path / "inbox", _people(tmp_path / "outside")
    _people(inbox / "people")
    assert len(read_input(inbox / "people", root=inbox).images) == 4
    assert len(read_input(Path("people"), root=inbox).images) == 4  # relative: from the inbox
    with pytest.raises(IngestError, match=f"path {str(outside)!r} is outside {inbox}: .*FACEFLOW_INBOX_DIR"):
        read_input(outside, root=inbox)
    (inbox / "linked").symlink_to(outside)
    with pytest.raises(IngestError, match=f"a symlink to {outside}"):
        read_input(inbox / "linked", root=inbox)
    (inbox / "people" / "cy").symlink_to(outside / "ann")
    with pytest.raises(IngestError, match=f"people/cy'.*a symlink to {outside / 'ann'}.*is outside {inbox}"):
        read_input(inbox / "people", root=inbox)
    (inbox / "people" / "cy").unlink()
    (inbox / "people" / "ann" / "9.png").symlink_to(outside / "bob" / "0.png")
    with pytest.raises(IngestError, match="ann/9.png'.*is outside"):
        read_input(inbox / "people", root=inbox)
    assert len(read_input(outside).images) == 4  # without an inbox (the CLI), any readable path


# --- deployment forms: what the UI's Run button sends -------------------------------------------------------------


def test_deployment_forms_read_and_write_only_inside_their_folders(tmp_path: Path, tag: str, data_file: Path) -> None:
    """Through `make ui`'s worker: a path out of the inbox, a symlink out of it, an output folder or data file
    elsewhere, each refused naming the field and the folder, the store unchanged; a path in the inbox is read."""
    import shutil

    from support import RunningUI, assert_no_process_left, client, flow_run_story, light_config, run_deployment, wait_for_state

    inbox, outputs, faces = tmp_path / "inbox", tmp_path / "outputs", tmp_path / "faces"
    outside = _people(tmp_path / "outside")
    _people(inbox / "people")
    (inbox / "linked").symlink_to(outside)
    copied = shutil.copy(data_file, tmp_path / "olivettifaces.mat")
    cases = {  # deployment, flow, parameters, what the failed run's message says
        "ingest outside the inbox": ("ingest", "faceflow-ingest", {"path": str(outside)},
                                     f"path {str(outside)!r} is outside {inbox}"),
        "ingest of a symlink out of the inbox": ("ingest", "faceflow-ingest", {"path": "linked"},
                                                 f"(a symlink to {outside}) is outside {inbox}"),
        "output_dir outside the outputs folder": ("on-demand", "faceflow", {"config": {"output_dir": str(tmp_path / "elsewhere")}},
                                                  f"output_dir {str(tmp_path / 'elsewhere')!r} is outside {outputs}"),
        "a relative output_dir climbing out": ("on-demand", "faceflow", {"config": {"output_dir": "../elsewhere"}},
                                               f"output_dir {str(outputs / '../elsewhere')!r} is outside {outputs}"),
        "forget's output_dirs outside the outputs folder": ("forget", "faceflow-forget",
                                                            {"person": "olivetti-00", "purge": True, "output_dirs": [str(tmp_path / "elsewhere")]},
                                                            f"output_dirs {str(tmp_path / 'elsewhere')!r} is outside {outputs}"),
        "a data file outside the inbox": ("on-demand", "faceflow", {"config": {"data": {"data_file": str(copied)}, "output_dir": str(outputs)}},
                                          f"data.data_file {str(copied)!r} is outside {inbox}"),
    }
    home = tmp_path / "home"
    ui = RunningUI(tmp_path, tag, data_file, home, FACEFLOW_INBOX_DIR=str(inbox), FACEFLOW_OUTPUTS_DIR=str(outputs),
                   FACEFLOW_FACES_DIR=str(faces))
    try:
        runs = {case: run_deployment(ui.api_url, deployment, parameters, flow=flow)
                for case, (deployment, flow, parameters, _) in cases.items()}
        for case, flow_run_id in runs.items():
            assert wait_for_state(ui.api_url, flow_run_id, {"Failed"}, timeout=300) == "Failed", case
            with client(ui.api_url) as prefect:
                message = prefect.read_flow_run(flow_run_id).state.message
            assert cases[case][3] in message, (case, message)
        assert not faces.exists() and not (tmp_path / "elsewhere").exists()
        read = run_deployment(ui.api_url, "ingest", {"path": "people"}, flow="faceflow-ingest")  # relative: in the inbox
        assert wait_for_state(ui.api_url, read, {"Completed"}, timeout=300) == "Completed"
        assert any(faces.rglob("*.npy"))
        # The form's default output_dir is FACEFLOW_OUTPUTS_DIR itself, wherever the worker's working directory is.
        default = run_deployment(ui.api_url, "on-demand", {"config": light_config({"train": {"epochs": 1}})}, flow="faceflow")
        assert wait_for_state(ui.api_url, default, {"Completed"}, timeout=300) == "Completed", flow_run_story(ui.api_url, default)
        assert [folder.parent for folder in outputs.glob("run-*")] == [outputs]
    finally:
        ui.ctrl_c()
    assert_no_process_left(tag)
