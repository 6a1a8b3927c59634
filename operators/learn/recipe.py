"""Recipe search: a merge's parameters (per-model weights, densities, λ, optionally per-layer gradients of
them) chosen by CMA-ES on validation data, as mergekit-evolve does, every candidate a mergekit config.

A candidate is a point x in [0, 1]^d; :class:`RecipeSpace` maps it to a mergekit YAML config (each searched
parameter scaled into its bounds; with ``layers: K > 1`` each becomes a K-knot gradient over the layers,
``operators.merge.schedule``). The config is merged in memory by the same translation ``mergeflow merge``
uses (so the best candidate, written as YAML, merges to the same model with mergekit's semantics) and
scored with every task's head on its validation slice: the mean normalized validation accuracy, the
selection rule of the coefficient search (``operators.learn.search``).

:func:`cma_search` is the loop: each generation's candidates go to ``evaluate`` together (the pipeline
scores them in parallel as Ray tasks; in-process, one after another), CMA-ES (the ``cma`` package,
bounded to [0, 1]^d, seeded) is told their scores, until ``evaluations`` candidates have been scored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# mergekit methods whose recipe can be searched, with the mergekit parameters each takes
RECIPE_PARAMS: dict[str, tuple[str, ...]] = {
    "linear": ("weight",),
    "task_arithmetic": ("weight", "lambda"),
    "ties": ("weight", "density", "lambda"),
    "dare_ties": ("weight", "density", "lambda"),
    "dare_linear": ("weight", "density", "lambda"),
    "breadcrumbs": ("weight", "density", "lambda"),
    "della": ("weight", "density", "lambda"),
    "della_linear": ("weight", "density", "lambda"),
}
PER_MODEL = ("weight", "density")  # one value per model; lambda is one for the merge
DEFAULT_BOUNDS: dict[str, tuple[float, float]] = {"weight": (0.0, 1.0), "density": (0.1, 1.0), "lambda": (0.1, 3.0)}
# where CMA-ES starts, in each parameter's own units (mergekit's defaults where it has one)
START: dict[str, float] = {"weight": 1.0, "density": 0.5, "lambda": 1.0}
SIGMA0 = 0.25  # the initial step, in [0, 1] units


@dataclass(frozen=True)
class RecipeSpace:
    """What is searched: the mergekit method, its parameters, their bounds, and knots over the layers."""

    method: str
    params: tuple[str, ...]
    layers: int = 1
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    initial: Mapping[str, float] = field(default_factory=dict)  # where CMA-ES starts (default: :data:`START`)

    def __post_init__(self) -> None:
        if self.method not in RECIPE_PARAMS:
            raise ValueError(f"recipe: {self.method!r} is not a method whose recipe can be searched; use one of "
                             f"{', '.join(RECIPE_PARAMS)}")
        for p in self.params:
            if p not in RECIPE_PARAMS[self.method]:
                raise ValueError(f"recipe.search: {p!r} is not a parameter of mergekit's {self.method} "
                                 f"({', '.join(RECIPE_PARAMS[self.method])})")
        for p, (lo, hi) in self.bounds.items():
            if p not in DEFAULT_BOUNDS or not lo < hi:
                raise ValueError(f"recipe.bounds.{p}: [{lo}, {hi}] must be a range low < high of weight, density "
                                 "or lambda")
            if p == "density" and not 0 < lo <= hi <= 1:
                raise ValueError(f"recipe.bounds.density: [{lo}, {hi}] must lie in (0, 1]")

    def bound(self, p: str) -> tuple[float, float]:
        return tuple(self.bounds.get(p, DEFAULT_BOUNDS[p]))  # type: ignore[return-value]

    def slots(self, models: Sequence[str]) -> list[tuple[str, str | None, int]]:
        """Each coordinate of x: (parameter, model or None for the merge's own, knot)."""
        return [(p, m, k) for p in self.params for m in (models if p in PER_MODEL else [None])
                for k in range(self.layers)]

    def dimension(self, models: Sequence[str]) -> int:
        return len(self.slots(models))

    def start(self, models: Sequence[str]) -> np.ndarray:
        """x0: each parameter at its usual value (clipped into its bounds)."""
        out = []
        for p, _, _ in self.slots(models):
            lo, hi = self.bound(p)
            out.append(min(1.0, max(0.0, (self.initial.get(p, START[p]) - lo) / (hi - lo))))
        return np.asarray(out)

    def config(self, x: Sequence[float], base: str | Path, models: Mapping[str, str | Path]) -> dict[str, Any]:
        """The mergekit config of point ``x`` (model name → checkpoint path, in the order of ``models``)."""
        names = list(models)
        values: dict[tuple[str, str | None], list[float]] = {}
        for xi, (p, m, _) in zip(x, self.slots(names), strict=True):
            lo, hi = self.bound(p)
            values.setdefault((p, m), []).append(round(lo + (hi - lo) * min(1.0, max(0.0, float(xi))), 6))

        def setting(v: list[float]) -> float | list[float]:
            return v[0] if len(v) == 1 else v

        entries = []
        for n in names:
            params = {p: setting(values[(p, n)]) for p in self.params if p in PER_MODEL}
            if "weight" not in params:
                params["weight"] = 1.0  # mergekit requires a weight; unsearched, every model counts alike
            entries.append({"model": str(models[n]), "parameters": params})
        cfg: dict[str, Any] = {"merge_method": self.method, "base_model": str(base), "models": entries}
        glob = {p: setting(values[(p, None)]) for p in self.params if p not in PER_MODEL}
        if glob:
            cfg["parameters"] = glob
        cfg["dtype"] = "float32"
        return cfg


@dataclass
class RecipeCandidate:
    """One scored recipe."""

    index: int
    generation: int
    x: list[float]
    config: dict[str, Any]
    score: float  # mean normalized validation accuracy
    accuracy: dict[str, float] = field(default_factory=dict)
    normalized: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    run_id: str | None = None  # where the candidate was recorded (the pipeline's nested run)


@dataclass
class RecipeResult:
    best: RecipeCandidate
    candidates: list[RecipeCandidate]
    generations: int
    population: int
    dimension: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"best": asdict(self.best), "generations": self.generations, "population": self.population,
                "dimension": self.dimension, "seconds": self.seconds, "evaluations": len(self.candidates),
                "scores": [c.score for c in self.candidates]}


