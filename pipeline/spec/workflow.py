"""The workflow spec: YAML in, one frozen and fully validated :class:`Workflow` out.

Every rule is checked here, at load time, before Ray starts or a byte is written. An error
names the field path, the value received and what would be valid::

    workflow.yaml: 2 problems
      - merge.method: unknown merge method 'tie' (got 'tie'). Known: linear, task_arithmetic.
      - tasks[1].name: duplicate task name 'sst2' (got 'sst2'). Task names must be unique.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from operators.learn.search import SearchSpace, split_search
from operators.merge import MERGE_METHODS, get_method, validate_merge_params

# The spec accepts every strategy of the design (see Workflow.strategy); only these run today, the
# others are recognised so that a spec written for them gets a precise "not available yet" error.
IMPLEMENTED_STRATEGIES = ("oneshot", "atm", "cold_fusion")

DEFAULT_BASE_MODEL = "packaged:all-minilm-l6-v2"
PACKAGED_ENCODERS = (DEFAULT_BASE_MODEL,)
PACKAGED_CAUSAL_LM = "word-llama"  # a small Llama that mergeflow pre-trains itself on packaged text
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_STORE = "mergeflow-store"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


PER_EXPERT_PARAMS = ("weights", "densities", "lambdas")


class SpecError(ValueError):
    """A workflow spec that cannot run, with one line per problem (field path, value, fix)."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        head = f"{source}: {len(problems)} problem" + ("s" if len(problems) != 1 else "")
        super().__init__(head + "\n" + "\n".join(f"  - {p}" for p in problems))


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _check_name(value: str, what: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{what} must be 1-64 characters of letters, digits, '_', '-' or '.', starting with a "
            f"letter or digit (got {value!r})"
        )
    return value


class PromptTemplate(_Frozen):
    """Causal LM: prompt and response built from a row's columns, e.g. ``{prompt: "{text} is", response: " {label}"}``."""

    prompt: str = Field(description="Format string over the row's columns, e.g. '{text} sentiment:'.")
    response: str = Field(description="Format string over the row's columns, e.g. ' {label}'.")

    @model_validator(mode="after")
    def _fields(self) -> PromptTemplate:
        import string

        for which, fmt in (("prompt", self.prompt), ("response", self.response)):
            try:
                names = [f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None]
            except ValueError as exc:
                raise ValueError(f"template.{which}: not a valid format string ({exc}): {fmt!r}") from None
            if any(not n.isidentifier() for n in names):
                raise ValueError(f"template.{which}: fields must be column names like '{{text}}' (got {fmt!r})")
        return self

    def columns(self) -> list[str]:
        import string

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
        default=None, description="File format; inferred from the extension when omitted."
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
    eval_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)
    split_seed: int = 0
    max_train_examples: int | None = Field(default=None, gt=0)
    max_eval_examples: int | None = Field(default=None, gt=0)

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


TASK_TYPES = ("classification", "causal_lm")


class TaskSpec(_Frozen):
    """One task: one expert is fine-tuned for it.

    A classification task keeps its own head on the shared body; a causal-LM task has no head (the
    whole language model, LM head included, is what is fine-tuned and merged).
    """

    name: str
    type: Literal["classification", "causal_lm"] = Field(
        default="classification", description="classification (a head per task) or causal_lm (language modelling)"
    )
    dataset: DatasetSpec
    labels: list[str] | None = Field(
        default=None, description="Label names; label values in the data must be among them."
    )
    num_labels: int | None = Field(default=None, ge=2, description="Alternative to labels: ids 0..n-1.")
    metric: Literal["accuracy", "macro_f1", "exact_match", "choice_accuracy", "token_accuracy"] | None = Field(
        default=None, description="The task's headline score. Classification: accuracy (default) or macro_f1; "
        "causal LM: exact_match (default with an answer column), choice_accuracy (the most likely of the known "
        "answers, up to 32) or token_accuracy (default otherwise).",
    )
    finetune: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the workflow's finetune settings for this task only."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v, "a task name")

    @model_validator(mode="after")
    def _labels(self) -> TaskSpec:
        ds = self.dataset
        if self.type == "causal_lm":
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
            return self
        for field_name in ("prompt_column", "answer_column", "template"):
            if getattr(ds, field_name) is not None:
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
        return self

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


