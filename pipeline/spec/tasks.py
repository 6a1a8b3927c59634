"""``tasks[]``: what each expert learns (its data, labels and metric), and the rule that one workflow
merges one kind of model."""

from __future__ import annotations

import string
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from pipeline.spec.common import PACKAGED_CAUSAL_LM, PACKAGED_ENCODERS, _Frozen, check_name

if TYPE_CHECKING:
    from pipeline.spec.workflow import Workflow

TASK_TYPES = ("classification", "causal_lm")


class PromptTemplate(_Frozen):
    """Causal LM: prompt and response built from a row's columns, e.g. ``{prompt: "{text} is", response: " {label}"}``."""

    prompt: str = Field(description="Format string over the row's columns, e.g. '{text} sentiment:'.")
    response: str = Field(description="Format string over the row's columns, e.g. ' {label}'.")

    @model_validator(mode="after")
    def _fields(self) -> PromptTemplate:
        for which, fmt in (("prompt", self.prompt), ("response", self.response)):
            try:
                names = [f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None]
            except ValueError as exc:
                raise ValueError(f"template.{which}: not a valid format string ({exc}): {fmt!r}") from None
            if any(not n.isidentifier() for n in names):
                raise ValueError(f"template.{which}: fields must be column names like '{{text}}' (got {fmt!r})")
        return self

    def columns(self) -> list[str]:
        return sorted({f for fmt in (self.prompt, self.response)
                       for _, f, _, _ in string.Formatter().parse(fmt) if f})


class DatasetSpec(_Frozen):
    """Where a task's examples come from and how they are split into train and eval."""

    source: str | None = Field(
        default=None,
        description="One table split by eval_fraction: a local path, a pyarrow.fs URI "
        "(s3://, gs://, hdfs://, file://) or a packaged dataset (packaged:NAME).",
    )
    train: str | None = Field(default=None, description="A separate train table (instead of source).")
    eval: str | None = Field(default=None, description="A separate eval table (with train).")
    format: Literal["parquet", "jsonl", "csv"] | None = Field(
        default=None, description="File format: parquet, jsonl (.jsonl, .json, .ndjson) or csv; inferred from the "
        "extension when omitted.",
    )
    text_column: str = Field(
        default="text",
        description="Classification: the input text. Causal LM: the text to model (the response when a prompt is given).",
    )
    label_column: str = Field(default="label", description="Classification: the label column.")
    prompt_column: str | None = Field(
        default=None, description="Causal LM: a prompt column; the loss then covers only the response tokens."
    )
    answer_column: str | None = Field(
        default=None, description="Causal LM: reference answers; evaluation adds exact match of greedy generation.",
    )
    template: PromptTemplate | None = Field(
        default=None, description="Causal LM: build prompt and response from each row's columns with format strings.",
    )
    eval_fraction: float = Field(
        default=0.2, gt=0.0, lt=1.0,
        description="With source: the share of its rows held out as the eval split (0 < f < 1; at least one row).",
    )
    split_seed: int = Field(
        default=0, description="Seeds the train/eval split of source (and the samples of the max_*_examples caps)."
    )
    max_train_examples: int | None = Field(
        default=None, gt=0, description="Cap on the train split's rows (a seeded sample); default: every row."
    )
    max_eval_examples: int | None = Field(
        default=None, gt=0, description="Cap on the eval split's rows (a seeded sample); default: every row."
    )

    @model_validator(mode="after")
    def _one_kind_of_source(self) -> DatasetSpec:
        if self.source and (self.train or self.eval):
            raise ValueError(
                "give either 'source' (split by eval_fraction) or 'train' and 'eval', not both "
                f"(got source={self.source!r}, train={self.train!r}, eval={self.eval!r})"
            )
        if not self.source and not (self.train and self.eval):
            raise ValueError(
                "a dataset needs 'source' (one table, split by eval_fraction) or both 'train' and "
                f"'eval' (got source={self.source!r}, train={self.train!r}, eval={self.eval!r})"
            )
        return self


