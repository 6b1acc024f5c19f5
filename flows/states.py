"""Each task's final state in a flow run, taken from the run itself."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from prefect import Task
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run

from tasks.steps import stop_steps_of

R = TypeVar("R")


class TaskStates:
    """Runs tasks for a flow and keeps each one's final state name ("Completed", "Cached", ...).

    The flow returns these names, so a run's summary never reads task runs back from the
    API: Prefect records them through asynchronous events, and a read right after the flow
    returns can see a task still Pending or not at all.
    """

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self._submitted: dict[PrefectFuture, str] = {}

    def run(self, task: Task[..., R], *args: Any, **kwargs: Any) -> R:
        """Call ``task`` in this flow's thread; return its result, raising its error if it failed."""
        state = task(*args, return_state=True, **kwargs)
        self.names[task.name] = state.name
        return state.result()

    def submit(self, task: Task[..., R], *args: Any, **kwargs: Any) -> PrefectFuture[R]:
        """Start ``task`` on the flow's task runner, beside what the flow does next."""
        future = task.submit(*args, **kwargs)
        self.names[task.name] = "Running"
        self._submitted[future] = task.name
        return future

    @contextmanager
    def stopping_others_on_failure(self) -> Iterator[None]:
        """If the block fails or is interrupted, tell submitted steps still running to stop.

        Prefect's thread pool waits for running tasks when the flow ends: without this, an
        interrupted run would wait for its new-people models to finish training.
        """
        try:
            yield
        except BaseException:
            if self._submitted:
                stop_steps_of(str(flow_run.id))
            raise

    def result(self, future: PrefectFuture[R]) -> R:
        """Wait for a submitted task; return its result, raising its error if it failed."""
        future.wait()
        self.names[self._submitted[future]] = future.state.name
        return future.result()

    def rows(self) -> list[dict[str, object]]:
        """One row per task: served from the cache or computed, for the run's faceflow-cache table."""
        return [
            {"task": name, "state": state, "served from cache": state == "Cached"} for name, state in self.names.items()
        ]
