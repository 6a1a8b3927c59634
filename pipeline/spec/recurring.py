"""``recurring``: a continual ColD Fusion service (contributions in, rounds on a schedule, a gate that
promotes), and the rules that hold its rounds to what they compute."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pydantic import Field, field_validator, model_validator

from operators.merge import get_method
from pipeline.spec.common import _Frozen, check_name
from pipeline.spec.merge import MergeSpec

if TYPE_CHECKING:
    from pipeline.spec.workflow import Workflow

_INTERVAL_RE = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_INTERVAL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_interval(value: str | int) -> int:
    """Seconds in an interval given as seconds or ``30s``, ``15m``, ``6h``, ``1d``."""
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    else:
        m = _INTERVAL_RE.match(str(value))
        if not m:
            raise ValueError(f"{value!r} is not an interval; write seconds (e.g. 3600) or 30s, 15m, 6h, 1d")
        seconds = int(m.group(1)) * _INTERVAL_UNITS[m.group(2)]
    if seconds < 1:
        raise ValueError(f"{value!r}: an interval must be at least 1 second")
    return seconds


class ScheduleSpec(_Frozen):
    """When recurring rounds fire: a cron expression in a time zone, or a fixed interval."""

    cron: str | None = Field(
        default=None, description="Five-field crontab, e.g. '0 2 * * *' (02:00 every day); give cron or interval."
    )
    timezone: str = Field(default="UTC", description="IANA time zone of the cron expression, e.g. Europe/Berlin.")
    interval: str | int | None = Field(
        default=None, description="Instead of cron: every N seconds, or 30s, 15m, 6h, 1d."
    )
    misfire_grace: str | int = Field(
        default="1h", description="A firing missed (scheduler down) still runs when it is this late or less "
        "(seconds, or 30s, 15m, 6h, 1d).")

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}; use an IANA name such as UTC or Europe/Berlin") from None
        return v

    @field_validator("interval", "misfire_grace")
    @classmethod
    def _interval(cls, v: str | int | None) -> str | int | None:
        if v is not None:
            parse_interval(v)
        return v

    @model_validator(mode="after")
    def _one_of(self) -> ScheduleSpec:
        if (self.cron is None) == (self.interval is None):
            raise ValueError("give either cron (e.g. {cron: '0 2 * * *', timezone: UTC}) or interval (e.g. "
                             "{interval: 6h}), not " + ("both" if self.cron else "neither"))
        if self.cron is not None:
            from apscheduler.triggers.cron import CronTrigger

            try:
                CronTrigger.from_crontab(self.cron, timezone=self.timezone)
            except ValueError as exc:
                raise ValueError(f"cron: {self.cron!r} is not a crontab expression ({exc}); five fields: minute "
                                 "hour day-of-month month day-of-week, e.g. '0 2 * * *'") from None
        return self

    @property
    def interval_seconds(self) -> int | None:
        return None if self.interval is None else parse_interval(self.interval)

    @property
    def misfire_grace_seconds(self) -> int:
        return parse_interval(self.misfire_grace)


class GateSpec(_Frozen):
    """When a recurring round's fused model replaces the champion."""

    tasks: list[str] | None = Field(
        default=None, description="The fixed gate tasks, scored on their eval splits (default: every task)."
    )
    min_mean_gain: float = Field(default=0.0, ge=-1, le=1, description="Promote only when the mean score over the "
                                 "gate tasks beats the champion's by at least this much (and by more than 0).")
    max_task_drop: float = Field(default=0.02, ge=0, le=1, description="Reject when any gate task falls by more "
                                 "than this below the champion.")
    min_contributions: int = Field(default=1, ge=1, description="Fewer new contributions than this: the round "
                                   "waits (nothing to do).")


class RecurringSpec(_Frozen):
    """A continual ColD Fusion service: contributions come in, each round fuses them into the champion
    and a gate decides whether the result is promoted (see :mod:`pipeline.recurring`)."""

    contributions: str = Field(description="A folder or pyarrow.fs URI; each contribution is a sub-folder with a "
                                           "manifest.yaml naming its task and its data or checkpoint.")
    schedule: ScheduleSpec | None = Field(
        default=None, description="When rounds fire under mergeflow schedule: a cron expression or an interval."
    )
    gate: GateSpec = Field(default_factory=GateSpec, description="When a round's fused model replaces the champion.")
    merge: MergeSpec = Field(default_factory=lambda: MergeSpec(method="linear"),
                             description="How a round fuses its experts (default: ColD Fusion's average); "
                             "element-wise methods only.")
    replay: bool = Field(
        default=True, description="Every round, each task with data accepted by earlier promoted rounds fine-tunes "
        "again from the champion on that data and joins the fusion (ColD Fusion's returning contributors), so "
        "a round that adds one task does not erase the others; false: only the new contributions are fused.")
    champion_alias: str = Field(
        default="champion", description="Registry alias of the promoted model (1-64 letters, digits, '_', '-')."
    )
    challenger_alias: str = Field(
        default="challenger", description="Registry alias of the latest round's fused model, promoted or not; "
        "differs from champion_alias."
    )
    lease_timeout: str | int = Field(
        default="12h", description="A round lease held this long by a driver that cannot be checked (another "
                                   "host) is taken over (seconds, or 30s, 15m, 6h, 1d).")

    @field_validator("lease_timeout")
    @classmethod
    def _lease(cls, v: str | int) -> str | int:
        parse_interval(v)
        return v

    @field_validator("champion_alias", "challenger_alias")
    @classmethod
    def _alias(cls, v: str) -> str:
        return check_name(v, "an alias")

    @model_validator(mode="after")
    def _aliases_differ(self) -> RecurringSpec:
        if self.champion_alias == self.challenger_alias:
            raise ValueError(f"champion_alias and challenger_alias are both {self.champion_alias!r}; give two names")
        return self


def check_recurring(wf: Workflow) -> None:
    """Recurring rounds gate on classification tasks of this workflow and fuse element-wise."""
    if wf.recurring is None:
        return
    names = [t.name for t in wf.tasks]
    unknown = sorted(set(wf.recurring.gate.tasks or []) - set(names))
    if unknown:
        raise ValueError(f"recurring.gate.tasks: names {unknown}, which are not tasks of this workflow; "
                         f"use task names ({', '.join(names)})")
    lm = [t.name for t in wf.tasks if t.type != "classification"]
    if lm:
        raise ValueError(f"recurring: task {lm[0]!r} is causal_lm; recurring rounds gate on classification "
                         "tasks (a head per task) in this version: run causal-LM workflows with mergeflow run")
    if wf.recurring.merge.heads.mode != "experts":
        raise ValueError("recurring.merge.heads: aligned heads are not computed in recurring rounds in this version "
                         "(a contribution's rows are not the task's train split); remove it")
    if (wf.recurring.merge.search is not None or get_method(wf.recurring.merge.method).statistics
            or wf.recurring.merge.learns_from_inputs):
        raise ValueError(f"recurring.merge.method: {wf.recurring.merge.method} needs validation data or "
                         "statistics, which recurring rounds do not compute; use linear, task_arithmetic, "
                         "ties, dare_*, breadcrumbs or another element-wise method")