def cma_search(space: RecipeSpace, base: str | Path, models: Mapping[str, str | Path],
               evaluate: Callable[[list[dict[str, Any]]], list[Mapping[str, Any]]], *,
               evaluations: int, population: int | None = None, seed: int = 0,
               on_generation: Callable[[list[RecipeCandidate]], None] | None = None) -> RecipeResult:
    """CMA-ES over ``space``: ``evaluate`` scores a generation's configs (each result a mapping with ``score``
    and optionally ``accuracy``, ``normalized``, ``seconds``, ``run_id``); stops after ``evaluations`` scores. The first
    candidate (generation 0, alone) is the start point, the method's usual values, so the search never reports
    worse than it; CMA-ES's generations follow. One number alone (CMA-ES needs two) is searched on an even grid
    of the ``evaluations − 1`` candidates left, as generation 1.

    Ties keep the earliest candidate.
    """
    import cma

    start = time.perf_counter()
    names = list(models)
    d = space.dimension(names)
    if d == 0:
        raise ValueError("recipe.search: nothing to search; name at least one parameter")
    opts = {"bounds": [0.0, 1.0], "seed": seed + 1, "verbose": -9}  # cma reads seed 0 as "from the clock"
    if population is not None:
        opts["popsize"] = population
    x0 = space.start(names)
    es = cma.CMAEvolutionStrategy(x0, SIGMA0, opts)
    candidates: list[RecipeCandidate] = []

    def score(xs: list[np.ndarray], generation: int) -> list[RecipeCandidate]:
        configs = [space.config(x, base, models) for x in xs]
        batch = []
        for x, cfg, s in zip(xs, configs, evaluate(configs), strict=True):
            c = RecipeCandidate(len(candidates), generation, [float(v) for v in x], cfg, float(s["score"]),
                                dict(s.get("accuracy", {})), dict(s.get("normalized", {})),
                                float(s.get("seconds", 0.0)), s.get("run_id"))
            candidates.append(c)
            batch.append(c)
        if on_generation is not None:
            on_generation(batch)
        return batch

    score([x0], 0)  # generation 0: the start point itself (the method's usual values), the mark to beat
    generation = 1
    if d == 1:  # CMA-ES needs two numbers or more: one is searched on an even grid of the candidates left
        n = evaluations - 1
        if n > 0:
            score([np.asarray([i / max(1, n - 1)]) for i in range(n)], 1)
        best = max(candidates, key=lambda c: (c.score, -c.index))
        return RecipeResult(best, candidates, 2 if n > 0 else 1, n, d, time.perf_counter() - start)
    while len(candidates) < evaluations:
        xs = es.ask()[:evaluations - len(candidates)]
        batch = score(xs, generation)
        if len(xs) == es.popsize:  # a whole generation: CMA-ES minimizes, so it is told −score
            es.tell(xs, [-c.score if math.isfinite(c.score) else 1e9 for c in batch])
        generation += 1
    best = max(candidates, key=lambda c: (c.score, -c.index))
    return RecipeResult(best, candidates, generation, es.popsize, d, time.perf_counter() - start)


