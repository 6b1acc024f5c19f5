"""faceflow's alerts: three Prefect Automations, created or updated by name each time `faceflow ui` starts.

- "faceflow: retraining or sweep failed": a flow run of ``faceflow-retrain`` or ``faces-sweep``
  entering Failed or Crashed sends a notification naming the run, its state and message, and
  its page in the UI;
- "faceflow: champion changed": the ``faceflow.champion.promoted`` and
  ``faceflow.champion.rolled-back`` events (tasks/steps.py) send one naming the champion and why;
- "faceflow: runs whose heartbeats stopped are crashed": Prefect's documented zombie-run
  automation, for the runs of faceflow's deployments and their sub-flows (tag ``faceflow``),
  widened to runs still starting: a flow run that entered Pending, Submitting or Running, or sent
  a heartbeat (``prefect.flow-run.heartbeat``), and then sends no heartbeat and no state change
  (``prefect.flow-run.*``) within three heartbeat intervals (Prefect's documented window) is set
  Crashed, and so alerts like any crash. A run whose process died before its first heartbeat (while
  importing its flow) is caught too.

Notifications go to the Prefect notification block named by FACEFLOW_ALERT_BLOCK
(``<block-type-slug>/<block-name>``). Unset, the two notification automations are created
disabled, their description saying how to point them somewhere; ones that exist are left as they are.

Prefect is imported inside the functions: PREFECT_API_URL is only known once the server is up.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from faceflow.settings import ALERT_BLOCK_VARIABLE, SettingError, alert_block

if TYPE_CHECKING:
    from prefect.automations import Automation

FAILED = "faceflow: retraining or sweep failed"
CHAMPION_CHANGED = "faceflow: champion changed"
CRASHED = "faceflow: runs whose heartbeats stopped are crashed"
NAMES = (FAILED, CHAMPION_CHANGED, CRASHED)
ALERTED_FLOWS = ["faceflow-retrain", "faces-sweep"]  # the flows' names (flows/retrain.py, flows/sweep.py)
DEPLOYMENT_TAG = "faceflow"  # prefect.yaml gives every deployment (and so each of its runs) this tag
HEARTBEATS_BEFORE_CRASHED = 3  # a run is Crashed once this many heartbeat intervals pass without one
# The events after which a faceflow run that then goes silent is Crashed: it is starting or running.
ARMING_EVENTS = ("prefect.flow-run.Pending", "prefect.flow-run.Submitting", "prefect.flow-run.Running",
                 "prefect.flow-run.heartbeat")
UNSET = (f"Disabled: alerts go nowhere until {ALERT_BLOCK_VARIABLE} names a Prefect notification block "
         "(<block-type-slug>/<block-name>, e.g. custom-webhook/faceflow-alerts) and `faceflow ui` is started again; "
         "see docs/operations.md, Alerts.")


class AlertError(SettingError):
    """FACEFLOW_ALERT_BLOCK names a block the server does not have, or one that cannot notify."""


def notification_block() -> UUID | None:
    """The id of the block FACEFLOW_ALERT_BLOCK names on the current server; None when the variable is unset."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    named = alert_block()
    if named is None:
        return None
    slug, name = named
    with get_client(sync_client=True) as client:
        try:
            block = client.read_block_document_by_name(name, slug, include_secrets=False)
        except ObjectNotFound:
            raise AlertError(
                f"{ALERT_BLOCK_VARIABLE}={slug}/{name}: the Prefect server at {client.api_url} has no {slug!r} block "
                f"named {name!r}; create it (docs/operations.md, Alerts) or unset {ALERT_BLOCK_VARIABLE}"
            ) from None
    if block.block_schema is not None and "notify" not in block.block_schema.capabilities:
        raise AlertError(f"{ALERT_BLOCK_VARIABLE}={slug}/{name}: a {slug!r} block cannot send notifications; "
                         "name a notification block (custom-webhook, slack-webhook, ...)")
    return block.id


def _notify(block_id: UUID | None, subject: str, body: str) -> list:
    from prefect.events.actions import DoNothing, SendNotification

    if block_id is None:
        return [DoNothing()]
    return [SendNotification(block_document_id=block_id, subject=subject, body=body)]