class LoraSpec(_Frozen):
    """LoRA settings (peft): W' = W + (alpha / r) · B·A on each target module (alpha / sqrt(r) with rsLoRA)."""

    r: int = Field(default=8, ge=1, le=4096, description="rank")
    alpha: float = Field(default=16.0, gt=0, description="lora_alpha; the update is scaled by alpha / r")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | None = Field(
        default=None, description="module names to adapt; default per architecture (attention and MLP projections)"
    )
    use_rslora: bool = Field(default=False, description="rank-stabilised scaling alpha / sqrt(r)")

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or any(not isinstance(m, str) or not m for m in v)):
            raise ValueError(f"target_modules must be a non-empty list of module names (got {v!r})")
        return v


class FinetuneSpec(_Frozen):
    """How each expert is fine-tuned from its start model: full fine-tune, or LoRA adapters (peft)."""

    mode: Literal["full", "lora"] = Field(
        default="full", description="full: every weight (and the head); lora: peft adapters (and the head)"
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA settings (mode: lora)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="auto: bf16 autocast on a CUDA device that supports it, else fp32"
    )
    gradient_checkpointing: bool = Field(default=False, description="recompute activations in backward (less memory)")
    freeze_embeddings: bool = Field(
        default=False, description="Keep the input word embeddings fixed (faster; they stay equal to the base's)."
    )
    epochs: float | None = Field(default=1.0, gt=0)
    max_steps: int | None = Field(default=None, gt=0, description="Overrides epochs when set.")
    learning_rate: float = Field(default=5e-5, gt=0, lt=1)
    head_learning_rate: float | None = Field(default=None, gt=0, lt=1, description="Defaults to learning_rate.")
    weight_decay: float = Field(default=0.0, ge=0)
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    batch_size: int = Field(default=32, gt=0)
    max_length: int = Field(default=64, gt=1, le=8192)
    seed: int = 0
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    log_every: int = Field(default=10, gt=0, description="Log the training loss every N steps.")

    @model_validator(mode="after")
    def _budget(self) -> FinetuneSpec:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("give 'epochs' or 'max_steps' (got neither)")
        return self


class LoraMergeSpec(_Frozen):
    """How LoRA experts are merged.

    ``exact``: each adapter's ΔW = B·A·scaling is added to its base weights and the merge method acts on
    those full task vectors; the output is a full checkpoint. ``adapter``: the output is one peft
    adapter: the merged ΔW factorised by SVD to ``rank`` (any method; the error is measured and
    recorded), or the experts' adapters concatenated (``concat``: exact, linear methods only).
    """

    mode: Literal["exact", "adapter"] = "exact"
    rank: int | None = Field(default=None, ge=1, description="adapter mode: output rank (default: sum of the experts' ranks)")
    factorization: Literal["svd", "concat"] = Field(default="svd", description="adapter mode: svd or concat")

    @model_validator(mode="after")
    def _adapter_only(self) -> LoraMergeSpec:
        if self.mode == "exact" and (self.rank is not None or self.factorization != "svd"):
            raise ValueError("lora.rank and lora.factorization apply to mode: adapter; set mode: adapter or drop them")
        if self.factorization == "concat" and self.rank is not None:
            raise ValueError("factorization: concat has the summed rank of the experts; drop lora.rank or use svd")
        return self


class HeadsSpec(_Frozen):
    """Which task heads the merged model carries (classification tasks).

    ``experts``: each task keeps its expert's head as trained. ``aligned``: each head's output layer is
    refit, without labels, so that on the merged body it reproduces its expert's logits on ``examples``
    of the task's training inputs (ridge-regularised towards the expert's head; ``operators.learn.heads``).
    A string is read as the mode: ``heads: aligned``.
    """

    mode: Literal["experts", "aligned"] = "experts"
    examples: int = Field(default=256, gt=0, description="aligned: training inputs per task (seeded sample)")
    ridge: float = Field(default=0.1, gt=0, le=1e6, description="aligned: shrinkage towards the expert's head, "
                         "relative to the mean eigenvalue of the features' Gram matrix")
    seed: int = Field(default=0, description="aligned: seeds the sample of inputs")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v not in ("experts", "aligned"):
                raise ValueError(f"{v!r} is not a heads mode; use experts (the experts' heads as trained) or "
                                 "aligned (refit without labels to the merged body)")
            return {"mode": v}
        return v

    @model_validator(mode="after")
    def _aligned_only(self) -> HeadsSpec:
        # (a value equal to its default is accepted: a dumped spec validates again)
        changed = [f for f in ("examples", "ridge", "seed")
                   if getattr(self, f) != type(self).model_fields[f].default]
        if self.mode == "experts" and changed:
            raise ValueError(f"{changed[0]} applies to mode: aligned; set mode: aligned or remove it")
        return self


