"""The face store's figures: ingest speed, the pipeline's steps as the store grows, memory, event latency.

1. **Ingest**: INGEST_IMAGES 64x64 8-bit PNGs, one folder per person, through ``tasks.importers.ingest``
   (read, check, commit a version) into a store holding version 1, in this process, on one core
   (``limited_threads(1)`` and the thread pinned to one CPU); best of INGEST_REPEATS, each into a
   fresh copy of the store.
2. **Growth**: one store whose versions 1, 2 and 3 hold 400, 4,000 and 40,000 faces (below). The
   pipeline runs on each with GROWTH_EPOCHS epochs and GROWTH_COMPONENTS components (the 400
   faces' count, so the steps differ in their faces, not in the model's size), defaults otherwise
   (the new-people model trains beside the main one). A step's seconds are its task run's start
   to end as the Prefect API recorded them; training's figure is the seconds per epoch of its
   loop. The ratios come from warm runs: one process and one server per round, after a run with
   other seeds has imported torch, scikit-learn and matplotlib (a cold run's first steps pay for
   those imports, which would make every step at 400 faces look slow and every ratio small);
   best of GROWTH_REPEATS rounds, each in a fresh PREFECT_HOME.
3. **Memory**: `faceflow run` on each version as a user runs it, a fresh process that starts its
   own server: the peak resident memory of its process tree, server included, polled every
   20 ms; the 40,000-face run's is the figure. Its steps' seconds (cold) are kept beside.
4. **Event latency**: ``faceflow ui`` (server, deployments with weekly-retrain's trigger, worker)
   on a fresh PREFECT_HOME; ``faceflow ingest`` of ten new faces in another process; from the
   ``faceflow.faces.version.created`` event's occurred time to the start time of the flow run its
   automation created, both read from the Prefect API. Then `faceflow ui` gets SIGTERM, which
   stops its worker, the retraining it started and its server.

Growth is synthetic: copy ``c`` of Olivetti person ``p`` is a new person, ``olivetti-PP-cCCC``,
whose ten images are the original ten under one geometric and photometric change of their own
(a shift of up to 2 pixels, a mirror image half the time, a contrast and brightness change),
each with its own faint pixel noise, clipped to [0, 1]. Every image is then distinct (the store
would skip a duplicate), every synthetic person has ten images like an Olivetti person, so the
split, the new-people folds (four people, forty images) and the interpolation endpoints mean
what they mean on the 400 faces. Version 1 is the Olivetti file, 2 adds copies 1-9, 3 adds
copies 10-99.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil

from bench.flow_runs import REPO_ROOT, cli_env, prepare_database, run_and_watch, tagged_processes
from commands.server import api_url_for, free_port, local_server
from faceflow.threads import limited_threads
from tasks.olivetti import OLIVETTI_IMAGES_PER_PERSON

VERSION_SIZES = {1: 400, 2: 4_000, 3: 40_000}  # the growth store's versions and their faces
ADDED_COPIES = {2: range(1, 10), 3: range(10, 100)}  # the synthetic copies versions 2 and 3 add
GROWTH_EPOCHS = 20
GROWTH_COMPONENTS = 64
GROWTH_REPEATS = 2
INGEST_IMAGES = 4_000
INGEST_REPEATS = 3
INGEST_COPIES = range(100, 100 + INGEST_IMAGES // 400)  # not among the growth store's copies
LATENCY_COPY = 110
RETRAIN_DEPLOYMENT = "faceflow-retrain/weekly-retrain"
VERSION_CREATED = "faceflow.faces.version.created"
TAG_VARIABLE = "FACEFLOW_BENCH_TAG"
# Each step's time at 4,000 and at 40,000 faces, over its time at 400, at most 12x per 10x faces.
GROWTH_PER_DECADE = 12.0
MEMORY_TARGET_GB = 3.0
LATENCY_TARGET_SECONDS = 60.0
INGEST_TARGET_PER_SECOND = 2_000.0

MAX_SHIFT = 2  # pixels, each way
GAIN = (0.85, 1.15)  # contrast
OFFSET = (-0.05, 0.05)  # brightness
NOISE = 0.01  # pixel noise std: makes every image distinct even where two copies' changes coincide


def shifted(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """(n, 64, 64) images moved by (dy, dx) pixels, the edge rows and columns repeated into the gap."""
    height, width = images.shape[1:]
    rows = np.clip(np.arange(height) - dy, 0, height - 1)
    columns = np.clip(np.arange(width) - dx, 0, width - 1)
    return images[:, rows][:, :, columns]


def synthetic_copy(base: np.ndarray, copy: int, seed: int = 0) -> np.ndarray:
    """Copy ``copy`` (1, 2, ...) of the base faces: per person one shift, mirror, gain and offset; per image noise.

    ``base`` is (n, 64, 64) in [0, 1] with OLIVETTI_IMAGES_PER_PERSON consecutive images per person.
    """
    rng = np.random.default_rng((seed, copy))
    out = np.empty_like(base, dtype=np.float32)
    for start in range(0, len(base), OLIVETTI_IMAGES_PER_PERSON):
        person = base[start : start + OLIVETTI_IMAGES_PER_PERSON]
        dy, dx = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=2)
        person = shifted(person, int(dy), int(dx))
        if rng.random() < 0.5:
            person = person[:, :, ::-1]
        gain, offset = rng.uniform(*GAIN), rng.uniform(*OFFSET)
        noise = rng.normal(0.0, NOISE, size=person.shape)
        out[start : start + len(person)] = np.clip(gain * person + offset + noise, 0.0, 1.0)
    return out


def synthetic_people(n_base_people: int, copy: int) -> list[str]:
    """The people of copy ``copy``: ``olivetti-PP-cCCC``, ten images each."""
    return [f"olivetti-{p:02d}-c{copy:03d}" for p in range(n_base_people) for _ in range(OLIVETTI_IMAGES_PER_PERSON)]


def grown(base: np.ndarray, copies: range, seed: int = 0) -> tuple[np.ndarray, list[str], list[str]]:
    """(images, people, sources) of ``copies`` synthetic copies of the base faces, for FaceStore.add."""
    n_people = len(base) // OLIVETTI_IMAGES_PER_PERSON
    images = np.concatenate([synthetic_copy(base, copy, seed) for copy in copies])
    people = [name for copy in copies for name in synthetic_people(n_people, copy)]
    sources = [f"synthetic-c{copy:03d}[{i}]" for copy in copies for i in range(len(base))]
    return images, people, sources


def build_growth_store(root: Path, data_file: Path) -> dict[str, object]:
    """Versions 1, 2 and 3 of a new store at ``root``: 400, 4,000 and 40,000 faces (VERSION_SIZES)."""
    from tasks.data import open_store

    started = time.perf_counter()
    store, first = open_store(root, data_file)
    base = store.read(first).images
    versions = {1: first}
    for number, copies in ADDED_COPIES.items():
        added = store.add(*grown(base, copies))
        assert added.version is not None and added.duplicates == added.repeated == 0, "synthetic faces must all be new"
        versions[number] = added.version
    return {"seconds": time.perf_counter() - started,
            "versions": {number: {"id": v.id, "images": v.images, "people": v.people} for number, v in versions.items()}}


def write_person_folders(folder: Path, images: np.ndarray, people: list[str]) -> None:
    """One sub-folder of 8-bit grayscale PNGs per person (the layout `faceflow ingest` reads)."""
    from PIL import Image

    counts: dict[str, int] = {}
    for image, person in zip(images, people):
        number = counts[person] = counts.get(person, -1) + 1
        (folder / person).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(folder / person / f"{number}.png")


@contextmanager
def one_core() -> Iterator[int]:
    """This thread on one CPU and torch and BLAS on one thread, for the block; yields the CPU."""
    previous = os.sched_getaffinity(0)
    cpu = min(previous)
    os.sched_setaffinity(0, {cpu})
    try:
        with limited_threads(1):
            yield cpu
    finally:
        os.sched_setaffinity(0, previous)


def ingest_speed(scratch: Path, data_file: Path) -> dict[str, object]:
    """INGEST_IMAGES PNGs ingested into copies of a one-version store, on one core; best of INGEST_REPEATS."""
    from tasks.data import open_store
    from tasks.importers import ingest

    template = scratch / "ingest-store"
    store, first = open_store(template, data_file)
    folder = scratch / "ingest-pngs"
    write_person_folders(folder, *grown(store.read(first).images, INGEST_COPIES)[:2])
    seconds = []
    for attempt in range(INGEST_REPEATS):
        root = scratch / f"ingest-store-{attempt}"
        shutil.copytree(template, root)
        with one_core() as cpu:
            started = time.perf_counter()
            ingested = ingest(folder, True, root, data_file)
            seconds.append(time.perf_counter() - started)
        assert ingested.result.added == INGEST_IMAGES, ingested.result
    best = min(seconds)
    return {"images": INGEST_IMAGES, "seconds": seconds, "best_seconds": best, "images_per_second": INGEST_IMAGES / best,
            "cpu": cpu}


def _client(api_url: str):  # type: ignore[no-untyped-def]
    """A synchronous Prefect client for the server at ``api_url``."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        return get_client(sync_client=True)


