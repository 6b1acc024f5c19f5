"""`faceflow run`: every config field as an option, validated before any work starts."""

from __future__ import annotations

import getpass
import inspect
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Literal, get_args, get_origin

import numpy as np
import typer
from pydantic import BaseModel, ValidationError

from tasks.data import FacesVersionError
from tasks.store import StoreError
from artifacts.run_folder import OutputFolderError, check_output_folder
from artifacts.tables import json_safe
from faceflow.config import RETRAIN_VALIDATION_FRACTION, FaceflowConfig
from commands import signals
from commands.server import ServerError, api_server
from faceflow.settings import (
    API_URL_VARIABLE, AUTH_STRING_VARIABLE, DATA_FILE_VARIABLE, SettingError, api_url_from_environment, apply_auth_string,
    data_file_from_environment, faces_dir, lock_seconds, models_dir, prefect_home, redis_url, server_start_timeout,
)
from tasks.olivetti import DataFileError, checked_faces_array

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="faceflow: a Prefect pipeline that learns a generative model of faces.")


@app.callback()
def _refuse_bad_lock_settings() -> None:
    # No docstring: it would replace the app's help. Before every command, so before any work:
    # every command's flows take the cache's locks (FACEFLOW_REDIS_URL, FACEFLOW_LOCK_SECONDS), and
    # send the server's auth string (PREFECT_API_AUTH_STRING, or FACEFLOW_AUTH_FILE's, put in the
    # environment here for Prefect's client and every process started from here).
    try:
        redis_url()
        lock_seconds()
        apply_auth_string()
    except SettingError as error:
        typer.echo(f"faceflow refused: {error}", err=True)
        raise typer.Exit(code=2) from None


def config_fields(model: type[BaseModel] = FaceflowConfig, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path in the config tree, pydantic FieldInfo) for every leaf field."""
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from config_fields(annotation, prefix + (name,))
        else:
            yield prefix + (name,), info


def option_name(path: tuple[str, ...]) -> str:
    return "--" + path[-1].replace("_", "-")


def _option_type(annotation: Any) -> Any:
    """The type typer should parse: Optional[X] -> X; Literal stays (typer renders the choices)."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) is not Literal and len(args) == 1:
        return args[0]
    return annotation


def _help(info: Any) -> str:
    bounds = []
    for item in info.metadata:
        for attribute, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if getattr(item, attribute, None) is not None:
                bounds.append(f"{symbol} {getattr(item, attribute)}")
    return info.description + (f" [{', '.join(bounds)}]" if bounds else "")