def _notifying(name: str, what: str, block_id: UUID | None, trigger: Any, message: tuple[str, str]) -> Automation:
    """An automation that sends ``message`` (subject, body templates) to the block; disabled, saying so, without one."""
    from prefect.automations import Automation

    enabled = block_id is not None
    return Automation(name=name, description=what + ("" if enabled else " " + UNSET), enabled=enabled, trigger=trigger,
                      actions=_notify(block_id, *message))


def automations(block_id: UUID | None, ui_url: str, heartbeat_seconds: int) -> list[Automation]:
    """The three automations, notifying block ``block_id`` (None: disabled), linking to the UI at ``ui_url``."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    run_link = f"{ui_url.rstrip('/')}/runs/flow-run/{{{{ flow_run.id }}}}"
    failed = _notifying(
        FAILED, "A run of faceflow-retrain or faces-sweep entered Failed or Crashed: a notification names it.", block_id,
        EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": ALERTED_FLOWS},
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive, threshold=1, within=timedelta(0),
        ),
        (
            "faceflow: {{ flow.name }} run {{ flow_run.name }} {{ event.resource['prefect.state-name'] }}",
            "Flow run {{ flow_run.name }} ({{ flow_run.id }}) of {{ flow.name }} entered "
            "{{ event.resource['prefect.state-name'] }}: {{ event.resource['prefect.state-message'] }}\n" + run_link,
        ),
    )
    champion = _notifying(
        CHAMPION_CHANGED, "A champion was promoted or rolled back: a notification names it and why.", block_id,
        EventTrigger(
            expect={"faceflow.champion.promoted", "faceflow.champion.rolled-back"},
            match={"prefect.resource.id": "faceflow.champion.*"},
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive, threshold=1, within=timedelta(0),
        ),
        (
            "faceflow: {{ event.payload.folder }} is the champion ({{ event.event }})",
            "{{ event.event }}: {{ event.payload.folder }} (run folder {{ event.payload.run_folder }}, flow run "
            "{{ event.payload.flow_run_id }}, faces version {{ event.payload.faces_version }}, validation log p "
            "{{ event.payload.validation_log_prob }}) by {{ event.payload.who or 'faceflow' }}: {{ event.payload.why }}",
        ),
    )
    crashed = Automation(
        name=CRASHED,
        description=(f"Prefect's zombie-run automation for faceflow's deployment runs and their sub-flows: a Pending, "
                     f"Submitting or Running run without a heartbeat or a state change for "
                     f"{HEARTBEATS_BEFORE_CRASHED * heartbeat_seconds} s (heartbeats every {heartbeat_seconds} s, "
                     "PREFECT_FLOWS_HEARTBEAT_FREQUENCY) is set Crashed."),
        enabled=True,
        trigger=EventTrigger(
            # Armed by a run starting (the worker's Pending and Submitting, the engine's Running) as
            # well as by each heartbeat: a process that dies while importing its flow sends none.
            after=set(ARMING_EVENTS),
            # Any heartbeat or state change of the run disarms it; the arming ones arm it again.
            expect={"prefect.flow-run.*"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            # Only faceflow's deployment runs, whose worker (`faceflow ui`) sets their heartbeat: a run
            # started elsewhere (`faceflow run`) keeps Prefect's default of one every 180 s.
            match_related={"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{DEPLOYMENT_TAG}"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=HEARTBEATS_BEFORE_CRASHED * heartbeat_seconds),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat or state change for "
                                            f"{HEARTBEATS_BEFORE_CRASHED * heartbeat_seconds} s: "
                                            "its process died (marked by the automation 'faceflow: runs whose "
                                            "heartbeats stopped are crashed')")],
    )
    return [failed, champion, crashed]


def ensure_automations(block_id: UUID | None, ui_url: str, heartbeat_seconds: int) -> list[Automation]:
    """Create each automation, or update the one of its name (and delete any duplicate of it): idempotent.

    Without a block, a notification automation that exists is left as it is: another machine's
    `make ui` (or an earlier one) may have pointed it at a block, and this one must not silence it.
    """
    from prefect.client.orchestration import get_client

    done = []
    with get_client(sync_client=True) as client:
        for automation in automations(block_id, ui_url, heartbeat_seconds):
            existing = client.read_automations_by_name(automation.name)
            if existing and block_id is None and automation.name != CRASHED:
                done.append(existing[0])
            elif existing:
                automation.id = existing[0].id
                automation.update()
                for duplicate in existing[1:]:
                    client.delete_automation(duplicate.id)
            else:
                automation.create()
            done.append(automation)
    return done
