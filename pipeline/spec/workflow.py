"""The whole workflow: every section, the top-level fields, and the order of the cross-section rules."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.spec.common import DEFAULT_BASE_MODEL, IMPLEMENTED_STRATEGIES, _Frozen, check_name
from pipeline.spec.evaluation import EvaluationSpec, check_lm_eval
from pipeline.spec.finetune import FinetuneSpec, check_finetune_overrides
from pipeline.spec.merge import (
    MergeSpec,
    check_expert_counts,
    check_learned_merges,
    check_lora_adapter_merges,
    check_per_expert_params,
)
from pipeline.spec.recurring import RecurringSpec, check_recurring
from pipeline.spec.resources import NO_WEIGHT_CHANGE, ResourcesSpec, check_multiworker
from pipeline.spec.rounds import RoundsSpec, check_contributors, check_resident_workers
from pipeline.spec.tasks import TaskSpec, check_task_types
from pipeline.spec.tracking import StoreSpec, TrackingSpec

# Each section's rules across the workflow, in the order they are checked: a spec that breaks
# several is told about the first one.
WORKFLOW_RULES: tuple[Callable[[Workflow], None], ...] = (
    check_finetune_overrides,   # finetune: every task's and every round's settings are valid
    check_task_types,           # tasks: one kind of model, and a base model of that kind
    check_lora_adapter_merges,  # merge: lora.mode adapter needs LoRA experts and one merge
    check_per_expert_params,    # merge: weights, densities, ... name tasks of this workflow
    check_expert_counts,        # merge: methods for a set number of experts (slerp: two) get that many
    check_learned_merges,       # merge: searches, statistics, learned coefficients, aligned heads
    check_resident_workers,     # rounds: what resident workers run
    check_contributors,         # rounds: no more contributors than tasks
    check_recurring,            # recurring: gate tasks, classification, element-wise fusion
    check_lm_eval,              # evaluation: lm-eval scores causal LMs
    check_multiworker,          # resources: experts over several workers, merges split over several
)


class Workflow(_Frozen):
    """A whole workflow. Load with :func:`load_workflow`; never build half-validated ones by hand."""

    name: str = Field(
        description="Workflow name (1-64 letters, digits, '_', '-'); names the store folder and the MLflow "
        "experiment."
    )
    description: str = Field(default="", description="Free text; changes nothing that runs.")
    base_model: str = Field(
        default=DEFAULT_BASE_MODEL, description="The model every expert starts from: packaged:NAME or a local "
        "Hugging Face checkpoint directory (safetensors only); causal_lm tasks need a causal LM (e.g. "
        "packaged:word-llama)."
    )
    tasks: Annotated[list[TaskSpec], Field(min_length=1, description="One expert per task (at least one).")]
    finetune: FinetuneSpec = Field(
        default_factory=FinetuneSpec, description="How every expert is fine-tuned (tasks[].finetune overrides it)."
    )
    merge: MergeSpec = Field(
        default_factory=MergeSpec, description="How the experts are merged in one shot (strategy oneshot, and round 0 "
        "of ATM on validation data); the rounds of atm / cold_fusion use rounds.merge."
    )
    strategy: Literal["oneshot", "atm", "cold_fusion"] = Field(
        default="oneshot", description="oneshot (fine-tune every expert once, merge once), atm (alternating tuning "
        "and merging) or cold_fusion (contributors fine-tune from the shared model each round)."
    )
    rounds: RoundsSpec = Field(
        default_factory=RoundsSpec, description="atm / cold_fusion: how many rounds, each round's budget and merge, "
        "and where rounds run."
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Ray resources of each step.")
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec, description="What is scored beside each task's own score; not part of the "
        "spec hash.")
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec, description="Where lineage goes (MLflow); not part of the spec hash."
    )
    store: StoreSpec = Field(default_factory=StoreSpec, description="Where checkpoints go; not part of the spec hash.")
    recurring: RecurringSpec | None = Field(
        default=None, description="Recurring rounds (mergeflow round / schedule / history) instead of one run; "
        "classification tasks only.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "the workflow name")

    @field_validator("strategy")
    @classmethod
    def _strategy_available(cls, v: str) -> str:
        if v not in IMPLEMENTED_STRATEGIES:
            raise ValueError(
                f"strategy {v!r} is recognised but not available in this version; "
                f"use one of: {', '.join(IMPLEMENTED_STRATEGIES)}"
            )
        return v

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, tasks: list[TaskSpec]) -> list[TaskSpec]:
        seen: set[str] = set()
        for t in tasks:
            if t.name in seen:
                raise ValueError(f"duplicate task name {t.name!r}; task names must be unique")
            seen.add(t.name)
        return tasks

    @model_validator(mode="after")
    def _workflow_rules(self) -> Workflow:
        for rule in WORKFLOW_RULES:
            rule(self)
        return self

    def finetune_for(self, task: TaskSpec) -> FinetuneSpec:
        """The fine-tuning settings of one task: the workflow's, with the task's overrides."""
        if not task.finetune:
            return self.finetune
        return FinetuneSpec.model_validate({**self.finetune.model_dump(), **task.finetune})

    def workers_for(self, task: TaskSpec) -> int:
        """How many workers fine-tune ``task``'s expert: its own ``workers``, else ``resources.workers_per_expert``."""
        return task.workers or self.resources.workers_per_expert

    def round_finetune_for(self, task: TaskSpec, round_index: int) -> FinetuneSpec:
        """One round's fine-tuning of ``task`` in an iterated strategy.

        ``rounds.finetune`` overrides apply when given; otherwise the task's whole budget is split
        evenly over ``rounds.count`` rounds (epochs / R, or max_steps / R rounded up), so every
        strategy spends the same compute. The seed moves with the round so rounds see different
        batches.
        """
        full = self.finetune_for(task)
        raw = full.model_dump()
        if self.rounds.finetune:
            raw.update(self.rounds.finetune)
        elif full.max_steps is not None:
            raw["max_steps"] = max(1, -(-full.max_steps // self.rounds.count))
        else:
            raw["epochs"] = (full.epochs or 1.0) / self.rounds.count
        raw["seed"] = full.seed + round_index
        return FinetuneSpec.model_validate(raw)

    @property
    def gate_tasks(self) -> list[TaskSpec]:
        """Recurring rounds: the tasks the gate scores (``recurring.gate.tasks``, default all)."""
        chosen = (self.recurring.gate.tasks if self.recurring else None) or [t.name for t in self.tasks]
        return [t for t in self.tasks if t.name in chosen]

    @property
    def held_out_fraction(self) -> float:
        """Share of each train split held out as validation data (ATM on validation data, or a search); 0 if none."""
        return self.rounds.validation_fraction or self.merge.validation_fraction or 0.0

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def registered_model_name(self) -> str:
        return self.tracking.registered_model or f"{self.name}-merged"

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task named {name!r}; tasks are: {', '.join(t.name for t in self.tasks)}")

    def spec_hash(self) -> str:
        """A stable hash of everything that changes the weights (not tracking, store or evaluation settings)."""
        payload = self.model_dump(mode="json", exclude={"tracking", "store", "description", "evaluation"})
        # where rounds run and how often they are written change no weight (resident rounds are bit for bit
        # those of task workers), so a spec keeps its hash when they change
        payload["rounds"].pop("workers")
        payload["rounds"].pop("checkpoint_every")
        for name in NO_WEIGHT_CHANGE:  # nor where workers sit, nor how a merge is split (bit for bit the same)
            payload["resources"].pop(name)
        for task in payload["tasks"]:
            if task.get("workers") is None:
                task.pop("workers", None)
        if payload["resources"]["workers_per_expert"] == 1:  # (several workers: equal to float rounding only)
            payload["resources"].pop("workers_per_expert")
            payload["resources"].pop("strategy")
        # fields added later are left out at their default, so a spec keeps its hash across versions
        if payload["finetune"].get("sharpness") is None:
            payload["finetune"].pop("sharpness", None)
        for merge in (payload["merge"], payload["rounds"]["merge"], (payload.get("recurring") or {}).get("merge")):
            if merge is not None and merge.get("heads", {}).get("mode") == "experts":
                merge.pop("heads")
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
