"""The merge-method registry: one pure tensor function per method, registered by name.

A method is a function ``fn(base, experts, weights, params, ctx) -> Tensor`` over one parameter
tensor at a time:

- ``base``: the base model's tensor (``None`` for methods that do not need it),
- ``experts``: the experts' tensors, in a fixed order,
- ``weights``: one float per expert (already resolved from the spec's per-task weights),
- ``params``: the method's validated parameter model,
- ``ctx``: the tensor's name (for per-tensor seeds, or the layer index of layer-wise methods) and
  ``stats``, whatever the method's optional ``prepare`` pass computed over the whole model (for
  methods that need a global statistic, e.g. a whole-model top-k threshold).

The streaming engine (``operators.merge.engine``) calls it tensor by tensor, in float32, and casts
the result back to the checkpoint's dtype. Methods know nothing of files, Ray or MLflow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator
from torch import Tensor


@dataclass(frozen=True)
class TensorContext:
    """Where in the model the tensor being merged sits, and the method's whole-model statistics."""

    key: str = ""
    stats: Any = None
    experts: tuple[str, ...] = ()  # the experts' names, in the order their tensors are given
    local: Any = None  # what the method's ``tensor_stats`` computed over this whole tensor
    start: int = 0  # where the block being merged starts in the flattened tensor (0 for a whole tensor)


TensorMergeFn = Callable[[Tensor | None, Sequence[Tensor], Sequence[float], BaseModel, TensorContext], Tensor]
TensorStream = Callable[[], Iterator[tuple[str, Tensor | None, list[Tensor]]]]


class ModelStream:
    """A re-readable pass over the whole model: ``stream()`` yields ``(key, base, experts)`` per
    floating-point tensor, reading lazily; ``keys`` lists the tensor names without reading anything."""

    def __init__(self, keys: Sequence[str], read: Callable[[str], tuple[Tensor | None, list[Tensor]]]):
        self.keys = list(keys)
        self._read = read

    def __call__(self) -> Iterator[tuple[str, Tensor | None, list[Tensor]]]:
        for k in self.keys:
            base, experts = self._read(k)
            yield k, base, experts
# prepare(stream, params, names): before merging, a method may read the whole model, tensor by
# tensor, as often as it needs (each stream() call starts a fresh pass), and return its statistics
PrepareFn = Callable[[TensorStream, BaseModel, Sequence[str]], Any]
# tensor_stats(task_vector, params, names, key): statistics over one whole tensor (named key), computed
# before a large tensor is merged in pieces (a tensor merged whole gets ctx.local None, and the method
# computes them itself); task_vector(i) reads expert i's τ in float32, a fresh tensor each call
TensorStatsFn = Callable[[Callable[[int], Tensor], BaseModel, Sequence[str], str], Any]
StatisticsKind = Literal["gram", "fisher"]
InputsKind = Literal["unlabeled"]


