"""AdaMerging (Yang et al., ICLR 2024, arXiv 2310.02575): merging coefficients learned without labels.

    θ = θ_0 + Σ_k λ_k^l · w_k · τ̂_k^l

per parameter tensor l (``granularity: layer``, the paper's layer-wise AdaMerging: one λ per task
per parameter tensor, as in ``main_layer_wise_adamerging.py``) or one λ_k for the whole model
(``granularity: task``). τ̂_k = τ_k = θ_k − θ_0, or, for AdaMerging++ (``ties_density`` set), the
TIES-processed task vector: trimmed to its top ``ties_density`` entries by magnitude over the whole
model, then kept only where its sign agrees with the elected sign γ = sign(Σ_k τ̂_k); the λ-weighted
sum of those is TIES' "dis-sum" with learned coefficients.

The λ are learned by :func:`operators.learn.coefficients.learn_coefficients`: Adam on the mean prediction
entropy of the merged model, each task's inputs through that task's own head, on **unlabeled**
inputs of every task (the pipeline uses the validation slices held out of the train splits, never
the eval split). Paper defaults: λ initialised at 0.3, clamped to [0, 1], Adam with learning rate
1e-3, 500 steps, 16 inputs per task per step. This file is the merge given the learned λ (a pure
function of tensors, like every method); ``coefficients`` holds them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field, field_validator
from torch import Tensor

from operators.merge.registry import MergeParams, TensorContext, register
from operators.merge.task_vectors import (
    elect_sign,
    global_topk_thresholds,
    stack_task_vectors,
    topk_threshold,
    trim_by_threshold_,
    weighted,
)


class AdaMergingParams(MergeParams):
    granularity: Literal["layer", "task"] = Field(
        default="layer", description="layer: one λ per task per parameter tensor; task: one λ per task")
    ties_density: float | None = Field(
        default=None, gt=0.0, le=1.0,
        description="AdaMerging++: trim each task vector to this fraction (TIES, whole model) and elect signs first")
    init: float = Field(default=0.3, ge=0.0, le=10.0, description="initial λ (the paper's 0.3)")
    steps: int = Field(default=500, ge=1, le=100_000, description="Adam steps on the entropy")
    learning_rate: float = Field(default=1e-3, gt=0.0, le=1.0, description="Adam learning rate")
    batch_size: int = Field(default=16, ge=1, le=4096, description="unlabeled inputs per task per step")
    clamp: bool = Field(default=True, description="keep every λ in [0, 1] after each step (the official code)")
    seed: int = Field(default=0, description="seeds the order the unlabeled inputs are drawn in")
    coefficients: dict[str, float | dict[str, float]] | None = Field(
        default=None,
        description="learned λ: expert name → λ (task) or → {tensor name: λ} (layer); filled in by the pipeline")

    @field_validator("coefficients")
    @classmethod
    def _finite(cls, v):
        import math

        for name, c in (v or {}).items():
            values = c.values() if isinstance(c, dict) else [c]
            if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in values):
                raise ValueError(f"coefficients of {name!r} must be finite numbers")
        return v


def _prepare(stream, params: AdaMergingParams, names: Sequence[str]):
    """AdaMerging++: each expert's whole-model magnitude threshold (TIES' trim)."""
    if params.ties_density is None:
        return None
    return global_topk_thresholds(stream, params.ties_density, len(names))


def task_vectors(base: Tensor, experts: Sequence[Tensor], params: AdaMergingParams,
                 ctx: TensorContext | None = None) -> Tensor:
    """The τ̂_k the coefficients multiply, stacked ``(T, *shape)`` in float32 (before weights).

    Plain τ_k; with ``ties_density``: trimmed (at the whole-model thresholds in ``ctx.stats``, or
    per tensor for a lone tensor) and zeroed where the sign disagrees with the elected sign.
    """
    tv = stack_task_vectors(base, experts)
    if params.ties_density is None:
        return tv
    thresholds = ctx.stats if ctx is not None and ctx.stats is not None else [
        topk_threshold(tv[t], params.ties_density) for t in range(len(experts))]
    trimmed = trim_by_threshold_(tv, thresholds)
    return trimmed.mul_((trimmed * elect_sign(trimmed)) > 0)


def coefficients_for(params: AdaMergingParams, names: Sequence[str], key: str, count: int) -> list[float]:
    """λ per expert for tensor ``key`` (``init`` for every expert when none are given: a lone tensor)."""
    given = params.coefficients
    if given is None:
        if names:
            raise ValueError("params.coefficients: adamerging merges with learned coefficients, and none were given; "
                             "run it in a workflow (which learns them on each task's unlabeled validation inputs) "
                             "or give {expert: λ} / {expert: {tensor: λ}}")
        return [params.init] * count
    missing = [n for n in names if n not in given]
    if missing:
        raise ValueError(f"params.coefficients: no λ for expert(s) {missing}; the coefficients were learned for "
                         f"{sorted(given)}: learn them again for these experts")
    out = []
    for n in names:
        c = given[n]
        if isinstance(c, dict):
            if key not in c:
                raise ValueError(f"params.coefficients.{n}: no λ for tensor {key!r}; the coefficients were learned "
                                 "on another model: learn them again")
            out.append(float(c[key]))
        else:
            out.append(float(c))
    return out


@register(
    "adamerging",
    params=AdaMergingParams,
    needs_base=True,
    paper="https://arxiv.org/abs/2310.02575",
    formula="θ = θ_0 + Σ_k λ_k^l w_k τ̂_k^l, λ learned by entropy minimisation on unlabeled inputs",
    prepare=_prepare,
    inputs="unlabeled",
    chunkable=True,
)
def adamerging(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: AdaMergingParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """Merge one tensor with learned per-task (per-tensor) coefficients.

    Args:
        base: θ_0's tensor.
        experts: The experts' tensors θ_k.
        weights: One weight per expert (multiplies λ_k; 1.0 by default).
        params: ``coefficients`` (the learned λ), ``ties_density`` for AdaMerging++.
        ctx: The tensor's name (for layer-wise λ) and, for AdaMerging++, the whole-model thresholds.

    Returns:
        θ_0 + Σ_k λ_k w_k τ̂_k (float32).
    """
    assert base is not None
    ctx = ctx or TensorContext()
    lam = coefficients_for(params, ctx.experts, ctx.key, len(experts))
    tv = weighted(task_vectors(base, experts, params, ctx), weights)
    return base.float() + weighted(tv, lam).sum(dim=0)
