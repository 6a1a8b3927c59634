"""``merge`` (and ``rounds.merge``, ``recurring.merge``): which method combines the experts, with its
parameters, how LoRA experts are merged and which heads the merged model carries; and the rules
that tie a merge to the rest of the workflow (LoRA adapters out, per-expert parameters keyed by
task, and the data that searched parameters and data-driven methods need)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from operators.learn.recipe import RECIPE_PARAMS, RecipeSpace
from operators.learn.search import SearchSpace, split_search
from operators.merge import MERGE_METHODS, get_method, validate_merge_params
from pipeline.spec.common import _Frozen, contributor_count

if TYPE_CHECKING:
    from pipeline.spec.workflow import Workflow

PER_EXPERT_PARAMS = ("weights", "densities", "lambdas")


class LoraMergeSpec(_Frozen):
    """How LoRA experts are merged.

    ``exact``: each adapter's ΔW = B·A·scaling is added to its base weights and the merge method acts on
    those full task vectors; the output is a full checkpoint. ``adapter``: the output is one peft
    adapter: the merged ΔW factorised by SVD to ``rank`` (any method; the error is measured and
    recorded), or the experts' adapters concatenated (``concat``: exact, linear methods only).
    """

    mode: Literal["exact", "adapter"] = Field(
        default="exact", description="LoRA experts: exact (each ΔW = B·A·scaling folded into a full task vector; "
        "any method; a full checkpoint out) or adapter (one peft adapter out; one-shot only)."
    )
    rank: int | None = Field(
        default=None, ge=1, description="adapter mode with svd: the output adapter's rank (default: the sum of the "
        "experts' ranks)."
    )
    factorization: Literal["svd", "concat"] = Field(
        default="svd", description="adapter mode: svd (the merged ΔW factorised to rank; the error is measured and "
        "recorded) or concat (the experts' adapters side by side: exact, linear and task_arithmetic only)."
    )

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

    mode: Literal["experts", "aligned"] = Field(
        default="experts", description="Classification tasks: experts (each task keeps its expert's head as "
        "trained) or aligned (each head's output layer refit without labels to reproduce its expert's logits on the "
        "merged body)."
    )
    examples: int = Field(
        default=256, gt=0, description="aligned: training inputs per task (a seeded sample of the rows its expert "
        "trained on)."
    )
    ridge: float = Field(default=0.1, gt=0, le=1e6, description="aligned: shrinkage towards the expert's head, "
                         "relative to the mean eigenvalue of the features' Gram matrix.")
    seed: int = Field(default=0, description="aligned: seeds the sample of inputs.")

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


class RecipeSpec(_Frozen):
    """A merge recipe searched on validation data by CMA-ES (mergekit-evolve's idea, in the workflow): the
    method's per-model ``weight`` and ``density`` and its ``lambda``, as mergekit names them, optionally as
    per-layer gradients; every candidate a mergekit config, scored in parallel, the best written as YAML."""

    search: list[Literal["weight", "density", "lambda"]] = Field(
        default_factory=lambda: ["weight", "density", "lambda"],
        description="The mergekit parameters searched (those the method takes): weight and density per task, "
                    "lambda for the merge.")
    layers: int = Field(default=1, ge=1, le=8, description="Knots of each searched parameter over the layers: 1 "
                        "is one value for every layer; K > 1 a K-point gradient (mergekit's form).")
    evaluations: int = Field(default=32, ge=2, le=1000, description="Candidates scored in all (the first is the "
                             "method's usual values).")
    population: int | None = Field(default=None, ge=2, le=256, description="Candidates per CMA-ES generation, "
                                   "scored in parallel (default: CMA-ES's 4 + 3 ln d for d searched numbers).")
    bounds: dict[Literal["weight", "density", "lambda"], tuple[float, float]] = Field(
        default_factory=dict, description="Per parameter [low, high] (default weight [0, 1], density [0.1, 1], "
        "lambda [0.1, 3]).")
    seed: int = Field(default=0, description="Seeds CMA-ES.")

    def space(self, method: str) -> RecipeSpace:
        return RecipeSpace(method, tuple(self.search), self.layers, dict(self.bounds))


class MergeSpec(_Frozen):
    """Which merge method combines the experts' bodies, and its parameters."""

    method: str = Field(
        default="task_arithmetic", description="The merge method: a name from the merge-method registry (linear, "
        "task_arithmetic, ties, dare_ties, regmean, fisher, adamerging, ...)."
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="The method's parameters (every method takes weights: {task: w}); one "
        "scalar may be given as {search: ...} to be chosen on validation data (a grid, a range or a "
        "golden-section search)."
    )
    lora: LoraMergeSpec = Field(default_factory=LoraMergeSpec, description="How LoRA experts are merged.")
    validation_fraction: float | None = Field(
        default=None, gt=0.0, lt=1.0,
        description="Fraction of each task's train split held out (experts train on the rest) to score a "
                    "searched parameter on, or whose inputs train a method that learns from them (adamerging); "
                    "never the eval split.",
    )
    heads: HeadsSpec = Field(
        default_factory=HeadsSpec, description="Which head each task has in the merged model: experts (default) or "
        "aligned; a string is read as the mode."
    )
    recipe: RecipeSpec | None = Field(
        default=None, description="One-shot: search the merge's recipe (per-task weight and density, lambda, "
        "optionally per layer) by CMA-ES on the validation slices, candidates scored in parallel; the method is "
        f"mergekit's of the same name ({', '.join(RECIPE_PARAMS)}); params stays empty."
    )
    refit_heads: bool = Field(
        default=False,
        description="One-shot: also score the merged body with every head refit on it (a seeded linear probe on "
                    "the task's train split), as its own column; the merged model keeps the experts' heads.",
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
        if self.recipe is not None:
            try:
                self.recipe.space(self.method)
            except ValueError as exc:
                raise ValueError(f"{exc} (merge.method {self.method!r})") from None
            if self.params:
                raise ValueError(f"params: the recipe search chooses the parameters (got {sorted(self.params)}); "
                                 "leave params out, or search only what you do not fix: recipe.search")
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
        """A searched parameter or recipe, or a method that learns from inputs: a validation slice is held out."""
        return self.search is not None or self.recipe is not None or self.learns_from_inputs


# --- rules across the workflow ---------------------------------------------------------------------

def check_lora_adapter_merges(wf: Workflow) -> None:
    """``lora.mode: adapter`` writes one adapter: it needs LoRA experts and a one-shot merge."""
    modes = {wf.finetune_for(t).mode for t in wf.tasks}
    for where, merge in (("merge", wf.merge), ("rounds.merge", wf.rounds.merge)):
        if merge.lora.mode != "adapter":
            continue
        if modes != {"lora"}:
            raise ValueError(f"{where}.lora.mode: adapter needs LoRA experts, but some tasks fine-tune with mode "
                             "full; set finetune.mode: lora or use lora.mode: exact")
        if where == "rounds.merge" or wf.strategy != "oneshot" or wf.rounds.start == "oneshot_merge":
            raise ValueError(f"{where}.lora.mode: adapter writes an adapter, but {wf.strategy} rounds start "
                             "from the merged weights (every round's merge is folded into the model); use "
                             "lora.mode: exact for iterated strategies")


def check_expert_counts(wf: Workflow) -> None:
    """A method that merges a set number of experts (slerp: two) gets that many: the tasks, or ColD Fusion's
    contributors a round, checked before anything trains."""
    merges = []
    if wf.strategy == "oneshot" or (wf.strategy == "atm" and wf.rounds.start == "oneshot_merge"):
        merges.append(("merge", wf.merge, len(wf.tasks)))
    if wf.strategy in ("atm", "cold_fusion"):
        n = contributor_count(wf.rounds.contributors if wf.strategy == "cold_fusion" else None, len(wf.tasks))
        merges.append(("rounds.merge", wf.rounds.merge, n))
    if wf.recurring is not None and get_method(wf.recurring.merge.method).experts[1] is not None:
        raise ValueError(f"recurring.merge.method: {wf.recurring.merge.method} merges a set number of experts, and a "
                         "recurring round merges however many contributions arrive; choose a method for any number "
                         "(linear, task_arithmetic, ties, ...)")
    for where, merge, n in merges:
        try:
            get_method(merge.method).check_expert_count(n)
        except ValueError as exc:
            has = f"this workflow has {n} tasks" if where == "merge" or wf.rounds.contributors is None \
                else f"rounds.contributors gives {n} a round"
            raise ValueError(f"{where}.method: {exc}; {has}: choose a method for {n} experts") from None


def check_per_expert_params(wf: Workflow) -> None:
    """Every per-expert parameter (weights, densities, ...) is keyed by task name."""
    for where, merge in (("merge", wf.merge), ("rounds.merge", wf.rounds.merge)):
        for field in PER_EXPERT_PARAMS:
            given = merge.params.get(field) or {}
            unknown = sorted(set(given) - {t.name for t in wf.tasks}) if isinstance(given, dict) else []
            if unknown:
                raise ValueError(
                    f"{where}.params.{field}: names {unknown}, which are not tasks of this workflow; "
                    f"use task names ({', '.join(t.name for t in wf.tasks)})"
                )


def _atm_on_validation(wf: Workflow) -> bool:
    """ATM on validation data: round 0 is the one-shot merge of experts trained without a held-out slice."""
    return wf.strategy == "atm" and wf.rounds.start == "oneshot_merge"


def _not_full_classification(wf: Workflow) -> list[str]:
    """Tasks whose experts are causal LMs or LoRA adapters."""
    return [t.name for t in wf.tasks if t.type != "classification" or wf.finetune_for(t).mode != "full"]


def check_validation_data(wf: Workflow) -> None:
    """A search needs held-out validation data, and held-out data needs something that uses it."""
    if wf.merge.recipe is not None and wf.merge.validation_fraction is None:
        raise ValueError("merge.recipe: a recipe search scores candidates on validation data, and there is none; "
                         "set merge.validation_fraction (e.g. 0.1: that share of each train split is held out from "
                         "the experts and scores the candidates)")
    search = wf.merge.search
    if search is not None and wf.merge.validation_fraction is None and not _atm_on_validation(wf):
        raise ValueError(f"merge.params.{search.param}.search: a search needs validation data, and there is "
                         "none; set merge.validation_fraction (e.g. 0.1: that share of each train split is "
                         "held out from the experts and scores the candidates)")
    if wf.merge.validation_fraction is not None and not wf.merge.needs_validation and not (
            wf.rounds.merge.learns_from_inputs and wf.strategy != "oneshot"):
        raise ValueError(f"merge.validation_fraction: {wf.merge.validation_fraction} holds data out for a "
                         "search, but no merge parameter is searched; give one as {search: [...]} or remove it")


def check_input_learning(wf: Workflow) -> None:
    """A method that learns from inputs (AdaMerging) needs held-out inputs and full classification experts."""
    atm_valid = _atm_on_validation(wf)
    for where, merge, used in (("merge", wf.merge, wf.strategy == "oneshot" or atm_valid),
                               ("rounds.merge", wf.rounds.merge, wf.strategy != "oneshot")):
        if not (used and merge.learns_from_inputs):
            continue
        if wf.held_out_fraction <= 0:
            raise ValueError(f"{where}.method: {merge.method} learns its coefficients on unlabeled inputs of "
                             "every task, and there are none; set merge.validation_fraction (e.g. 0.1: that "
                             "share of each train split is held out from the experts, and its inputs, never its "
                             "labels, train the coefficients)")
        if "coefficients" in merge.params:
            raise ValueError(f"{where}.params.coefficients: the workflow learns them on the validation inputs "
                             "and fills this in; remove it (or merge stored experts with mergeflow merge)")
        bad = _not_full_classification(wf)
        if bad:
            raise ValueError(f"{where}.method: {merge.method} learns through each task's head and needs full "
                             f"classification experts (task {bad[0]!r} is a causal LM or LoRA expert); use "
                             "task_arithmetic, ties, ... or finetune.mode: full")


def check_one_validation_slice(wf: Workflow) -> None:
    """ATM on validation data holds out one slice: ``rounds.validation_fraction``."""
    if (_atm_on_validation(wf) and wf.merge.validation_fraction is not None
            and wf.merge.validation_fraction != wf.rounds.validation_fraction):
        raise ValueError(f"merge.validation_fraction: {wf.merge.validation_fraction} differs from "
                         f"rounds.validation_fraction {wf.rounds.validation_fraction}; ATM on validation data "
                         "holds out one slice: leave merge.validation_fraction out")


def check_search_experts(wf: Workflow) -> None:
    """A search scores candidates with the experts' heads: full classification experts only."""
    search = wf.merge.search
    lm = _not_full_classification(wf)
    if search is not None and lm:
        raise ValueError(f"merge.params.{search.param}.search: scores full classification experts with their "
                         f"heads (task {lm[0]!r} is a causal LM or LoRA expert); give a value instead")
    if wf.merge.recipe is not None and lm:
        raise ValueError(f"merge.recipe: scores full classification experts with their heads (task {lm[0]!r} is a "
                         "causal LM or LoRA expert); give the method's parameters instead")
    if wf.merge.recipe is not None and (wf.strategy != "oneshot" or wf.merge.heads.mode != "experts"):
        raise ValueError("merge.recipe: searches a one-shot merge scored with the experts' heads; use strategy: "
                         "oneshot and heads: experts")


def check_aligned_heads(wf: Workflow) -> None:
    """Aligned heads are classification heads: a causal LM has none."""
    for where, merge in (("merge", wf.merge), ("rounds.merge", wf.rounds.merge)):
        lm = [t.name for t in wf.tasks if t.type != "classification"]
        if merge.heads.mode == "aligned" and lm:
            raise ValueError(f"{where}.heads: aligned refits classification heads, and task {lm[0]!r} is a "
                             "causal LM (it has none); use heads: experts")


def check_round_merge(wf: Workflow) -> None:
    """Refit heads and searches belong to the one-shot merge, not to every round's."""
    if wf.rounds.merge.refit_heads:
        raise ValueError("rounds.merge.refit_heads: refits heads after the one-shot merge only (merge.refit_heads); "
                         "remove it")
    if wf.rounds.merge.recipe is not None:
        raise ValueError("rounds.merge.recipe: a recipe search chooses the one-shot merge's recipe (merge.recipe); "
                         "give rounds.merge its parameters")
    if wf.rounds.merge.search is not None:
        raise ValueError(f"rounds.merge.params.{wf.rounds.merge.search.param}.search: searches choose the "
                         "one-shot merge's parameter (merge.params); give rounds.merge a value")


def check_statistics(wf: Workflow) -> None:
    """A method that reads statistics (RegMean's Gram, Fisher's) has the workflow compute them beside each
    full classification expert."""
    for where, merge in (("merge", wf.merge), ("rounds.merge", wf.rounds.merge)):
        kind = get_method(merge.method).statistics
        if kind is None:
            continue
        if "statistics" in merge.params:
            raise ValueError(f"{where}.params.statistics: the workflow computes the {kind} statistics beside "
                             "each expert and fills this in; remove it")
        lm = [t.name for t in wf.tasks if t.type != "classification"]
        lora = [t.name for t in wf.tasks if wf.finetune_for(t).mode != "full"]
        if lm or lora:
            raise ValueError(f"{where}.method: {merge.method} needs full classification experts (task "
                             f"{(lm or lora)[0]!r} is {'causal_lm' if lm else 'LoRA'}); use task_arithmetic, "
                             "ties, ... or finetune.mode: full")


# searches need held-out validation data; data-driven methods need full classification experts
LEARNED_MERGE_RULES = (check_validation_data, check_input_learning, check_one_validation_slice,
                       check_search_experts, check_aligned_heads, check_round_merge, check_statistics)


def check_learned_merges(wf: Workflow) -> None:
    """The merges that learn from data (searches, statistics, learned coefficients, aligned heads): each
    rule of :data:`LEARNED_MERGE_RULES` in turn."""
    for rule in LEARNED_MERGE_RULES:
        rule(wf)
