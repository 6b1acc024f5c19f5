"""Each task's final state in a flow run, taken from the run itself."""

from __future__ import annotations

from typing import Any, TypeVar

from prefect import Task

R = TypeVar("R")


class TaskStates:
    """Runs tasks for a flow and keeps each one's final state name ("Completed", "Cached", ...).

    The flow returns these names, so a run's summary never reads task runs back from the
    API: Prefect records them through asynchronous events, and a read right after the flow
    returns can see a task still Pending or not at all.
    """

    def __init__(self) -> None:
        self.names: dict[str, str] = {}

    def run(self, task: Task[..., R], *args: Any, **kwargs: Any) -> R:
        """Call ``task`` in this flow; return its result, raising its error if it failed."""
        state = task(*args, return_state=True, **kwargs)
        self.names[task.name] = state.name
        return state.result()

    def rows(self) -> list[dict[str, object]]:
        """One row per task: served from the cache or computed, for the run's faceflow-cache table."""
        return [
            {"task": name, "state": state, "served from cache": state == "Cached"} for name, state in self.names.items()
        ]