def nested(values: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    """{("train", "epochs"): 3} -> {"train": {"epochs": 3}}."""
    tree: dict[str, Any] = {}
    for path, value in values.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem, naming the config field, its option and what is allowed."""
    lines = ["invalid configuration:"]
    leaves = {path for path, _ in config_fields()}
    for problem in error.errors():
        location = tuple(str(part) for part in problem["loc"])
        field = ".".join(location) or "config"
        option = f" ({option_name(location)})" if location in leaves else ""
        lines.append(f"  {field}{option}: {problem['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def build_config(values: dict[tuple[str, ...], Any]) -> FaceflowConfig:
    """The validated config tree from option values (None = the field's default)."""
    given = {path: value for path, value in values.items() if value is not None}
    return FaceflowConfig.model_validate(nested(given))


def _validated_config(options: dict[str, Any]) -> FaceflowConfig:
    """The config tree from CLI options; exits with status 2 and the problems on bad input."""
    paths = {path[-1]: path for path, _ in config_fields()}
    try:
        return build_config({paths[name]: value for name, value in options.items()})
    except ValidationError as error:
        typer.echo(describe_validation_error(error), err=True)
        raise typer.Exit(code=2) from None


def _on_a_server(command: str, start_timeout: float, work: Callable[[str], dict[str, Any]], stopped: str) -> dict[str, Any]:
    """``work(api_url)`` on the server this PREFECT_HOME uses, started here (and stopped on the way out) if none is up.

    Every failure ends the command with one line on stderr: status 1, or 130 on Ctrl-C, where
    ``stopped`` says what was stopped on the way out.
    """
    try:
        with api_server(prefect_home()) as server:
            os.environ[API_URL_VARIABLE] = server.api_url  # before Prefect is first imported, just below
            import commands.runner  # noqa: F401  torch, scikit-learn, Prefect: seconds that overlap the server's start

            server.wait_until_ready(start_timeout)
            return work(server.api_url)
    except KeyboardInterrupt:
        typer.echo(f"faceflow {command} interrupted; {stopped}", err=True)
        raise typer.Exit(code=130) from None
    except Exception as error:  # ServerError, or a flow failure the flow already logged with its traceback
        typer.echo(f"faceflow {command} failed: {error}", err=True)
        raise typer.Exit(code=1) from None


def _refuse_bad_input(config: FaceflowConfig, command: str = "run") -> float:
    """Check the data file, the output folder and the settings before any server or flow starts.

    Returns the server start timeout; exits with status 2 and one line naming what is wrong.
    """
    try:
        data_file = config.data.data_file or data_file_from_environment()
        if data_file is not None:
            checked_faces_array(data_file)
        check_output_folder(config.output_dir)
        _check_faces_version(config, data_file)
        return server_start_timeout()
    except (DataFileError, OutputFolderError, SettingError, FacesVersionError, StoreError) as error:
        typer.echo(f"faceflow {command} refused: {error}", err=True)
        raise typer.Exit(code=2) from None


def _check_faces_version(config: FaceflowConfig, data_file: Path | None) -> None:
    """The faces version exists and can serve ``config`` (people, endpoints, components); ValueError naming the field.

    From the version's manifest, no pixels. On first use with a data file, version 1 is made here
    (the run needs it anyway); without one it would be a download, which the flow's fetch retries,
    so the flow checks instead.
    """
    from faceflow.settings import faces_dir
    from tasks.data import FaceLabels, check_config_against
    from tasks.data import open_store
    from tasks.forgetting import forgotten_endpoints
    from tasks.store import FaceStore, UnknownVersionError

    store = FaceStore(faces_dir())
    if store.latest() is None:
        if data_file is None:
            return
        store, _ = open_store(store.root, data_file)
    try:
        version = store.resolve(config.data.faces_version)
    except UnknownVersionError as error:
        raise FacesVersionError(f"data.faces_version: {error}") from None
    rows = store.manifest(version)
    check_config_against(FaceLabels.of([r["image_id"] for r in rows], [r["person"] for r in rows]), config,
                         forgotten_endpoints(models_dir()))


def run(**options: Any) -> None:
    """Run the whole pipeline: fetch, PCA, train, sample, score, interpolate, report."""
    as_json = options.pop("json_output")
    config = _validated_config(options)
    start_timeout = _refuse_bad_input(config)

    def work(api_url: str) -> dict[str, Any]:
        from commands.runner import run_pipeline

        return run_pipeline(config, api_url)

    summary = _on_a_server("run", start_timeout, work, "the flow run is marked Crashed and the server it started is stopped")
    if as_json:
        typer.echo(json.dumps(summary, allow_nan=False, default=str))
    else:
        typer.echo(f"report: {summary['output_dir']}/report.md")
        heldout = summary["metrics"]["heldout_log_prob"]  # a string when not finite
        typer.echo(f"held-out log p: {heldout if isinstance(heldout, str) else f'{heldout:.2f}'} nats per face")
        for task_name, state in summary["tasks"].items():
            typer.echo(f"  {task_name:<18} {state}")
        for problem in summary["repaired"]:
            typer.echo(f"repaired the run folder: {problem}")


def retrain(**options: Any) -> None:
    """Train a challenger now, as weekly-retrain does, and promote it only if it beats the champion on validation faces."""
    as_json = options.pop("json_output")
    margin = options.pop("promotion_margin")
    if options["validation_fraction"] is None:
        options["validation_fraction"] = RETRAIN_VALIDATION_FRACTION  # promotion compares validation faces
    config = _validated_config(options)
    if config.data.validation_fraction <= 0:
        typer.echo("faceflow retrain refused: data.validation_fraction (--validation-fraction) must be above 0: "
                   "a challenger is judged on its validation faces", err=True)
        raise typer.Exit(code=2)
    start_timeout = _refuse_bad_input(config, "retrain")

    def work(api_url: str) -> dict[str, Any]:
        from commands.runner import run_retrain

        return run_retrain(config, api_url, margin)

    summary = _on_a_server("retrain", start_timeout, work, "the flow run is marked Crashed and the server it started is stopped")
    if as_json:
        typer.echo(json.dumps(summary, allow_nan=False, default=str))
        return
    typer.echo(f"{'promoted' if summary['promoted'] else 'kept the champion'}: {summary['reason']}")
    typer.echo(f"challenger: {summary['challenger']['run folder']}")


def _config_signature(with_json: bool) -> inspect.Signature:
    parameters = []
    for path, info in config_fields():
        kind = _option_type(info.annotation)
        default_shown = str(info.default)
        extra = {"envvar": DATA_FILE_VARIABLE} if path[-1] == "data_file" else {}
        declaration = option_name(path)
        if kind is bool:  # a pair of flags, so a True default can be switched off
            declaration = f"{declaration}/--no-{declaration.removeprefix('--')}"
        option = typer.Option(
            declaration, help=_help(info), show_default=default_shown, **extra,
            rich_help_panel=path[0] if len(path) > 1 else "run",
        )
        parameters.append(
            inspect.Parameter(path[-1], inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, option])
        )
    if with_json:
        json_option = typer.Option("--json", help="Print one JSON object as the last line of stdout.")
        parameters.append(
            inspect.Parameter("json_output", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[bool, json_option])
        )
    return inspect.Signature(parameters)


run.__signature__ = _config_signature(with_json=True)  # type: ignore[attr-defined]
app.command("run")(run)


_margin_option = typer.Option("--margin", help="Nats of validation log p (of the faces' pixels) the challenger must gain.", min=0.0, max=100.0)
retrain.__signature__ = _config_signature(with_json=True).replace(  # type: ignore[attr-defined]
    parameters=[*_config_signature(with_json=True).parameters.values(), inspect.Parameter(
        "promotion_margin", inspect.Parameter.KEYWORD_ONLY, default=0.5, annotation=Annotated[float, _margin_option])],
)
app.command("retrain")(retrain)


def show_config(**options: Any) -> None:
    """Print the config tree a run with these options would use, as JSON; runs nothing."""
    typer.echo(_validated_config(options).model_dump_json(indent=1))


show_config.__signature__ = _config_signature(with_json=False)  # type: ignore[attr-defined]
app.command("show-config")(show_config)


def ui(
    port: Annotated[int, typer.Option(help="Port of the server and its UI.", min=1, max=65535)] = 4200,
    host: Annotated[str, typer.Option(help="Address the server listens on; beyond 127.0.0.1 only with an auth string "
                                           "(PREFECT_API_AUTH_STRING or FACEFLOW_AUTH_FILE, docs/operations.md).")] = "127.0.0.1",
) -> None:
    """The Prefect UI with faceflow's deployments and a worker; Ctrl-C stops all of it."""
    from commands.ui import UIError, refuse_open_host, serve_ui

    try:
        refuse_open_host(host)
    except SettingError as error:
        typer.echo(f"faceflow ui refused: {error}", err=True)
        raise typer.Exit(code=2) from None
    try:
        serve_ui(port, server_start_timeout(), host)
    except (ServerError, UIError, SettingError) as error:
        typer.echo(f"faceflow ui failed: {error}", err=True)
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        typer.echo("faceflow ui stopped: worker, flow runs and server", err=True)
    except SystemExit:  # SIGTERM (commands/signals.py): the same stop, and its exit status kept
        typer.echo("faceflow ui stopped: worker, flow runs and server", err=True)
        raise


app.command("ui")(ui)


champion_app = typer.Typer(help="The champion model, the registry's history and checks, and rollback.")


@champion_app.callback(invoke_without_command=True)
def champion(
    context: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="Print the record (or the history) as JSON.")] = False,
    history: Annotated[bool, typer.Option("--history", help="Every champion of the registry, oldest promotion first.")] = False,
    check: Annotated[bool, typer.Option("--check", help="Check that the link, the faceflow-champion Variable and the "
                                         "leaderboard agree, finishing or undoing an interrupted promotion (every row and "
                                         "champion folder kept).")] = False,
) -> None:
    """The champion model: its run folder, flow run, seed, faces version, validation and held-out log p, and if it is stale."""
    if context.invoked_subcommand is not None:
        return
    from tasks.champion import resolve_champion

    if check:
        _check_registry(json_output)
        return
    if history:
        _print_history(json_output)
        return
    champion = resolve_champion(models_dir())  # the link read once: the folder printed is the record's
    if champion is None:
        typer.echo(f"no champion in {models_dir()} yet: the weekly-retrain deployment promotes the first one", err=True)
        raise typer.Exit(code=1)
    record = champion.record
    stale = _stale(record)
    if json_output:
        typer.echo(json.dumps(record.to_json() | {"stale": stale}))
        return
    typer.echo(f"champion: {champion.path} (from {record.run_folder})")
    typer.echo(f"  promoted {record.promoted_at}, flow run {record.flow_run_id}, seed {record.seed}, "
               f"faces version {record.faces_version[:12] or 'none (before versions)'}")
    typer.echo(f"  validation log p {record.validation_log_prob:.2f}, held-out log p {record.heldout_log_prob:.2f} nats per face")
    if stale:
        typer.echo(f"  STALE: {stale}; the next retraining replaces it whatever the margin")


