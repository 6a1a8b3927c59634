"""``rounds``: the iterated strategies (ATM, ColD Fusion): how many rounds, each round's budget and
merge, and where rounds run (task workers, or resident workers that keep models in memory)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from operators.merge import get_method
from pipeline.spec.common import _Frozen
from pipeline.spec.finetune import FinetuneSpec
from pipeline.spec.merge import MergeSpec

if TYPE_CHECKING:
    from pipeline.spec.workflow import Workflow


class RoundsSpec(_Frozen):
    """Iterated strategies (ATM, ColD Fusion): how many rounds, how much tuning each, how to merge."""

    count: int = Field(default=3, ge=1, le=1000, description="Number of rounds of atm / cold_fusion (1-1000).")
    finetune: dict[str, Any] = Field(
        default_factory=dict,
        description="Per-round fine-tuning overrides (e.g. {epochs: 0.5} or {max_steps: 20}); default: each "
                    "task's whole budget split evenly over the rounds, so strategies compare at equal compute. "
                    "The seed moves with the round.",
    )
    merge: MergeSpec = Field(
        default_factory=lambda: MergeSpec(method="linear"),
        description="How each round's models are combined; default the mean (ATM: task arithmetic with "
                    "α = 1/T on the round's task vectors; ColD Fusion: the uniform average).",
    )
    task_vectors_from: Literal["round_start", "base"] = Field(
        default="round_start", description="ATM: measure task vectors from the round's start model (round_start) "
        "or from the original base."
    )
    patience: int | None = Field(
        default=None, ge=1, description="ATM: stop after this many rounds without a better mean held-out score; "
        "default: run every round."
    )
    contributors: float | None = Field(
        default=None, gt=0, description="ColD Fusion: contributors per round, a count (≥ 1) or a fraction (< 1); "
                                        "default all tasks.",
    )
    start: Literal["base", "oneshot_merge"] = Field(
        default="base", description="ATM: start from the base, or from a one-shot merge (ATM on validation data; "
        "with validation_fraction)."
    )
    validation_fraction: float | None = Field(
        default=None, gt=0, lt=1, description="ATM on validation data: the slice of each train split held out "
                                              "from the one-shot experts and tuned on in the rounds (with "
                                              "start: oneshot_merge).",
    )
    contributor_seed: int = Field(default=0, description="ColD Fusion: seeds each round's sample of contributors.")
    weight_by_size: bool = Field(default=False, description="ColD Fusion: sample contributors in proportion to "
                                                            "their training-set size.")
    workers: Literal["tasks", "resident"] = Field(
        default="tasks",
        description="tasks: every expert of every round is a Ray task that loads its start model from the store and "
                    "writes its checkpoint back; resident: one Ray actor per slot keeps each task's model, tokenizer "
                    "and data across rounds, start weights are shipped once per round through Ray's object store, "
                    "and experts are merged in memory (same weights, bit for bit; element-wise round merges).",
    )
    checkpoint_every: int = Field(
        default=1, ge=1,
        description="Resident workers: write the merged model to the store, score it and register it every N "
                    "rounds (and always the last round); rounds between are trained, merged and recorded in memory. "
                    "A crash loses at most the rounds since the last checkpoint; resuming gives the same weights.",
    )

    @field_validator("finetune")
    @classmethod
    def _finetune_overrides(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - set(FinetuneSpec.model_fields))
        if unknown:
            raise ValueError(f"unknown setting {unknown[0]!r}; "
                             f"settings: {', '.join(sorted(FinetuneSpec.model_fields))}")
        return v

    @model_validator(mode="after")
    def _validation_variant(self) -> RoundsSpec:
        if (self.start == "oneshot_merge") != (self.validation_fraction is not None):
            raise ValueError("start: oneshot_merge (ATM on validation data) and validation_fraction go together: "
                             "give both, e.g. {start: oneshot_merge, validation_fraction: 0.1}, or neither")
        return self

    @model_validator(mode="after")
    def _checkpoint_every(self) -> RoundsSpec:
        if self.checkpoint_every > 1 and self.workers != "resident":
            raise ValueError(f"checkpoint_every: {self.checkpoint_every} needs workers: resident (with task workers "
                             "every expert and merge goes through the store); set rounds.workers: resident, or "
                             "remove checkpoint_every")
        return self

    @field_validator("contributors")
    @classmethod
    def _contributors(cls, v: float | None) -> float | None:
        if v is not None and v > 1 and v != int(v):
            raise ValueError("a count must be a whole number (or give a fraction below 1)")
        return v


def check_contributors(wf: Workflow) -> None:
    """ColD Fusion samples its contributors among the tasks: a count above the task count is a mistake."""
    count = wf.rounds.contributors
    if count is not None and count >= 1 and count > len(wf.tasks):
        raise ValueError(f"rounds.contributors: {int(count)} contributors a round, but this workflow has "
                         f"{len(wf.tasks)} tasks (one contributor a task); give at most {len(wf.tasks)}, a fraction "
                         "below 1, or remove it (every task contributes)")


def check_resident_workers(wf: Workflow) -> None:
    """Resident workers keep each task's model in memory across rounds and merge element-wise, in memory."""
    if wf.rounds.workers != "resident":
        return
    fix = "or set rounds.workers: tasks"
    if wf.strategy not in ("atm", "cold_fusion"):
        raise ValueError(f"rounds.workers: resident keeps models across rounds; strategy {wf.strategy!r} has one "
                         "round. Use strategy: atm or cold_fusion, or remove rounds.workers")
    m = wf.rounds.merge
    if get_method(m.method).statistics or m.learns_from_inputs or m.heads.mode != "experts":
        raise ValueError(f"rounds.workers: resident merges in memory with element-wise methods; rounds.merge "
                         f"{m.method!r}{' with heads: aligned' if m.heads.mode != 'experts' else ''} reads the "
                         f"experts' data or statistics: use linear, task_arithmetic, ties, dare_*, breadcrumbs, ... "
                         f"{fix}")
    if wf.rounds.patience is not None and wf.rounds.checkpoint_every > 1:
        raise ValueError(f"rounds.patience: {wf.rounds.patience} counts rounds without improvement, and with "
                         f"checkpoint_every: {wf.rounds.checkpoint_every} only checkpointed rounds are scored; "
                         "set rounds.checkpoint_every: 1 or remove patience")
    if wf.strategy == "atm" and wf.rounds.start == "oneshot_merge":
        raise ValueError(f"rounds.workers: resident: ATM on validation data (rounds.start: oneshot_merge) is not "
                         f"run by resident workers in this version; {fix}")
