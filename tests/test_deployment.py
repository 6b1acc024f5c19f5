"""prefect.yaml points at the real flow, and the flow's parameter renders as a described form."""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect.flows import load_flow_from_entrypoint
from prefect.utilities.callables import parameter_schema

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_every_deployment_entrypoint_loads_its_flow() -> None:
    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    flows = {d["name"]: load_flow_from_entrypoint(str(REPO_ROOT / d["entrypoint"])).name for d in spec["deployments"]}
    assert flows == {"on-demand": "faceflow", "weekly-retrain": "faceflow-retrain", "sweep": "faces-sweep", "ingest": "faceflow-ingest",
                     "forget": "faceflow-forget", "rollback": "faceflow-rollback"}


def test_the_weekly_retraining_schedule_is_active() -> None:
    spec = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    weekly = next(d for d in spec["deployments"] if d["name"] == "weekly-retrain")
    assert weekly["schedules"] == [{"cron": "0 3 * * 1", "timezone": "UTC", "active": True}]


def test_flow_parameter_schema_has_every_section_with_descriptions() -> None:
    from flows.pipeline import faceflow_pipeline

    schema = parameter_schema(faceflow_pipeline).model_dump()
    definitions = schema["definitions"]
    config = definitions["FaceflowConfig"]["properties"]
    assert {"data", "pca", "train", "sample", "interpolate", "baselines", "seed", "output_dir"} <= set(config)
    epochs = definitions["TrainConfig"]["properties"]["epochs"]
    assert epochs["minimum"] == 1 and epochs["description"]
    assert definitions["SampleConfig"]["properties"]["temperature"]["exclusiveMinimum"] == 0.0