def _stale(record: Any) -> str | None:
    from tasks.forgetting import stale_reason
    from tasks.store import FaceStore

    return stale_reason(FaceStore(faces_dir()), record.faces_version)


def _print_history(json_output: bool) -> None:
    from tasks.registry import champions

    found = champions(models_dir())
    if json_output:
        typer.echo(json.dumps([{"folder": c.folder, "current": c.current, "stale": _stale(c.record)} | c.record.to_json()
                               for c in found]))
        return
    if not found:
        typer.echo(f"no champion in {models_dir()} yet", err=True)
        raise typer.Exit(code=1)
    for c in found:
        mark = "  current" if c.current else ""
        mark += "  STALE" if _stale(c.record) else ""
        typer.echo(f"{c.folder:<40} promoted {c.record.promoted_at}  seed {c.record.seed:<11} validation log p "
                   f"{c.record.validation_log_prob:9.2f}  faces version {c.record.faces_version[:12] or '-':<12}{mark}")


def _on_the_registry(command: str, work: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """``work(alias)`` with the faceflow-champion Variable of the server this PREFECT_HOME uses (started here if none)."""
    from tasks.champion import ChampionError

    def on_server(api_url: str) -> dict[str, Any]:
        from commands.runner import recorded_at
        from tasks.steps import ChampionVariable

        with recorded_at(api_url):
            try:
                return work(ChampionVariable())
            except ChampionError as error:
                return {"refused": str(error)}

    done = _on_a_server(command, server_start_timeout(), on_server, "nothing was changed")
    if "refused" in done:
        typer.echo(f"faceflow {command} refused: {done['refused']}", err=True)
        raise typer.Exit(code=2)
    return done


def _check_registry(json_output: bool) -> None:
    from tasks.registry import check

    done = _on_the_registry("champion --check", lambda alias: {"found": check(models_dir(), alias)})
    if json_output:
        typer.echo(json.dumps(done))
        return
    for line in done["found"]:
        typer.echo(f"repaired: {line}")
    typer.echo("the registry is consistent: the link, the faceflow-champion Variable and the leaderboard agree"
               + (" now" if done["found"] else ""))


@champion_app.command("rollback")
def rollback(
    to: Annotated[str | None, typer.Option("--to", help="The champion to make current: its folder name (or a prefix), "
                                           "or its flow run id; default the one promoted before the current one.")] = None,
    reason: Annotated[str, typer.Option("--reason", help="Why: recorded on the leaderboard.")] = "rolled back by hand",
    json_output: Annotated[bool, typer.Option("--json", help="Print the new current champion as JSON.")] = False,
) -> None:
    """Make an earlier champion current again; the leaderboard records who and why."""
    import getpass

    def work(alias: Any) -> dict[str, Any]:
        from tasks.steps import roll_back_champion

        # Its event (and with it the "champion changed" alert) is sent before the command's server stops.
        chosen, _ = roll_back_champion(to, getpass.getuser(), reason)
        return {"folder": chosen.folder} | chosen.record.to_json()

    done = _on_the_registry("champion rollback", work)
    if json_output:
        typer.echo(json.dumps(done))
        return
    typer.echo(f"champion: {done['folder']} (from {done['run_folder']}), validation log p {done['validation_log_prob']:.2f}")


app.add_typer(champion_app, name="champion")


def sample(
    n: Annotated[int, typer.Option("--n", help="Faces to draw.", min=1, max=1024)] = 16,
    out: Annotated[Path, typer.Option("--out", help="Folder for samples.png and samples.npy.")] = Path("samples"),
    temperature: Annotated[float, typer.Option(help="Scale of the base distribution (0 < T <= 1).")] = 0.8,
    seed: Annotated[int, typer.Option(help="Seed of the draw.", min=0)] = 0,
) -> None:
    """New faces from the champion, without a flow run: OUT/samples.png and OUT/samples.npy."""
    if not 0.0 < temperature <= 1.0:
        typer.echo(f"faceflow sample refused: --temperature {temperature:g}: expected 0 < T <= 1", err=True)
        raise typer.Exit(code=2)
    _refuse_unwritable(out)
    from artifacts import figures
    from tasks.champion import ChampionError
    from tasks.champion_model import champion_samples, open_champion

    try:
        images = champion_samples(open_champion(models_dir()), n, temperature, seed)
    except ChampionError as error:
        typer.echo(f"faceflow sample failed: {error}", err=True)
        raise typer.Exit(code=1) from None
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "samples.npy", images)
    title = f"{n} faces from the champion at T={temperature:g}, seed {seed}"
    (out / "samples.png").write_bytes(figures.png_bytes(figures.face_grid(images, title)))
    typer.echo(f"{n} faces: {out / 'samples.png'} and {out / 'samples.npy'} ({n} x 64 x 64, values in [0, 1])")