class RecipeScorer:
    """Scores recipes in memory: the base and experts read once, each recipe merged by the mergekit
    translation ``mergeflow merge`` uses and scored on the validation slices with every task's head."""

    def __init__(self, base: str | Path, experts: Mapping[str, str | Path], validation: Mapping[str, Any], *,
                 max_length: int = 64, device: str = "cpu"):
        from operators.learn.search import ValidationScorer
        from operators.tensor_io import load_state_dict

        self.base_sd = {k: v.float() if v.is_floating_point() else v for k, v in load_state_dict(base).items()}
        self.paths = {n: Path(p) for n, p in experts.items()}
        self.expert_sd = {n: {k: v.float() if v.is_floating_point() else v for k, v in load_state_dict(p).items()}
                          for n, p in experts.items()}
        self.scorer = ValidationScorer(experts, validation, max_length=max_length, device=device)
        self.reference = self.scorer.accuracy()

    def score(self, config: Mapping[str, Any]) -> dict[str, Any]:
        t = time.perf_counter()
        merged = merge_recipe(self.base_sd, self.expert_sd, self.paths, config)
        acc = self.scorer.accuracy(merged)
        norm = {k: acc[k] / self.reference[k] if self.reference[k] > 0 else float("nan") for k in acc}
        return {"score": float(np.mean(list(norm.values()))), "accuracy": acc, "normalized": norm,
                "seconds": time.perf_counter() - t}


def recipe_plan(config: Mapping[str, Any], paths: Mapping[str, Path]):
    """The merge plan of a recipe's mergekit config, its experts named as in ``paths`` (name → checkpoint),
    not by their folders: the same method, parameters and per-tensor parameters, renamed."""
    from operators.merge.merge_config import parse_merge_config

    plan = parse_merge_config(config)
    by_path = {p.resolve(): n for n, p in paths.items()}
    rename = {old: by_path[Path(p).resolve()] for old, p in plan.experts.items()}

    def renamed(v: Any) -> Any:
        if isinstance(v, dict):
            return {rename.get(k, k): renamed(x) for k, x in v.items()}
        if isinstance(v, list):
            return [rename.get(x, x) if isinstance(x, str) else renamed(x) for x in v]
        return v

    plan.experts = {rename[o]: p for o, p in plan.experts.items()}
    plan.params = renamed(plan.params)
    if plan.tensor_params is not None:
        per_tensor = plan.tensor_params
        plan.tensor_params = lambda key: renamed(per_tensor(key))
    return plan


def merge_recipe(base_sd: Mapping[str, torch.Tensor], expert_sd: Mapping[str, Mapping[str, torch.Tensor]],
                 paths: Mapping[str, Path], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A recipe merged in memory (the experts' state dicts keyed as ``paths``)."""
    from operators.learn.search import merge_in_memory

    plan = recipe_plan(config, paths)
    return merge_in_memory(base_sd, {n: expert_sd[n] for n in plan.experts}, plan.method, plan.params,
                           tensor_params=plan.tensor_params)


__all__ = ["DEFAULT_BOUNDS", "RECIPE_PARAMS", "RecipeCandidate", "RecipeResult", "RecipeScorer", "RecipeSpace",
           "cma_search", "merge_recipe", "recipe_plan"]