def task_seconds(api_url: str, flow_run_id: str, tasks: int, timeout: float = 120) -> dict[str, float]:
    """Each task run of a flow run: end time minus start time, as the server recorded them.

    The server records task runs from events it processes after the flow returns: waits, up to
    ``timeout``, until all ``tasks`` of them have ended.
    """
    from uuid import UUID

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    in_run = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)]))
    deadline = time.monotonic() + timeout
    with _client(api_url) as prefect:
        while True:
            ended = [run for run in prefect.read_task_runs(flow_run_filter=in_run)
                     if run.start_time is not None and run.end_time is not None]
            if len(ended) >= tasks or time.monotonic() > deadline:
                break
            time.sleep(0.5)  # poll interval of the bounded wait for the server to record every task run
    return {run.task_key.rsplit("-", 1)[0]: (run.end_time - run.start_time).total_seconds() for run in ended}


def _growth_env(home: Path, store_root: Path, models: Path, data_file: Path) -> dict[str, str]:
    return cli_env(home, data_file) | {"FACEFLOW_FACES_DIR": str(store_root), "FACEFLOW_MODELS_DIR": str(models)}


def _growth_options(number: int) -> list[str]:
    return ["--faces-version", str(number), "--epochs", str(GROWTH_EPOCHS), "--n-components", str(GROWTH_COMPONENTS)]


