"""faces-sweep: many configurations trained and scored on a Dask cluster, their shared upstream computed once.

The flow runs the shared steps (fetch, split, PCA, dataloader) in its own process, one call
per distinct input, and sends each configuration's training and scoring to Dask through
prefect-dask; a configuration already in the cache is read where the flow is, so a repeated
sweep never starts a cluster. Ranking, and promotion to champion, use validation log p only.
A configuration that fails (diverges, or loses its worker for good) is reported in the table
and does not stop the others.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import dask
from prefect import flow, get_run_logger, tags
from prefect.futures import PrefectFuture, as_completed
from prefect_dask import DaskTaskRunner
from pydantic import Field

from artifacts.publish import publish_markdown, start_progress, update_progress
from artifacts.rankings import sweep_markdown
from faceflow.caching import is_cached, version_tag
from faceflow.interrupts import defer_during_imports
from faceflow.config import FaceflowConfig
from faceflow.confinement import confine_forms
from faceflow.serializer import RESULTS, allow_stored
from faceflow.settings import SettingError, dask_address_problem, dask_tls
from faceflow.sweeps import SweepSpec, expand
from flows.retrain import RetrainResult, challenge
from tasks.data import resolve_data_file
from tasks.devices import resolve_device
from tasks.results import FaceBatches, Faces, FittedPCA, ModelScore, Split
from tasks.steps import build_dataloader, fetch_faces, fit_pca, score_model, split_faces, train_realnvp
from tasks.train import loader_settings

# Dask's workers trim freed memory eagerly (MALLOC_TRIM_THRESHOLD_=65536), which nearly doubled
# torch's CPU time in these many small steps; they keep the allocator's default here. Their
# progress bars would only interleave in one log.
WORKER_SETTINGS = {
    "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
    "distributed.nanny.environ.TQDM_DISABLE": "1",
}


def dask_security(address: str) -> dict[str, Any]:
    """The Dask client's keyword arguments for the scheduler at ``address``: dask's own ``Security`` with TLS when
    FACEFLOW_DASK_TLS_CA/CERT/KEY are set; SettingError for missing or unreadable files, or an address that does not fit.

    A scheduler started with ``--tls-ca-file/--tls-cert/--tls-key`` requires a certificate its CA
    signed from every client and worker (docs/operations.md, Security).
    """
    from distributed.security import Security

    tls = dask_tls()
    problem = dask_address_problem(address, tls)
    if problem:
        raise SettingError(f"--dask-address {address}: {problem}")
    if tls is None:
        return {}
    return {"security": Security(tls_ca_file=tls["ca"], tls_client_cert=tls["cert"], tls_client_key=tls["key"],
                                 require_encryption=True)}


def sweep_task_runner(address: str | None = None, workers: int | None = None) -> DaskTaskRunner:
    """prefect-dask's runner: an existing scheduler at ``address`` (over TLS when configured, ``dask_security``),
    else a LocalCluster of 1-thread worker processes on loopback.

    A LocalCluster starts at the first configuration sent to it and is closed when the flow ends.
    """
    dask.config.set(WORKER_SETTINGS)
    if address:
        return DaskTaskRunner(address=address, client_kwargs=dask_security(address))
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
        "n_workers": workers or os.cpu_count() or 1, "threads_per_worker": 1, "processes": True, "host": "127.0.0.1",
        # Any free port (a fixed one would collide with a second sweep), on loopback: ":0" listened
        # on every interface, and the dashboard shows the sweep's code and data to anyone who can reach it.
        "dashboard_address": "127.0.0.1:0",
    })


@dataclass(frozen=True)
class SweepResult:
    """The ranked table's rows, how often each step ran in which state, and the promotion, if asked for."""

    rows: list[dict[str, Any]]
    executions: dict[str, dict[str, int]]
    promotion: RetrainResult | None