class MergeSpec(_Frozen):
    """Which merge method combines the experts' bodies, and its parameters."""

    method: str = "task_arithmetic"
    params: dict[str, Any] = Field(default_factory=dict)
    lora: LoraMergeSpec = Field(default_factory=LoraMergeSpec, description="how LoRA experts are merged")
    validation_fraction: float | None = Field(
        default=None, gt=0.0, lt=1.0,
        description="fraction of each task's train split held out (experts train on the rest) to score a "
                    "searched parameter on; never the eval split",
    )
    heads: HeadsSpec = Field(default_factory=HeadsSpec, description="experts (default) or aligned: see HeadsSpec")
    refit_heads: bool = Field(
        default=False,
        description="one-shot: also score the merged body with every head refit on it (a seeded linear probe on "
                    "the task's train split), as its own column; the merged model keeps the experts' heads",
    )

    @model_validator(mode="after")
    def _method_and_params(self) -> MergeSpec:
        if self.method not in MERGE_METHODS:
            raise ValueError(
                f"unknown merge method {self.method!r}. Known: {', '.join(sorted(MERGE_METHODS))}"
            )
        # a parameter given as {search: ...} is validated with each value it may take
        fixed, space = split_search(self.params)
        # Raises ValueError naming the parameter, the value and the valid range.
        for value in (space.probe_values() if space else [None]):
            validate_merge_params(self.method, fixed if space is None else {**fixed, space.param: value})
        if self.lora.factorization == "concat" and self.method not in ("linear", "task_arithmetic"):
            raise ValueError(f"lora: factorization concat is exact only for linear and task_arithmetic (got method "
                             f"{self.method!r}); use factorization: svd")
        return self

    @property
    def search(self) -> SearchSpace | None:
        """The parameter searched on validation data, if any."""
        return split_search(self.params)[1]

    @property
    def learns_from_inputs(self) -> bool:
        """AdaMerging: its coefficients are learned on unlabeled inputs of every task (the validation slices)."""
        return get_method(self.method).inputs == "unlabeled"

    @property
    def needs_validation(self) -> bool:
        """A searched parameter or a method that learns from inputs: a validation slice must be held out."""
        return self.search is not None or self.learns_from_inputs


class ResourcesSpec(_Frozen):
    """Ray resources for each expert's fine-tuning task (and the merge/eval tasks)."""

    num_cpus: float = Field(default=1.0, gt=0)
    num_gpus: float = Field(default=0.0, ge=0)
    max_retries: int = Field(default=1, ge=0, description="Ray retries when a worker process dies.")
    torch_threads: int | None = Field(
        default=None, gt=0, description="torch intra-op threads per task; defaults to num_cpus."
    )


class TrackingSpec(_Frozen):
    """Where lineage goes: an MLflow tracking URI and experiment, and the registered model name."""

    uri: str = DEFAULT_TRACKING_URI
    experiment: str | None = Field(default=None, description="Defaults to the workflow name.")
    registered_model: str | None = Field(default=None, description="Defaults to '<name>-merged'.")
    alias: str = Field(default="current", description="Registry alias, moved to the best merged version so far (mean held-out accuracy).")
    log_model_artifacts: bool = Field(
        default=True,
        description="Upload the merged checkpoint as the LoggedModel's artifacts (the registry "
        "version then resolves inside MLflow). When false, the version's source is the store URI.",
    )
    log_expert_artifacts: bool = Field(
        default=False, description="Also upload every expert checkpoint to MLflow (they stay in the store anyway)."
    )
    artifact_location: str | None = Field(
        default=None, description="Artifact root of a new experiment; for SQLite, defaults next to the database."
    )
    retry_seconds: float = Field(
        default=300.0, gt=0, le=86400,
        description="How long each MLflow call waits for an unreachable tracking server (connection refused, 5xx, "
        "429), retrying with backoff, before the workflow stops with a message saying what was not recorded.",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_tracking_uri(v)

    @field_validator("alias")
    @classmethod
    def _alias(cls, v: str) -> str:
        if v.lower() == "latest" or v.lower().startswith("v") and v[1:].isdigit():
            raise ValueError(
                f"MLflow reserves the alias {v!r} (it already means the newest version / a version number); "
                "choose another, e.g. 'current' or 'champion'"
            )
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_-]{0,255}$", v):
            raise ValueError(f"an alias is letters, digits, '_' and '-', starting with a letter (got {v!r})")
        return v


class StoreSpec(_Frozen):
    """The checkpoint store: a local folder or any pyarrow.fs URI."""

    root: str = DEFAULT_STORE

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        return check_store_root(v)


