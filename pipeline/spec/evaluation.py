"""``evaluation``: what is scored beside each task's own score (none of it changes a weight)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, field_validator

from pipeline.spec.common import _Frozen

if TYPE_CHECKING:
    from pipeline.spec.workflow import Workflow


class LmEvalSpec(_Frozen):
    """lm-evaluation-harness tasks to score the final merged model (and the base) on: the field's standard."""

    tasks: Annotated[list[str], Field(min_length=1, description="Harness task, group or tag names (`lm-eval ls "
                                      "tasks`: arc_easy, hellaswag, ...; their data comes from the Hugging Face hub) "
                                      "or names of your own tasks in include_path (which may read local files).")]
    include_path: str | None = Field(
        default=None, description="A folder of your own task YAML files (the harness' --include_path); read from "
        "the machine that runs the workflow, relative to where it runs.")
    limit: int | None = Field(default=None, gt=0, description="At most this many examples per task (the first "
                              "ones); null: every example.")
    num_fewshot: int | None = Field(default=None, ge=0, description="Examples in each prompt; null: each task's "
                                    "default.")
    batch_size: int = Field(default=16, gt=0, description="Requests scored per forward pass.")
    models: Annotated[list[Literal["merged", "base"]], Field(
        default=["merged"], min_length=1, description="What is scored: the final merged model (merged), the base "
        "model (base), or both, side by side on the workflow's run.")]

    @field_validator("include_path")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        # workers (a Ray task's working directory is not the driver's) read the folder the user meant
        return str(Path(v).expanduser().resolve()) if v else v


class EvaluationSpec(_Frozen):
    """What the run scores beyond each model on its tasks; not part of the spec hash."""

    cross_task: bool = Field(
        default=True,
        description="One-shot: also score every expert on the other tasks (the cross-task matrix: how much each "
        "expert's change helps or hurts the others). false skips it: a causal-LM expert is a whole model, and "
        "its matrix costs minutes on a CPU.",
    )
    lm_eval: LmEvalSpec | None = Field(
        default=None, description="Causal LMs: also score the final merged model (and the base, with models: "
        "[merged, base]) with lm-evaluation-harness; its metrics go to MLflow as lm_eval/<task>/<metric>. Needs "
        "the lm-eval extra: pip install 'mergeflow[lm-eval]'.")


def check_lm_eval(wf: Workflow) -> None:
    """evaluation.lm_eval scores causal LMs only (the harness runs a language model's log-likelihoods)."""
    if wf.evaluation.lm_eval is not None and any(t.type != "causal_lm" for t in wf.tasks):
        raise ValueError("evaluation.lm_eval: lm-evaluation-harness scores causal language models; this workflow's "
                         "tasks are classification tasks of an encoder. Remove evaluation.lm_eval, or use "
                         "causal_lm tasks on a causal LM base")