app.command("sample")(sample)


def score(
    images: Annotated[Path, typer.Argument(help="A .npy of faces: (n, 64, 64) or (n, 4096), values in [0, 1].")],
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """log p of your own 64x64 faces under the champion, in nats per face: of its PCA coordinates, and of the pixels."""
    from tasks.champion import ChampionError
    from tasks.champion_model import champion_image_log_prob, champion_log_prob, open_champion, read_user_faces

    try:
        faces = read_user_faces(images)
    except ChampionError as error:
        typer.echo(f"faceflow score refused: {error}", err=True)
        raise typer.Exit(code=2) from None
    try:
        champion = open_champion(models_dir())  # the link resolved once: both figures from one champion
        log_p = champion_log_prob(champion, faces)
        image_log_p = champion_image_log_prob(champion, faces)
    except ChampionError as error:
        typer.echo(f"faceflow score failed: {error}", err=True)
        raise typer.Exit(code=1) from None
    if json_output:
        answer = {"champion": champion.folder.name, "log_prob": [json_safe(v) for v in log_p.tolist()],
                  "mean": json_safe(float(log_p.mean()))}
        if image_log_p is not None:  # of the 4096 pixels: comparable between champions of different PCAs
            answer |= {
                "image_log_prob": [json_safe(v) for v in image_log_p.tolist()],
                "image_mean": json_safe(float(image_log_p.mean())),
                "image_bits_per_pixel": json_safe(-float(image_log_p.mean()) / (faces.shape[1] * math.log(2))),
            }
        typer.echo(json.dumps(answer))
        return
    for index, value in enumerate(log_p):
        typer.echo(f"face {index}: {value:.2f}" + (f" (pixels: {image_log_p[index]:.2f})" if image_log_p is not None else ""))
    typer.echo(f"mean log p: {float(log_p.mean()):.2f} nats per face over {len(log_p)} faces (PCA coordinates)")
    if image_log_p is not None:
        mean = float(image_log_p.mean())
        typer.echo(f"mean log p of the pixels: {mean:.2f} nats per face, {-mean / (faces.shape[1] * math.log(2)):.3f} bits per pixel")


app.command("score")(score)


def sweep(
    spec: Annotated[Path, typer.Argument(help="A YAML or JSON sweep spec: base, grid and/or random (docs/sweeps.md).")],
    dask_address: Annotated[str | None, typer.Option(help="An existing Dask scheduler: tls://host:8786 with FACEFLOW_DASK_TLS_CA/CERT/KEY, tcp:// on this machine only; default: a LocalCluster.")] = None,
    workers: Annotated[int, typer.Option(help="LocalCluster worker processes (1 thread each).", min=1, max=256)] = os.cpu_count() or 1,
    promote: Annotated[bool, typer.Option(help="Offer the best configuration to the champion (validation log p).")] = False,
    margin: Annotated[float, typer.Option(help="Nats of validation log p a promotion needs.", min=0.0)] = 0.5,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")] = False,
) -> None:
    """Train and score many configurations on Dask; print them ranked by validation log p."""
    from faceflow.sweeps import SpecError, expand, read_spec

    try:
        parsed = read_spec(spec)
        configurations = expand(parsed)
        start_timeout = server_start_timeout()
        if dask_address:  # TLS files and the address's scheme, before any server or flow starts (flows/sweep.py)
            from faceflow.settings import dask_address_problem, dask_tls

            if problem := dask_address_problem(dask_address, dask_tls()):
                raise SettingError(f"--dask-address {dask_address}: {problem}")
    except (SpecError, SettingError) as error:
        typer.echo(f"faceflow sweep refused: {error}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(f"sweep of {len(configurations)} configurations on {dask_address or f'a LocalCluster of {workers} workers'}", err=True)

    def work(api_url: str) -> dict[str, Any]:
        from commands.runner import run_sweep

        return run_sweep(parsed, api_url, dask_address, workers, promote, margin)

    summary = _on_a_server("sweep", start_timeout, work, "the cluster and the server it started are stopped")
    if json_output:
        typer.echo(json.dumps(summary, allow_nan=False, default=str))
        return
    for row in summary["rows"]:
        outcome = row["error"] or f"validation {row['validation log p']:.2f}, held-out {row['held-out log p']:.2f}"
        typer.echo(f"{row['rank']:>3}. configuration {row['configuration']} ({row['values']}): {outcome}")
    if summary["promotion"]:
        typer.echo(f"promotion: {summary['promotion']['reason']}")


app.command("sweep")(sweep)


def ingest(
    path: Annotated[Path, typer.Argument(help="A folder with one sub-folder of images per person (PNG, JPEG, PGM), an .npz with images (n, 64, 64) and people (n,), or a .mat in the Olivetti layout.")],
    resize: Annotated[bool, typer.Option("--resize/--no-resize", help="Resize images that are not 64x64 (said per file); --no-resize refuses them.")] = True,
    readmit: Annotated[bool, typer.Option("--readmit", help="Accept images of a forgotten person (refused otherwise, "
                                          "naming the erasure); the readmission is recorded in the erasure log.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")] = False,
) -> None:
    """Add faces to the face store as a new version: the latest one plus every image it does not hold yet.

    With a Prefect server running (`make ui`, or PREFECT_API_URL) it runs as the faceflow-ingest
    flow there: the dataset card is an artifact and the new version an event, which triggers the
    weekly-retrain deployment. Without one, the version is stored and nothing is announced.
    """
    from commands.server import recorded_server
    from tasks.data import DataUnavailableError
    from tasks.importers import ingest as ingest_into, read_input, summary
    from tasks.store import StoreError

    api_url = api_url_from_environment() or recorded_server(prefect_home())
    _refuse_refused_credentials("ingest", api_url)
    try:
        if api_url is None:
            ingested = ingest_into(path, resize, faces_dir(), data_file_from_environment(), models=models_dir(),
                                   readmit=readmit, asked_by=f"user {getpass.getuser()}")
            notes, done = ingested.notes, summary(ingested)
        else:
            notes = read_input(path, resize).notes  # refused here, before any flow run, if it is bad
            done = _ingest_on_server(path, resize, readmit, api_url)
    except (StoreError, DataFileError) as error:
        typer.echo(f"faceflow ingest refused: {error}", err=True)
        raise typer.Exit(code=2) from None
    except (DataUnavailableError, OSError) as error:
        typer.echo(f"faceflow ingest failed: {error}", err=True)
        raise typer.Exit(code=1) from None
    for note in notes:
        typer.echo(note, err=True)
    if api_url is None and done["version"] is not None:
        typer.echo("no Prefect server is running (make ui): the version is stored, but no event announced it, "
                   "so no retraining was triggered", err=True)
    _print_ingest(done, path, json_output)


def _ingest_on_server(path: Path, resize: bool, readmit: bool, api_url: str) -> dict:
    """The faceflow-ingest flow, recorded by the server at ``api_url``: store, dataset card, event."""
    from commands.runner import recorded_at
    from flows.ingest import faceflow_ingest

    with recorded_at(api_url):
        state = faceflow_ingest(path=path, resize=resize, readmit=readmit, return_state=True)
    return state.result()  # raises what refused the input


def _print_ingest(done: dict, path: Path, json_output: bool) -> None:
    version, previous = done["version"], done["previous"]
    if json_output:
        typer.echo(json.dumps(done | {"version": version or previous, "new_version": version is not None}))
        return
    skipped = done["duplicates"] + done["repeated"]
    if done["relabelled"]:
        typer.echo(f"{done['relabelled']} duplicates carry another person's name here; the stored name stays", err=True)
    if version is None:
        typer.echo(f"nothing new: all {skipped} images are already in version {previous['number']} ({previous['id'][:12]})")
        return
    typer.echo(
        f"version {version['number']} ({version['id'][:12]}): {version['images']} images of {version['people']} people, "
        f"{done['added']} added, {skipped} duplicates skipped ({done['repeated']} repeated within {path})"
    )


app.command("ingest")(ingest)


def forget(
    person: Annotated[str, typer.Argument(help="The person's label in the face store (`faceflow faces latest` lists them).")],
    purge: Annotated[bool, typer.Option("--purge", help="Also delete the older versions that hold them, and every run "
                                        "folder, champion, cached task result, checkpoint, persisted run result and "
                                        "artifact computed from those versions.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Change nothing: list every place that still holds their "
                                         "faces or something computed from them (exit status 1 when one does).")] = False,
    outputs: Annotated[list[Path] | None, typer.Option("--outputs", help="A folder of run folders to purge (repeatable; "
                                                        "default outputs/), besides those the leaderboard names.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")] = False,
) -> None:
    """Forget a person: a new faces version without their images; a champion fitted on them becomes stale.

    With a Prefect server running (`make ui`, or PREFECT_API_URL) it runs as the faceflow-forget
    flow there, and the new version's event triggers the weekly-retrain deployment, which replaces
    a stale champion. Without --purge the older versions keep their images, so old runs stay
    reproducible; with it nothing derived from them is left (docs/data.md says what is deleted, where).
    --purge and --verify need the server's artifacts: without a running server they start one.
    Every forget is one line of the erasure log (models/erasures.jsonl).
    """
    from commands.server import recorded_server
    from flows.forget import forget_here
    from tasks.store import check_person

    output_dirs = outputs or [Path("outputs")]
    try:
        check_person(person, "person")
        if verify and purge:
            raise StoreError("--verify changes nothing and --purge deletes: give one of them")
        if verify:
            from tasks.forgetting import refuse_unless_forgotten

            refuse_unless_forgotten(models_dir(), person)  # before a server is started for nothing
        api_url = api_url_from_environment() or recorded_server(prefect_home())
        _refuse_refused_credentials("forget", api_url)
        if api_url is None and not (purge or verify):
            done: dict[str, Any] = {"done": forget_here(person, purge, output_dirs)}
        else:
            done = _on_a_server("forget", server_start_timeout(), lambda url: _forget_on_server(person, purge, verify, output_dirs, url),
                                "nothing was deleted after the interruption; `faceflow forget --verify` lists what is left")
        if "refused" in done:
            raise StoreError(done["refused"])
    except StoreError as error:
        typer.echo(f"faceflow forget refused: {error}", err=True)
        raise typer.Exit(code=2) from None
    except OSError as error:
        typer.echo(f"faceflow forget failed: {error}", err=True)
        raise typer.Exit(code=1) from None
    if verify:
        _print_verify(person, done["found"], json_output)
        return
    _print_forget(person, done["done"], api_url, json_output)


def _forget_on_server(person: str, purge: bool, verify: bool, output_dirs: list[Path], api_url: str) -> dict[str, Any]:
    """The faceflow-forget (or -verify) flow, recorded by the server at ``api_url``; a refusal as {"refused": message}."""
    from commands.runner import recorded_at
    from flows.forget import faceflow_forget, faceflow_forget_verify

    try:
        with recorded_at(api_url):
            if verify:
                return {"found": faceflow_forget_verify(person=person, output_dirs=output_dirs, return_state=True).result()}
            return {"done": faceflow_forget(person=person, purge=purge, output_dirs=output_dirs, return_state=True).result()}
    except StoreError as error:
        return {"refused": str(error)}


def _print_verify(person: str, found: list[str], json_output: bool) -> None:
    if json_output:
        typer.echo(json.dumps({"person": person, "found": found}))
    elif not found:
        typer.echo(f"nothing of {person} found: face store, run folders, registry, result storage, cache index, "
                   "lock files, checkpoints, persisted results and the server's artifacts")
    else:
        for place in found:
            typer.echo(place)
    if found:
        raise typer.Exit(code=1)


def _print_forget(person: str, done: dict[str, Any], api_url: str | None, json_output: bool) -> None:
    if json_output:
        typer.echo(json.dumps(done))
        return
    version = done["version"]
    if version:
        typer.echo(f"version {version['number']} ({version['id'][:12]}): {version['images']} images of "
                   f"{version['people']} people; {done['images']} images of {person} left out")
        typer.echo(f"{_count(len(done['retired']), 'version')} held {person}: "
                   "a champion fitted on one is stale until the next retraining")
    if api_url is None and version and not done["purged"]:
        typer.echo("no Prefect server is running (make ui): no event announced the version, so no retraining was triggered",
                   err=True)
    if done["purged"]:
        purged = done["purged"]
        typer.echo(f"purged {_count(len(purged['versions']), 'version')}, {_count(len(purged['run_folders']), 'run folder')}, "
                   f"{_count(len(purged['champions']), 'champion folder')}, {_count(purged['cached_results'], 'cached task result')}, "
                   f"{_count(purged['checkpoints'], 'checkpoint')}, {_count(purged['flow_results'], 'persisted result')}, "
                   f"{_count(purged['artifacts'], 'artifact')}")
    typer.echo(f"erasure {done['erasure']} recorded in the erasure log")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


app.command("forget")(forget)


def faces(
    version: Annotated[str | None, typer.Argument(help="A version (number, id or id prefix, 'latest'): list its people instead.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON value.")] = False,
) -> None:
    """The face store's versions, oldest first (number, id, created, people, images, added), or one version's people."""
    from tasks.store import FaceStore, StoreError

    store = FaceStore(faces_dir())
    if version is not None:
        try:
            chosen = store.resolve(version)
        except StoreError as error:
            typer.echo(f"faceflow faces refused: {error}", err=True)
            raise typer.Exit(code=2) from None
        rows = store.manifest(chosen)
        counts: dict[str, int] = {}
        for row in rows:
            counts[row["person"]] = counts.get(row["person"], 0) + 1
        if json_output:
            typer.echo(json.dumps({"version": chosen.to_json(), "people": counts}))
            return
        typer.echo(f"version {chosen.number} ({chosen.id}): {chosen.images} images of {chosen.people} people")
        for person, count in counts.items():
            typer.echo(f"  {person:<24} {count:>5}")
        return
    versions = store.versions()
    if json_output:
        typer.echo(json.dumps([version.to_json() for version in versions]))
        return
    if not versions:
        typer.echo(f"no versions in {store.root} yet: the first run or ingest makes version 1 from the Olivetti faces")
        return
    latest, retired = store.latest(), store.retired()
    typer.echo(f"{'version':>7}  {'id':<12}  {'created':<25}  {'people':>6}  {'images':>6}  {'added':>6}")
    for version in versions:
        mark = "  latest" if latest and version.id == latest.id else ""
        mark += f"  forgot {', '.join(version.forgotten)}" if version.forgotten else ""
        mark += f"  holds {', '.join(retired[version.id])}, forgotten since" if version.id in retired else ""
        typer.echo(
            f"{version.number:>7}  {version.short:<12}  {version.created:<25}  {version.people:>6}  "
            f"{version.images:>6}  {version.added:>6}{mark}"
        )


app.command("faces")(faces)


def _refuse_refused_credentials(command: str, api_url: str | None) -> None:
    """One line and status 1 when the server at ``api_url`` refuses this process's auth string (or asks for one)."""
    from commands.server import check_credentials

    if api_url is None:
        return
    try:
        check_credentials(api_url)
    except ServerError as error:
        typer.echo(f"faceflow {command} failed: {error}", err=True)
        raise typer.Exit(code=1) from None


def _is_unauthorized(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a 401 from the Prefect server."""
    while error is not None:
        response = getattr(error, "response", None)
        if getattr(response, "status_code", None) == 401:
            return True
        error = error.__cause__ or error.__context__
    return False


def _refuse_unwritable(folder: Path) -> None:
    try:
        check_output_folder(folder, required_free_bytes=1 << 20)
    except OutputFolderError as error:
        typer.echo(f"refused: {error}", err=True)
        raise typer.Exit(code=2) from None


def main() -> None:
    # No telemetry leaves the machine unless the user asks for it; a server started here inherits this.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    signals.install()  # SIGTERM and Ctrl-C unwind every `with` and `finally`, never mid-import
    try:
        app()
    except SystemExit as finished:
        status = finished.code if isinstance(finished.code, int) else (0 if finished.code is None else 1)
    except Exception as error:
        if not _is_unauthorized(error):
            raise
        # The server refused the auth string mid-command (it changed, or a command took none): one line, no traceback.
        print(f"faceflow failed: the Prefect server refused the request (401 Unauthorized): set {AUTH_STRING_VARIABLE} "
              "(or FACEFLOW_AUTH_FILE) to the server's user:password", file=sys.stderr)
        status = 1
    else:
        status = 0
    # Every command has flushed what must reach the API and stopped what it started by now.
    # Tearing down torch, scikit-learn and Prefect module by module took 1.2 s of a 6.7 s
    # cached re-run; exit without it.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(status)


if __name__ == "__main__":
    main()
