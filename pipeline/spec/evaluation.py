"""``evaluation``: what is scored beside each task's own score (none of it changes a weight)."""

from __future__ import annotations

from pydantic import Field

from pipeline.spec.common import _Frozen


class EvaluationSpec(_Frozen):
    """What the run scores beyond each model on its tasks; not part of the spec hash."""

    cross_task: bool = Field(
        default=True,
        description="One-shot: also score every expert on the other tasks (the cross-task matrix: how much each "
        "expert's change helps or hurts the others). false skips it: a causal-LM expert is a whole model, and "
        "its matrix costs minutes on a CPU.",
    )