class _Executions:
    """Each step's final states in this sweep, counted: the shared upstream must run once."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = {}

    def record(self, name: str, state: str) -> None:
        per_state = self.counts.setdefault(name, {})
        per_state[state] = per_state.get(state, 0) + 1

    def run(self, task, *args: Any) -> Any:
        state = task(*args, return_state=True)
        self.record(task.name, state.name)
        return state.result()


@dataclass
class _Configuration:
    number: int
    values: dict[str, Any]
    config: FaceflowConfig
    pca: FittedPCA
    split: Split
    batches: FaceBatches
    version: str  # the faces version id its steps ran on (their task runs' tag)
    trained: PrefectFuture | Any = None
    score: PrefectFuture | ModelScore | None = None


def _shared_upstream(configs: list[tuple[dict[str, Any], FaceflowConfig]], steps: _Executions) -> list[_Configuration]:
    """Fetch, split, PCA and dataloader once per distinct input, in this process."""
    faces: dict[str, Faces] = {}
    splits: dict[str, Split] = {}
    pcas: dict[str, FittedPCA] = {}
    loaders: dict[str, FaceBatches] = {}
    prepared = []
    for number, (values, config) in enumerate(configs, start=1):
        data_file = resolve_data_file(config.data)
        data_key = f"{data_file}:{config.data.faces_version}"
        if data_key not in faces:
            faces[data_key] = steps.run(fetch_faces, data_file, config.data.faces_version)
        version = faces[data_key].version
        with tags(version_tag(version)):  # each step's task run names its version; its cache key is noted
            split_key = data_key + config.data.model_dump_json()
            if split_key not in splits:
                splits[split_key] = steps.run(split_faces, faces[data_key], config.data)
            pca_key = split_key + config.pca.model_dump_json()
            if pca_key not in pcas:
                pcas[pca_key] = steps.run(fit_pca, faces[data_key], splits[split_key], config.pca)
            loader_key = f"{pca_key}{loader_settings(config.train)}:{config.seed}"
            if loader_key not in loaders:
                loaders[loader_key] = steps.run(build_dataloader, pcas[pca_key], splits[split_key], config.train, config.seed)
        prepared.append(_Configuration(number, values, config, pcas[pca_key], splits[split_key], loaders[loader_key], version))
    return prepared


def _row(item: _Configuration, steps: _Executions) -> dict[str, Any]:
    """The configuration's line of the table; its error if it failed, never raising."""
    row: dict[str, Any] = {"configuration": item.number, "values": ", ".join(f"{k}={v}" for k, v in item.values.items()) or "base"}
    computed = isinstance(item.score, PrefectFuture)
    try:
        score = item.score.result() if computed else item.score
    except Exception as error:  # a failed configuration is a row, not the end of the sweep
        trained = _outcome(item.trained)
        steps.record("train_realnvp", trained)
        if trained == "Completed":
            steps.record("score_model", "Failed")
        else:
            error = _error_of(item.trained) or error  # the training's own error, not "its scoring never ran"
        return row | {"validation log p": None, "held-out log p": None, "train seconds": None,
                      "error": f"{type(error).__name__}: {error}"[:300]}
    if computed:
        steps.record("train_realnvp", _outcome(item.trained))
        steps.record("score_model", _outcome(item.score))
    return row | {"validation log p": score.validation_log_prob, "held-out log p": score.heldout_log_prob,
                  "train seconds": score.train_seconds, "error": ""}


def _error_of(future: PrefectFuture) -> Exception | None:
    try:
        future.result()
    except Exception as error:
        return error
    return None


def _outcome(future: PrefectFuture) -> str:
    """A finished future's state name, from the run itself; "Failed" when it failed or the cluster lost it."""
    return "Failed" if _error_of(future) else future.state.name