class TaskSpec(_Frozen):
    """One task: one expert is fine-tuned for it.

    A classification task keeps its own head on the shared body; a causal-LM task has no head (the
    whole language model, LM head included, is what is fine-tuned and merged).
    """

    name: str = Field(
        description="Unique task name (1-64 letters, digits, '_', '-'); the expert, its head and its metrics "
        "are named after it."
    )
    type: Literal["classification", "causal_lm"] = Field(
        default="classification", description="classification (a head per task on the shared body) or causal_lm "
        "(the whole language model is fine-tuned and merged); one type per workflow."
    )
    dataset: DatasetSpec = Field(description="Where the task's examples come from and how they are split.")
    labels: list[str] | None = Field(
        default=None, description="Classification: label names (at least 2); label values in the data must be "
        "among them. Give labels or num_labels."
    )
    num_labels: int | None = Field(
        default=None, ge=2, description="Classification: alternative to labels, the number of labels (ids 0..n-1)."
    )
    metric: Literal["accuracy", "macro_f1", "exact_match", "choice_accuracy", "token_accuracy"] | None = Field(
        default=None, description="The task's headline score. Classification: accuracy (default) or macro_f1; "
        "causal LM: exact_match (default with an answer column), choice_accuracy (the most likely of the known "
        "answers, up to 32) or token_accuracy (default otherwise).",
    )
    finetune: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the workflow's finetune settings for this task only "
        "(e.g. {epochs: 5})."
    )
    workers: int | None = Field(
        default=None, ge=1, description="How many workers fine-tune this task's expert (overrides "
        "resources.workers_per_expert for it: a large task's expert on several, the others on one each)."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "a task name")

    @model_validator(mode="after")
    def _labels(self) -> TaskSpec:
        if self.type == "causal_lm":
            self._check_causal_lm()
        else:
            self._check_classification()
        return self

    def _check_causal_lm(self) -> None:
        ds = self.dataset
        if self.labels is not None or self.num_labels is not None:
            raise ValueError("a causal_lm task has no labels; drop 'labels'/'num_labels' (use dataset.answer_column "
                             "for exact-match evaluation)")
        if self.metric in ("accuracy", "macro_f1"):
            raise ValueError(f"metric {self.metric!r} is for classification; a causal_lm task scores "
                             "exact_match (needs dataset.answer_column) or token_accuracy")
        if self.metric in ("exact_match", "choice_accuracy") and ds.answer_column is None:
            raise ValueError(f"metric {self.metric} needs dataset.answer_column (the reference answers)")
        if ds.answer_column is not None and ds.prompt_column is None and ds.template is None:
            raise ValueError("dataset.answer_column needs a prompt to answer: set dataset.prompt_column or "
                             "dataset.template")
        if ds.template is not None and ds.prompt_column is not None:
            raise ValueError("give dataset.template or dataset.prompt_column, not both")

    def _check_classification(self) -> None:
        for field_name in ("prompt_column", "answer_column", "template"):
            if getattr(self.dataset, field_name) is not None:
                raise ValueError(f"dataset.{field_name} is for causal_lm tasks; set type: causal_lm or remove it")
        if self.metric in ("exact_match", "choice_accuracy", "token_accuracy"):
            raise ValueError(f"metric {self.metric!r} is for causal_lm tasks; classification scores accuracy or macro_f1")
        if self.labels is None and self.num_labels is None:
            raise ValueError("give 'labels' (a list of label names) or 'num_labels' (an integer >= 2)")
        if self.labels is not None:
            if len(self.labels) < 2:
                raise ValueError(f"'labels' needs at least 2 entries (got {self.labels!r})")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError(f"'labels' has duplicates (got {self.labels!r})")
            if self.num_labels is not None and self.num_labels != len(self.labels):
                raise ValueError(
                    f"num_labels={self.num_labels} disagrees with the {len(self.labels)} labels given; "
                    "drop num_labels or make them agree"
                )

    @property
    def headline_metric(self) -> str:
        """The score that "accuracy" stands for in tables: the task's metric, or its type's default."""
        if self.metric:
            return self.metric
        if self.type == "causal_lm":
            return "exact_match" if self.dataset.answer_column else "token_accuracy"
        return "accuracy"

    @property
    def label_names(self) -> list[str]:
        return list(self.labels) if self.labels is not None else [str(i) for i in range(self.num_labels or 0)]


def check_task_types(wf: Workflow) -> None:
    """One workflow merges one kind of model: all tasks share a type, and causal-LM tasks need a causal LM."""
    types = sorted({t.type for t in wf.tasks})
    if len(types) > 1:
        first = {ty: next(t.name for t in wf.tasks if t.type == ty) for ty in types}
        raise ValueError(f"tasks: mixes task types ({', '.join(f'{n!r} is {ty}' for ty, n in first.items())}); "
                         "one workflow merges one kind of model: split it into two workflows")
    if types == ["causal_lm"] and wf.base_model in PACKAGED_ENCODERS:
        raise ValueError(f"base_model: {wf.base_model!r} is an encoder without a language-model head; causal_lm "
                         f"tasks need a causal LM (packaged:{PACKAGED_CAUSAL_LM} or a local checkpoint directory)")