def cold_runs(scratch: Path, store_root: Path, data_file: Path, migrated: Path) -> dict[int, dict[str, object]]:
    """`faceflow run` on versions 1, 2, 3, each a fresh process with its own server: wall, peak memory, each task's seconds."""
    home = scratch / "cold-home"
    shutil.copytree(migrated, home)
    env = _growth_env(home, store_root, scratch / "cold-models", data_file)
    runs = {}
    for number in VERSION_SIZES:
        print(f"  faceflow run on version {number} ({VERSION_SIZES[number]:,} faces) ...", flush=True)
        command = [sys.executable, "-m", "commands.cli", "run", "--json", *_growth_options(number),
                   "--output-dir", str(scratch / "cold-outputs")]
        wall, peak, stdout = run_and_watch(command, env, scratch)
        summary = json.loads(stdout.strip().splitlines()[-1])
        if set(summary["tasks"].values()) != {"Completed"}:
            raise RuntimeError(f"every step must compute in a timed run: {summary['tasks']}")
        runs[number] = {"flow_run_id": summary["flow_run_id"], "wall_seconds": wall, "peak_rss_bytes": peak,
                        "tasks": summary["tasks"], "metrics": summary["metrics"]}
    with local_server(home, timeout=300) as server:
        for run in runs.values():
            run["task_seconds"] = task_seconds(server.api_url, run["flow_run_id"], len(run["tasks"]))
    return runs