# pyarrow.fs.FileSystem.from_uri opens these (mock:// and hf:// too, but one loses data and the
# other is a model hub, so neither is a checkpoint store); anything else fails only at run time.
STORE_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
# MLflow's tracking-store registry: databases (with an optional +driver), servers, file stores.
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "file", "databricks", "databricks-uc")


def check_store_root(v: str) -> str:
    """``store.root``: a local folder, or a URI whose scheme pyarrow.fs opens (checked without I/O)."""
    if not v.strip():
        raise ValueError("store.root is empty; give a folder (e.g. mergeflow-store) or a URI such as s3://bucket/prefix")
    if "://" not in v:
        return v
    scheme, rest = v.split("://", 1)
    if scheme.lower() not in STORE_SCHEMES:
        raise ValueError(f"scheme {scheme + '://'!r} is not a filesystem pyarrow.fs opens (got {v!r}); use a local "
                         f"folder or one of {', '.join(s + '://' for s in STORE_SCHEMES)}")
    if scheme.lower() == "file" and not rest.startswith("/"):
        raise ValueError(f"a file:// URI needs an absolute path, file:///abs/path (got {v!r})")
    if scheme.lower() != "file" and not rest.split("/", 1)[0]:
        raise ValueError(f"{scheme}:// needs a bucket or host after it, e.g. {scheme}://bucket/prefix (got {v!r})")
    return v


def check_tracking_uri(v: str) -> str:
    """``tracking.uri``: a URI MLflow has a tracking store for, or a local folder (checked without I/O)."""
    if not v.strip():
        raise ValueError("tracking.uri is empty; use sqlite:///mlflow.db or http://host:5000")
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", v)
    if m is None or len(m.group(1)) == 1:  # no scheme (a single letter is a Windows drive): a local folder
        return v
    scheme = m.group(1).lower()
    if scheme.split("+", 1)[0] not in TRACKING_SCHEMES:
        raise ValueError(f"scheme {scheme + ':'!r} is not one MLflow tracks to (got {v!r}); use sqlite:///path.db, "
                         "http(s)://host:port, postgresql://, mysql://, mssql:// or a local folder")
    if scheme == "sqlite" and (not v.startswith("sqlite:///") or len(v) == len("sqlite:///")):
        raise ValueError(f"a SQLite URI is sqlite:/// followed by the file's path, e.g. sqlite:///mlflow.db (got {v!r})")
    if scheme in ("http", "https") and not re.match(r"^https?://[^/:]+", v, re.I):
        raise ValueError(f"an MLflow server URI needs a host, e.g. http://127.0.0.1:5000 (got {v!r})")
    return v


