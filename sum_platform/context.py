"""What a task runs in: the params in force, the workspace, its registry and each date's record."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from sum_platform.config import Params, load_params
from sum_platform.day_record import DayRecord
from sum_platform.registry import Registry
from sum_platform.workspace import Workspace


@dataclass(frozen=True)
class Context:
    params: Params
    ws: Workspace

    @cached_property
    def registry(self) -> Registry:
        """The workspace's snapshot registry (opened once per context)."""
        return Registry(self.ws.registry_db)

    def day(self, ds: str) -> DayRecord:
        return DayRecord(self.ws, ds)


def context() -> Context:
    """The context of the params in force (``$SUM_PARAMS``) and their workspace."""
    params = load_params()
    return Context(params, Workspace(params.workspace))