WARM_SCRIPT = """
import json, sys
from pathlib import Path
from bench.store import GROWTH_COMPONENTS, GROWTH_EPOCHS, task_seconds
from commands.runner import run_pipeline
from commands.server import local_server
from faceflow.config import FaceflowConfig

home, outputs, versions = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])

def config(number, seed):
    # The seed and the split seed: every step's cache key (the split and PCA do not depend on the seed).
    return FaceflowConfig.model_validate({
        "seed": seed, "output_dir": outputs, "data": {"faces_version": str(number), "split_seed": seed},
        "train": {"epochs": GROWTH_EPOCHS}, "pca": {"n_components": GROWTH_COMPONENTS}})

with local_server(home, timeout=600) as server:
    run_pipeline(config(1, seed=1), server.api_url)  # imports and first calls, with other seeds: nothing below is cached
    runs = {}
    for number in versions:
        summary = run_pipeline(config(number, seed=0), server.api_url)
        if set(summary["tasks"].values()) != {"Completed"}:
            raise RuntimeError(f"every step must compute in a timed run: {summary['tasks']}")
        runs[number] = {"flow_run_id": summary["flow_run_id"], "tasks": summary["tasks"], "metrics": summary["metrics"],
                        "task_seconds": task_seconds(server.api_url, summary["flow_run_id"], len(summary["tasks"]))}
print(json.dumps(runs))
"""


def warm_runs(scratch: Path, store_root: Path, data_file: Path, migrated: Path) -> list[dict[int, dict[str, object]]]:
    """GROWTH_REPEATS rounds, each one process and one server: a run to warm up, then versions 1, 2, 3."""
    rounds = []
    for attempt in range(GROWTH_REPEATS):
        print(f"  round {attempt + 1} of {GROWTH_REPEATS}: one process, a warm-up run, then versions 1, 2, 3 ...", flush=True)
        home = scratch / f"warm-home-{attempt}"
        shutil.copytree(migrated, home)
        finished = subprocess.run(
            [sys.executable, "-c", WARM_SCRIPT, str(home), str(scratch / f"warm-outputs-{attempt}"), json.dumps(list(VERSION_SIZES))],
            env=_growth_env(home, store_root, scratch / f"warm-models-{attempt}", data_file), cwd=REPO_ROOT,
            capture_output=True, text=True,
        )
        if finished.returncode != 0:
            raise RuntimeError(f"the warm growth runs failed ({finished.returncode}):\n{finished.stderr[-3000:]}")
        rounds.append({int(number): run for number, run in json.loads(finished.stdout.strip().splitlines()[-1]).items()})
    return rounds


def seconds_per_epoch(run: dict[str, object]) -> float:
    metrics = run["metrics"]
    return metrics["train_seconds"] / metrics["epochs"]


def growth_table(rounds: list[dict[int, dict[str, object]]]) -> list[dict[str, object]]:
    """Per step: its best seconds at each size over the rounds, and the ratios to 400 faces.

    Training's row is the seconds per epoch of its loop; the train_realnvp task's own row also
    holds the model's set-up and its last checks.
    """
    steps = list(rounds[0][1]["tasks"])  # in the flow's order
    rows = []
    for step in [*steps, "train_realnvp, per epoch"]:
        best = {}
        for number in VERSION_SIZES:
            if step == "train_realnvp, per epoch":
                best[number] = min(seconds_per_epoch(r[number]) for r in rounds)
            else:
                best[number] = min(r[number]["task_seconds"][step] for r in rounds)
        ratio_4k, ratio_40k = best[2] / best[1], best[3] / best[1]
        rows.append({"step": step, "400 s": best[1], "4,000 s": best[2], "40,000 s": best[3],
                     "4,000 / 400": ratio_4k, "40,000 / 400": ratio_40k, "per 10x": ratio_40k ** 0.5,
                     "met": ratio_4k <= GROWTH_PER_DECADE and ratio_40k <= GROWTH_PER_DECADE**2})
    return rows