class RoundsSpec(_Frozen):
    """Iterated strategies (ATM, ColD Fusion): how many rounds, how much tuning each, how to merge."""

    count: int = Field(default=3, ge=1, le=1000, description="number of rounds")
    finetune: dict[str, Any] = Field(
        default_factory=dict,
        description="per-round fine-tuning overrides (e.g. {epochs: 0.5} or {max_steps: 20}); default: each "
                    "task's whole budget split evenly over the rounds, so strategies compare at equal compute",
    )
    merge: MergeSpec = Field(
        default_factory=lambda: MergeSpec(method="linear"),
        description="how each round's models are combined; default the mean (ATM: task arithmetic with "
                    "α = 1/T on the round's task vectors; ColD Fusion: the uniform average)",
    )
    task_vectors_from: Literal["round_start", "base"] = Field(
        default="round_start", description="ATM: measure task vectors from the round's start model or the base"
    )
    patience: int | None = Field(default=None, ge=1, description="stop after this many rounds without improvement")
    contributors: float | None = Field(
        default=None, gt=0, description="ColD Fusion: contributors per round, a count (≥ 1) or a fraction (< 1); "
                                        "default all tasks",
    )
    start: Literal["base", "oneshot_merge"] = Field(
        default="base", description="ATM: start from the base, or from a one-shot merge (ATM on validation data)"
    )
    validation_fraction: float | None = Field(
        default=None, gt=0, lt=1, description="ATM on validation data: the slice of each train split held out "
                                              "from the one-shot experts and tuned on in the rounds",
    )
    contributor_seed: int = 0
    weight_by_size: bool = Field(default=False, description="ColD Fusion: sample contributors in proportion to "
                                                            "their training-set size")
    workers: Literal["tasks", "resident"] = Field(
        default="tasks",
        description="tasks: every expert of every round is a Ray task that loads its start model from the store and "
                    "writes its checkpoint back; resident: one Ray actor per slot keeps each task's model, tokenizer "
                    "and data across rounds, start weights are shipped once per round through Ray's object store, "
                    "and experts are merged in memory (same weights, bit for bit)",
    )
    checkpoint_every: int = Field(
        default=1, ge=1,
        description="resident workers: write the merged model to the store, score it and register it every N "
                    "rounds (and always the last round); rounds between are trained, merged and recorded in memory. "
                    "A crash loses at most the rounds since the last checkpoint; resuming gives the same weights",
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

    cron: str | None = Field(default=None, description="five-field crontab, e.g. '0 2 * * *' (02:00 every day)")
    timezone: str = Field(default="UTC", description="IANA time zone of the cron expression, e.g. Europe/Berlin")
    interval: str | int | None = Field(default=None, description="instead of cron: every N seconds, or 30s, 15m, 6h, 1d")
    misfire_grace: str | int = Field(
        default="1h", description="a firing missed (scheduler down) still runs when it is this late or less")

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

    tasks: list[str] | None = Field(default=None, description="the fixed evaluation tasks (default: every task)")
    min_mean_gain: float = Field(default=0.0, ge=-1, le=1, description="promote only when the mean score over the "
                                 "gate tasks beats the champion's by at least this much (and by more than 0)")
    max_task_drop: float = Field(default=0.02, ge=0, le=1, description="reject when any gate task falls by more "
                                 "than this below the champion")
    min_contributions: int = Field(default=1, ge=1, description="fewer new contributions than this: the round "
                                   "waits (nothing to do)")


class RecurringSpec(_Frozen):
    """A continual ColD Fusion service: contributions come in, each round fuses them into the champion
    and a gate decides whether the result is promoted (see :mod:`pipeline.recurring`)."""

    contributions: str = Field(description="a folder or pyarrow.fs URI; each contribution is a sub-folder with a "
                                           "manifest.yaml naming its task and its data or checkpoint")
    schedule: ScheduleSpec | None = Field(default=None, description="for mergeflow schedule")
    gate: GateSpec = Field(default_factory=GateSpec)
    merge: MergeSpec = Field(default_factory=lambda: MergeSpec(method="linear"),
                             description="how a round fuses its experts (default: ColD Fusion's average)")
    replay: bool = Field(
        default=True, description="every round, each task with data accepted by earlier promoted rounds fine-tunes "
        "again from the champion on that data and joins the fusion (ColD Fusion's returning contributors), so "
        "a round that adds one task does not erase the others; false: only the new contributions are fused")
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"
    lease_timeout: str | int = Field(
        default="12h", description="a round lease held this long by a driver that cannot be checked (another "
                                   "host) is taken over")

    @field_validator("lease_timeout")
    @classmethod
    def _lease(cls, v: str | int) -> str | int:
        parse_interval(v)
        return v

    @field_validator("champion_alias", "challenger_alias")
    @classmethod
    def _alias(cls, v: str) -> str:
        return _check_name(v, "an alias")

    @model_validator(mode="after")
    def _aliases_differ(self) -> RecurringSpec:
        if self.champion_alias == self.challenger_alias:
            raise ValueError(f"champion_alias and challenger_alias are both {self.champion_alias!r}; give two names")
        return self


class Workflow(_Frozen):
    """A whole workflow. Load with :func:`load_workflow`; never build half-validated ones by hand."""

    name: str
    description: str = ""
    base_model: str = DEFAULT_BASE_MODEL
    tasks: Annotated[list[TaskSpec], Field(min_length=1)]
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    merge: MergeSpec = Field(default_factory=MergeSpec)
    strategy: Literal["oneshot", "atm", "cold_fusion"] = "oneshot"
    rounds: RoundsSpec = Field(default_factory=RoundsSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    store: StoreSpec = Field(default_factory=StoreSpec)
    recurring: RecurringSpec | None = Field(
        default=None, description="recurring rounds (mergeflow round / schedule / history) instead of one run")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v, "the workflow name")

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
    def _task_finetune_overrides(self) -> Workflow:
        # every task's settings, and every task's per-round settings, must be valid before anything runs
        for i, t in enumerate(self.tasks):
            task_settings = {**self.finetune.model_dump(), **t.finetune}
            if t.finetune:
                _check_finetune(task_settings, f"tasks[{i}].finetune")
            if self.rounds.finetune:
                _check_finetune({**task_settings, **self.rounds.finetune}, "rounds.finetune")
        return self

    @model_validator(mode="after")
    def _task_types_and_lora(self) -> Workflow:
        types = sorted({t.type for t in self.tasks})
        if len(types) > 1:
            first = {ty: next(t.name for t in self.tasks if t.type == ty) for ty in types}
            raise ValueError(f"tasks: mixes task types ({', '.join(f'{n!r} is {ty}' for ty, n in first.items())}); "
                             "one workflow merges one kind of model: split it into two workflows")
        if types == ["causal_lm"] and self.base_model in PACKAGED_ENCODERS:
            raise ValueError(f"base_model: {self.base_model!r} is an encoder without a language-model head; causal_lm "
                             f"tasks need a causal LM (packaged:{PACKAGED_CAUSAL_LM} or a local checkpoint directory)")
        modes = {self.finetune_for(t).mode for t in self.tasks}
        for where, merge in (("merge", self.merge), ("rounds.merge", self.rounds.merge)):
            if merge.lora.mode != "adapter":
                continue
            if modes != {"lora"}:
                raise ValueError(f"{where}.lora.mode: adapter needs LoRA experts, but some tasks fine-tune with mode "
                                 "full; set finetune.mode: lora or use lora.mode: exact")
            if where == "rounds.merge" or self.strategy != "oneshot" or self.rounds.start == "oneshot_merge":
                raise ValueError(f"{where}.lora.mode: adapter writes an adapter, but {self.strategy} rounds start "
                                 "from the merged weights (every round's merge is folded into the model); use "
                                 "lora.mode: exact for iterated strategies")
        return self

    def finetune_for(self, task: TaskSpec) -> FinetuneSpec:
        """The fine-tuning settings of one task: the workflow's, with the task's overrides."""
        if not task.finetune:
            return self.finetune
        return FinetuneSpec.model_validate({**self.finetune.model_dump(), **task.finetune})

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

    @model_validator(mode="after")
    def _merge_weights_name_tasks(self) -> Workflow:
        # every per-expert parameter (weights, densities, ...) is keyed by task name
        for where, merge in (("merge", self.merge), ("rounds.merge", self.rounds.merge)):
            for field in PER_EXPERT_PARAMS:
                given = merge.params.get(field) or {}
                unknown = sorted(set(given) - {t.name for t in self.tasks}) if isinstance(given, dict) else []
                if unknown:
                    raise ValueError(
                        f"{where}.params.{field}: names {unknown}, which are not tasks of this workflow; "
                        f"use task names ({', '.join(t.name for t in self.tasks)})"
                    )
        return self

    @model_validator(mode="after")
    def _learned_merges(self) -> Workflow:
        # searches need held-out validation data; data-driven methods need full classification experts
        search = self.merge.search
        atm_valid = self.strategy == "atm" and self.rounds.start == "oneshot_merge"
        if search is not None and self.merge.validation_fraction is None and not atm_valid:
            raise ValueError(f"merge.params.{search.param}.search: a search needs validation data, and there is "
                             "none; set merge.validation_fraction (e.g. 0.1: that share of each train split is "
                             "held out from the experts and scores the candidates)")
        if self.merge.validation_fraction is not None and not self.merge.needs_validation and not (
                self.rounds.merge.learns_from_inputs and self.strategy != "oneshot"):
            raise ValueError(f"merge.validation_fraction: {self.merge.validation_fraction} holds data out for a "
                             "search, but no merge parameter is searched; give one as {search: [...]} or remove it")
        for where, merge, used in (("merge", self.merge, self.strategy == "oneshot" or atm_valid),
                                   ("rounds.merge", self.rounds.merge, self.strategy != "oneshot")):
            if not (used and merge.learns_from_inputs):
                continue
            if self.held_out_fraction <= 0:
                raise ValueError(f"{where}.method: {merge.method} learns its coefficients on unlabeled inputs of "
                                 "every task, and there are none; set merge.validation_fraction (e.g. 0.1: that "
                                 "share of each train split is held out from the experts, and its inputs, never its "
                                 "labels, train the coefficients)")
            if "coefficients" in merge.params:
                raise ValueError(f"{where}.params.coefficients: the workflow learns them on the validation inputs "
                                 "and fills this in; remove it (or merge stored experts with mergeflow merge)")
            bad = [t.name for t in self.tasks if t.type != "classification" or self.finetune_for(t).mode != "full"]
            if bad:
                raise ValueError(f"{where}.method: {merge.method} learns through each task's head and needs full "
                                 f"classification experts (task {bad[0]!r} is a causal LM or LoRA expert); use "
                                 "task_arithmetic, ties, ... or finetune.mode: full")
        if (atm_valid and self.merge.validation_fraction is not None
                and self.merge.validation_fraction != self.rounds.validation_fraction):
            raise ValueError(f"merge.validation_fraction: {self.merge.validation_fraction} differs from "
                             f"rounds.validation_fraction {self.rounds.validation_fraction}; ATM on validation data "
                             "holds out one slice: leave merge.validation_fraction out")
        if search is not None:
            lm = [t.name for t in self.tasks if t.type != "classification" or self.finetune_for(t).mode != "full"]
            if lm:
                raise ValueError(f"merge.params.{search.param}.search: scores full classification experts with their "
                                 f"heads (task {lm[0]!r} is a causal LM or LoRA expert); give a value instead")
        for where, merge in (("merge", self.merge), ("rounds.merge", self.rounds.merge)):
            lm = [t.name for t in self.tasks if t.type != "classification"]
            if merge.heads.mode == "aligned" and lm:
                raise ValueError(f"{where}.heads: aligned refits classification heads, and task {lm[0]!r} is a "
                                 "causal LM (it has none); use heads: experts")
        if self.rounds.merge.refit_heads:
            raise ValueError("rounds.merge.refit_heads: refits heads after the one-shot merge only (merge.refit_heads); "
                             "remove it")
        if self.rounds.merge.search is not None:
            raise ValueError(f"rounds.merge.params.{self.rounds.merge.search.param}.search: searches choose the "
                             "one-shot merge's parameter (merge.params); give rounds.merge a value")
        for where, merge in (("merge", self.merge), ("rounds.merge", self.rounds.merge)):
            kind = get_method(merge.method).statistics
            if kind is None:
                continue
            if "statistics" in merge.params:
                raise ValueError(f"{where}.params.statistics: the workflow computes the {kind} statistics beside "
                                 "each expert and fills this in; remove it")
            lm = [t.name for t in self.tasks if t.type != "classification"]
            lora = [t.name for t in self.tasks if self.finetune_for(t).mode != "full"]
            if lm or lora:
                raise ValueError(f"{where}.method: {merge.method} needs full classification experts (task "
                                 f"{(lm or lora)[0]!r} is {'causal_lm' if lm else 'LoRA'}); use task_arithmetic, "
                                 "ties, ... or finetune.mode: full")
        return self

    @model_validator(mode="after")
    def _resident_workers(self) -> Workflow:
        # resident workers keep each task's model in memory and merge element-wise, in memory
        if self.rounds.workers != "resident":
            return self
        fix = "or set rounds.workers: tasks"
        if self.strategy not in ("atm", "cold_fusion"):
            raise ValueError(f"rounds.workers: resident keeps models across rounds; strategy {self.strategy!r} has one "
                             "round. Use strategy: atm or cold_fusion, or remove rounds.workers")
        m = self.rounds.merge
        if get_method(m.method).statistics or m.learns_from_inputs or m.heads.mode != "experts":
            raise ValueError(f"rounds.workers: resident merges in memory with element-wise methods; rounds.merge "
                             f"{m.method!r}{' with heads: aligned' if m.heads.mode != 'experts' else ''} reads the "
                             f"experts' data or statistics: use linear, task_arithmetic, ties, dare_*, breadcrumbs, ... "
                             f"{fix}")
        if self.rounds.patience is not None and self.rounds.checkpoint_every > 1:
            raise ValueError(f"rounds.patience: {self.rounds.patience} counts rounds without improvement, and with "
                             f"checkpoint_every: {self.rounds.checkpoint_every} only checkpointed rounds are scored; "
                             "set rounds.checkpoint_every: 1 or remove patience")
        if self.strategy == "atm" and self.rounds.start == "oneshot_merge":
            raise ValueError(f"rounds.workers: resident: ATM on validation data (rounds.start: oneshot_merge) is not "
                             f"run by resident workers in this version; {fix}")
        return self

    @model_validator(mode="after")
    def _recurring(self) -> Workflow:
        if self.recurring is None:
            return self
        names = [t.name for t in self.tasks]
        unknown = sorted(set(self.recurring.gate.tasks or []) - set(names))
        if unknown:
            raise ValueError(f"recurring.gate.tasks: names {unknown}, which are not tasks of this workflow; "
                             f"use task names ({', '.join(names)})")
        lm = [t.name for t in self.tasks if t.type != "classification"]
        if lm:
            raise ValueError(f"recurring: task {lm[0]!r} is causal_lm; recurring rounds gate on classification "
                             "tasks (a head per task) in this version: run causal-LM workflows with mergeflow run")
        if self.recurring.merge.heads.mode != "experts":
            raise ValueError("recurring.merge.heads: aligned heads are not computed in recurring rounds in this version "
                             "(a contribution's rows are not the task's train split); remove it")
        if (self.recurring.merge.search is not None or get_method(self.recurring.merge.method).statistics
                or self.recurring.merge.learns_from_inputs):
            raise ValueError(f"recurring.merge.method: {self.recurring.merge.method} needs validation data or "
                             "statistics, which recurring rounds do not compute; use linear, task_arithmetic, "
                             "ties, dare_*, breadcrumbs or another element-wise method")
        return self

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
        """A stable hash of everything that changes the weights (not tracking or store settings)."""
        payload = self.model_dump(mode="json", exclude={"tracking", "store", "description"})
        # where rounds run and how often they are written change no weight (resident rounds are bit for bit
        # those of task workers), so a spec keeps its hash when they change
        payload["rounds"].pop("workers")
        payload["rounds"].pop("checkpoint_every")
        # fields added later are left out at their default, so a spec keeps its hash across versions
        for merge in (payload["merge"], payload["rounds"]["merge"], (payload.get("recurring") or {}).get("merge")):
            if merge is not None and merge.get("heads", {}).get("mode") == "experts":
                merge.pop("heads")
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _check_finetune(settings: dict[str, Any], where: str) -> None:
    """Validate merged fine-tuning settings; raise ``ValueError`` naming ``where``'s field and value."""
    try:
        FinetuneSpec.model_validate(settings)
    except ValidationError as exc:
        e = exc.errors()[0]
        loc = ".".join(str(x) for x in e["loc"]) or "(settings)"
        msg = str(e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown finetune setting; valid: {', '.join(FinetuneSpec.model_fields)}"
        raise ValueError(f"{where}.{loc}: {msg} (got {e.get('input')!r})") from None


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith("function-"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _describe(err: dict[str, Any], data: Any) -> str:
    loc = _format_loc(tuple(err.get("loc", ())))
    msg = str(err.get("msg", "")).removeprefix("Value error, ")
    kind = err.get("type", "")
    value = err.get("input")
    # validators that check several fields name the exact sub-field at the start of their message
    sub = re.match(r"^((?:params|merge|tasks|rounds|base_model|finetune)[\w\[\].]*): (.*)$", msg, re.S)
    if sub:
        inner, msg = sub.group(1), sub.group(2)
        loc = inner if loc == "(top level)" else f"{loc}.{inner}"
        return f"{loc}: {msg}" + ("" if msg.endswith(".") else ".")
    if kind == "extra_forbidden":
        return f"{loc}: unknown key (got {value!r}). Remove it or check its spelling against the README's spec reference."
    if kind == "missing":
        return f"{loc}: required field is missing."
    if kind == "literal_error":
        return f"{loc}: {msg} (got {value!r})."
    if isinstance(value, (str, int, float, bool)) or value is None:
        if "(got " not in msg:
            return f"{loc}: {msg} (got {value!r})."
    return f"{loc}: {msg}."


def parse_workflow(data: Any, source: str = "<spec>") -> Workflow:
    """Validate a parsed YAML/JSON mapping into a :class:`Workflow`.

    Args:
        data: The mapping read from the spec file.
        source: Where it came from, for error messages.

    Returns:
        The frozen, validated workflow.

    Raises:
        SpecError: with one line per problem.
    """
    if not isinstance(data, dict):
        raise SpecError(source, [f"(top level): a workflow spec is a mapping of keys (got {type(data).__name__})."])
    try:
        return Workflow.model_validate(data)
    except ValidationError as exc:
        raise SpecError(source, [_describe(e, data) for e in exc.errors()]) from None


def load_workflow(path: str | Path, overrides: dict[str, Any] | None = None) -> Workflow:
    """Read and validate a workflow spec file.

    Args:
        path: A YAML (or JSON) file.
        overrides: Dotted keys to set before validation, e.g. ``{"tracking.uri": "sqlite:///x.db"}``.

    Returns:
        The validated workflow.

    Raises:
        SpecError: when the file is missing, is not YAML, or breaks a rule.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), [f"(file): no such spec file {str(path)!r}. Check the path; shipped specs are in workflows/."])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(str(path), [f"(file): not valid YAML: {exc}"]) from None
    if overrides and isinstance(data, dict):
        for dotted, value in overrides.items():
            if value is None:
                continue
            node = data
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
    wf = parse_workflow(data, str(path))
    return wf