class MergeParams(BaseModel):
    """Base class of every method's parameters: frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Per-expert weights keyed by task (expert) name. Missing names get weight 1.0.
    weights: dict[str, float] | None = None


class DensityParams(MergeParams):
    """Parameters of methods that keep a fraction of each task vector (TIES, breadcrumbs).

    ``density`` applies to every expert; ``densities`` overrides it per expert (mergekit configs
    give density per model).
    """

    density: float = 0.2
    densities: dict[str, float] | None = None

    @field_validator("density")
    @classmethod
    def _density_in_range(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError("density must be in (0, 1]: the fraction of each task vector kept")
        return v

    @field_validator("densities")
    @classmethod
    def _densities_in_range(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        bad = {k: d for k, d in (v or {}).items() if not 0.0 < d <= 1.0}
        if bad:
            raise ValueError(f"every density must be in (0, 1]; out of range: {', '.join(sorted(bad))}")
        return v

    def density_for(self, names: Sequence[str], count: int = 0) -> list[float]:
        """One density per expert, in ``names`` order (``densities`` must name experts only)."""
        return resolve_per_expert(self.densities, self.density, names, "densities", count)


def resolve_per_expert(given: dict[str, float] | None, default: float, names: Sequence[str], field: str,
                       count: int = 0) -> list[float]:
    """Values per expert in ``names`` order; names not listed get ``default``.

    Without names (a method called on lone tensors, outside the engine), ``count`` experts all get
    ``default``.

    Raises:
        ValueError: when ``given`` names an expert that is not being merged.
    """
    if not names:
        return [float(default)] * count
    given = given or {}
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(
            f"params.{field} names {unknown}, which are not among the experts being merged "
            f"({', '.join(names)}); use the task names"
        )
    return [float(given.get(n, default)) for n in names]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method."""

    name: str
    fn: TensorMergeFn
    params: type[MergeParams]
    needs_base: bool
    paper: str
    formula: str
    allow_negative_weights: bool = False
    prepare: PrepareFn | None = None
    # element-wise methods (given their statistics) let the engine merge large tensors in row
    # blocks, so memory does not grow with the largest tensor; chunkable(params) says when
    chunkable: Callable[[BaseModel], bool] | None = None
    tensor_stats: TensorStatsFn | None = None
    # what a data-driven method needs beside the weights, computed by the pipeline before it merges
    # (``operators.learn``) and handed to it in its parameters:
    statistics: StatisticsKind | None = None  # per expert, on its own training inputs: "gram" or "fisher"
    inputs: InputsKind | None = None  # "unlabeled": every task's validation inputs (its coefficients are learned)
    experts: tuple[int, int | None] = (1, None)  # how many experts it merges: at least, at most (None: any)

    def check_expert_count(self, n: int) -> None:
        """Raise ``ValueError`` naming the method and the count it takes when ``n`` experts are not that."""
        low, high = self.experts
        if n < low or (high is not None and n > high):
            takes = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
            raise ValueError(f"{self.name} merges {takes} expert{'s' if (high or low) > 1 else ''} "
                             f"(the base aside), not {n}")

    def parse_params(self, raw: dict | None) -> MergeParams:
        """Validate raw parameters, raising ``ValueError`` that names parameter, value and fix."""
        try:
            p = self.params.model_validate(raw or {})
        except ValidationError as exc:
            problems = []
            for e in exc.errors():
                loc = ".".join(str(x) for x in e["loc"]) or "(params)"
                msg = str(e["msg"]).removeprefix("Value error, ")
                if e["type"] == "extra_forbidden":
                    known = ", ".join(sorted(self.params.model_fields)) or "none"
                    msg = f"unknown parameter for {self.name!r}; its parameters are: {known}"
                problems.append(f"params.{loc}: {msg} (got {e.get('input')!r})")
            raise ValueError("; ".join(problems)) from None
        if p.weights and not self.allow_negative_weights:
            bad = {k: v for k, v in p.weights.items() if v < 0}
            if bad:
                raise ValueError(
                    f"params.weights: negative weights are not allowed for {self.name!r} (got {bad}); "
                    "use non-negative weights"
                )
        return p


MERGE_METHODS: dict[str, MergeMethod] = {}


def register(
    name: str,
    *,
    params: type[MergeParams],
    needs_base: bool,
    paper: str,
    formula: str,
    allow_negative_weights: bool = False,
    prepare: PrepareFn | None = None,
    chunkable: bool | Callable[[BaseModel], bool] = False,
    tensor_stats: TensorStatsFn | None = None,
    statistics: StatisticsKind | None = None,
    inputs: InputsKind | None = None,
    experts: tuple[int, int | None] = (1, None),
) -> Callable[[TensorMergeFn], TensorMergeFn]:
    """Register a tensor merge function under ``name`` (decorator).

    A data-driven method says what it needs here: ``statistics="gram"`` / ``"fisher"`` (computed beside
    each expert; its parameters then get ``statistics``: expert → directory) or ``inputs="unlabeled"``
    (coefficients learned on every task's validation inputs; its parameters get ``coefficients``).
    ``experts=(low, high)`` bounds how many experts it merges (slerp: exactly two), checked before anything
    is read or trained.
    """

    def deco(fn: TensorMergeFn) -> TensorMergeFn:
        if name in MERGE_METHODS:
            raise RuntimeError(f"merge method {name!r} is registered twice")
        MERGE_METHODS[name] = MergeMethod(
            name=name,
            fn=fn,
            params=params,
            needs_base=needs_base,
            paper=paper,
            formula=formula,
            allow_negative_weights=allow_negative_weights,
            prepare=prepare,
            chunkable=chunkable if callable(chunkable) else (lambda _p, c=bool(chunkable): c),
            tensor_stats=tensor_stats,
            statistics=statistics,
            inputs=inputs,
            experts=experts,
        )
        return fn

    return deco


def get_method(name: str) -> MergeMethod:
    """Look a method up by name; an unknown name lists the known ones."""
    try:
        return MERGE_METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown merge method {name!r}. Known: {', '.join(sorted(MERGE_METHODS))}"
        ) from None


def validate_merge_params(name: str, raw: dict | None) -> MergeParams:
    """Validate ``raw`` parameters for method ``name`` (raises ``ValueError``)."""
    return get_method(name).parse_params(raw)


def resolve_weights(params: MergeParams, expert_names: Sequence[str]) -> list[float]:
    """Per-expert weights in ``expert_names`` order; names not listed get 1.0.

    Raises:
        ValueError: when ``weights`` names an expert that is not being merged.
    """
    return resolve_per_expert(params.weights, 1.0, expert_names, "weights")