def _rank(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best validation log p first; failed configurations last. Held-out log p never ranks."""
    ranked = sorted(rows, key=lambda r: (r["validation log p"] is None, -(r["validation log p"] or 0.0)))
    return [{"rank": rank} | row for rank, row in enumerate(ranked, start=1)]


def _train_and_score(item: _Configuration, device: str, steps: _Executions) -> None:
    """Read a cached configuration here (no cluster for a stored result); else submit it to the cluster."""
    arguments = (item.batches, item.config.train, item.config.seed, device)
    if is_cached(train_realnvp, batches=item.batches, config=item.config.train, seed=item.config.seed, device=device):
        item.trained = steps.run(train_realnvp, *arguments)  # read here: no cluster for a cached result
        item.score = steps.run(score_model, item.trained, item.pca, item.split)
    else:
        item.trained = train_realnvp.submit(*arguments)
        item.score = score_model.submit(item.trained, item.pca, item.split)


allow_stored(SweepResult)  # its persisted result is read back without pickle


@flow(name="faces-sweep", persist_result=True, **RESULTS, task_runner=sweep_task_runner())
def faces_sweep(
    spec: SweepSpec = SweepSpec(),
    promote: Annotated[bool, Field(description="Offer the best configuration (by validation log p) as a challenger to the champion.")] = False,
    promotion_margin: Annotated[
        float, Field(ge=0.0, le=100.0, description="Nats of validation log p the best configuration must gain over the champion.")
    ] = 0.5,
) -> SweepResult:
    """Train and score every configuration of ``spec`` on Dask; rank them by validation log p."""
    defer_during_imports()  # a Ctrl-C or SIGTERM mid-import is taken after it (faceflow.interrupts)
    logger = get_run_logger()
    configs = expand(spec)
    confined = confine_forms(config for _, config in configs)  # from a deployment: output_dir and data file inside their folders
    configs = [(values, config) for (values, _), config in zip(configs, confined, strict=True)]
    steps = _Executions()
    prepared = _shared_upstream(configs, steps)
    progress = start_progress("faceflow-sweep-progress", f"Configurations done, of {len(prepared)}")
    for item in prepared:
        with tags(version_tag(item.version)):
            _train_and_score(item, resolve_device(item.config.train.device), steps)
    pending = [item.score for item in prepared if isinstance(item.score, PrefectFuture)]
    rows = []
    for done, item in enumerate(_as_they_finish(prepared, pending), start=1):
        rows.append(_row(item, steps))
        update_progress(progress, 100.0 * done / len(prepared))
        logger.info(f"sweep: {done} of {len(prepared)} done; configuration {item.number} ({rows[-1]['values']}): "
                    f"validation log p {rows[-1]['validation log p']}{'  ' + rows[-1]['error'] if rows[-1]['error'] else ''}")
    ranked = _rank(rows)
    publish_ranking(ranked)
    promotion = None
    if promote and ranked[0]["validation log p"] is not None:
        best = prepared[ranked[0]["configuration"] - 1].config
        promotion = challenge(best, promotion_margin, seed=best.seed, source=f"sweep configuration {ranked[0]['configuration']}")
    return SweepResult(ranked, steps.counts, promotion)


def publish_ranking(ranked: list[dict[str, Any]]) -> None:
    """The ranked configurations as the `faceflow-sweep` artifact."""
    # Markdown, not a table artifact: the configurations' values and errors (free text) made the
    # table run past the UI's artifact panel; they go in a list below a table of numbers.
    publish_markdown("faceflow-sweep", sweep_markdown(ranked),
                     "Configurations ranked by validation log p; held-out log p beside it, never used to rank")


def _as_they_finish(prepared: list[_Configuration], pending: list[PrefectFuture]) -> Iterator[_Configuration]:
    """The configurations read from the cache first, then those computed on the cluster as each finishes."""
    by_future = {id(item.score): item for item in prepared if isinstance(item.score, PrefectFuture)}
    yield from (item for item in prepared if id(item.score) not in by_future)
    for future in as_completed(pending):
        yield by_future[id(future)]