def cold_table(runs: dict[int, dict[str, object]]) -> list[dict[str, object]]:
    """Per version: the `faceflow run` process's wall time and peak memory, and its slowest steps as run cold."""
    rows = []
    for number, run in runs.items():
        slowest = sorted(run["task_seconds"].items(), key=lambda item: -item[1])[:3]
        rows.append({"faces": VERSION_SIZES[number], "wall s": run["wall_seconds"], "peak RSS GB": run["peak_rss_bytes"] / 1e9,
                     "train s/epoch": seconds_per_epoch(run), "slowest steps (s)": ", ".join(f"{k} {v:.1f}" for k, v in slowest)})
    return rows


def _wait_for_text(path: Path, text: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{text!r} did not appear in {path}:\n{path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)  # poll interval of the bounded wait for the line


def _triggered_run_started(api_url: str, timeout: float):  # type: ignore[no-untyped-def]
    """The first weekly-retrain flow run an automation created, once it has a start time."""
    deadline = time.monotonic() + timeout
    with _client(api_url) as prefect:
        deployment = prefect.read_deployment_by_name(RETRAIN_DEPLOYMENT).id
        while time.monotonic() < deadline:
            for run in prefect.read_flow_runs():
                if (run.deployment_id == deployment and run.created_by and run.created_by.type == "AUTOMATION"
                        and run.start_time is not None):
                    return run
            time.sleep(0.5)  # poll interval of the bounded wait for the triggered run to start
    raise RuntimeError(f"no run of {RETRAIN_DEPLOYMENT} created by its trigger started within {timeout} s")


def _version_event(api_url: str, version_id: str):  # type: ignore[no-untyped-def]
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    wanted = EventFilter(event=EventNameFilter(name=[VERSION_CREATED]),
                         resource=EventResourceFilter(id=[f"faceflow.faces.version.{version_id}"]))
    with _client(api_url) as prefect:
        events = prefect.read_events(wanted, limit=10).events  # the server takes at most 50
    if len(events) != 1:
        raise RuntimeError(f"expected one {VERSION_CREATED} event for version {version_id}, found {len(events)}")
    return events[0]


def event_latency(scratch: Path, data_file: Path, migrated: Path) -> dict[str, object]:
    """`faceflow ui` up, `faceflow ingest` of ten new faces; event occurred -> triggered retraining started."""
    from tasks.data import open_store

    home, faces = scratch / "ui-home", scratch / "ui-faces"
    shutil.copytree(migrated, home)
    store, first = open_store(faces, data_file)
    new_faces = scratch / "latency-pngs"
    images, people, _ = grown(store.read(first).images[:20], range(LATENCY_COPY, LATENCY_COPY + 1))
    write_person_folders(new_faces, images[:10], people[:10])  # one new person, ten faces
    tag = uuid.uuid4().hex
    env = cli_env(home, data_file) | {"FACEFLOW_FACES_DIR": str(faces), "FACEFLOW_MODELS_DIR": str(scratch / "ui-models"),
                                      TAG_VARIABLE: tag}
    port, log = free_port(), scratch / "ui.log"
    with log.open("wb") as output:
        ui = subprocess.Popen([sys.executable, "-m", "commands.cli", "ui", "--port", str(port)], env=env, cwd=REPO_ROOT,
                              stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_text(log, "faceflow UI:", ui, timeout=600)
        api_url = api_url_for(port)
        started = time.perf_counter()
        ingested = subprocess.run([sys.executable, "-m", "commands.cli", "ingest", str(new_faces), "--json"], env=env,
                                  cwd=scratch, capture_output=True, text=True, timeout=600)
        if ingested.returncode != 0:
            raise RuntimeError(f"faceflow ingest failed ({ingested.returncode}):\n{ingested.stderr[-3000:]}")
        ingest_seconds = time.perf_counter() - started
        version = json.loads(ingested.stdout.strip().splitlines()[-1])["version"]
        run = _triggered_run_started(api_url, timeout=600)
        event = _version_event(api_url, version["id"])
    finally:
        ui.send_signal(signal.SIGTERM)  # faceflow ui stops its worker, the retraining run and its server
        try:
            ui.wait(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()
        left = tagged_processes(tag)  # none, when faceflow ui stopped everything it started
        for process in left:
            process.terminate()
        for process in psutil.wait_procs(left, timeout=30)[1]:
            process.kill()
    return {"seconds": (run.start_time - event.occurred).total_seconds(),
            "created_seconds": (run.created - event.occurred).total_seconds(),
            "event_occurred": event.occurred.isoformat(), "run_created": run.created.isoformat(),
            "run_started": run.start_time.isoformat(), "flow_run_id": str(run.id), "version": version["number"],
            "ingest_command_seconds": ingest_seconds, "ui_exit_code": ui.returncode, "processes_left": len(left)}


def store_benchmarks(data_file: Path, scratch: Path) -> dict[str, object]:
    """Every figure of the face store, from one run: ingest speed, growth, memory, event latency, and their targets."""
    migrated = scratch / "store-migrated-home"
    prepare_database(migrated)
    print(f"face store: {INGEST_IMAGES:,} PNGs ingested on one core, best of {INGEST_REPEATS} ...", flush=True)
    ingest = ingest_speed(scratch, data_file)
    print("face store: versions of 400, 4,000 and 40,000 faces (synthetic growth) ...", flush=True)
    store_root = scratch / "growth-faces"
    built = build_growth_store(store_root, data_file)
    print("face store: faceflow run on each version, each a fresh process (memory, steps as run cold) ...", flush=True)
    cold = cold_runs(scratch, store_root, data_file, migrated)
    print(f"face store: the pipeline on each version in a warm process, {GROWTH_EPOCHS} epochs, best of {GROWTH_REPEATS} ...",
          flush=True)
    rounds = warm_runs(scratch, store_root, data_file, migrated)
    steps = growth_table(rounds)
    print("face store: faceflow ui, an ingest, and the retraining its event triggers ...", flush=True)
    latency = event_latency(scratch, data_file, migrated)
    peak_gb = cold[3]["peak_rss_bytes"] / 1e9
    slowest = max(steps, key=lambda row: row["per 10x"])
    targets = [
        {"figure": "ingest of 64x64 PNGs, one core (images/s)", "value": ingest["images_per_second"],
         "target": f">= {INGEST_TARGET_PER_SECOND:g}", "met": ingest["images_per_second"] >= INGEST_TARGET_PER_SECOND},
        {"figure": f"slowest-growing step ({slowest['step']}): time per 10x faces, 400 -> 40,000",
         "value": slowest["per 10x"], "target": f"<= {GROWTH_PER_DECADE:g}", "met": all(row["met"] for row in steps)},
        {"figure": "peak RSS of a 40,000-face run, process tree (GB)", "value": peak_gb,
         "target": f"<= {MEMORY_TARGET_GB:g}", "met": peak_gb <= MEMORY_TARGET_GB},
        {"figure": "ingest event -> triggered retraining run started (s)", "value": latency["seconds"],
         "target": f"<= {LATENCY_TARGET_SECONDS:g}", "met": latency["seconds"] <= LATENCY_TARGET_SECONDS},
    ]
    return {"store_targets": targets, "store_steps": steps, "store_cold": cold_table(cold), "store_ingest": ingest,
            "store_growth": built, "store_cold_runs": cold, "store_warm_runs": rounds, "store_event_latency": latency,
            "store_peak_rss_gb": peak_gb}
