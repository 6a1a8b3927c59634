"""TIES-Merging (Yadav et al., NeurIPS 2023, arXiv 2306.01708).

1. Trim: keep each task vector's top-``density`` fraction of entries by magnitude.
2. Elect: γ = sign(Σ_t τ̂_t).
3. Disjoint merge: average only the entries whose sign agrees with γ.
4. θ = θ_0 + λ · τ_m.

Defaults follow the paper: the top-k is taken over the *whole model* per task vector
(``scope: model``; computed exactly in a streaming pass), and the disjoint merge is a mean over the
agreeing entries (``merge_func: mean``, ``divisor: count``). mergekit's behaviour is a set of
explicit options: ``scope: tensor`` trims each tensor separately, ``zero_sign: positive`` elects +
where kept values cancel exactly, ``divisor: weights`` divides by
the agreeing entries' summed weights, ``rescale: l1`` restores each trimmed task vector's L1 norm.
``merge_func: sum`` is the "dis-sum" variant AdaMerging and FusionBench use (with λ = 0.3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field
from torch import Tensor

from operators.merge.registry import DensityParams, TensorContext, register
from operators.merge.task_vectors import (
    disjoint_merge,
    elect_sign,
    global_topk_thresholds,
    rescale_l1,
    stack_task_vectors,
    topk_threshold,
    trim_by_threshold_,
    weighted,
)


class TiesParams(DensityParams):
    density: float = Field(default=0.2, description="fraction of each task vector kept")
    scaling: float = Field(default=1.0, ge=0.0, le=10.0, description="λ")
    merge_func: Literal["mean", "sum"] = "mean"
    divisor: Literal["count", "weights"] = Field(
        default="count", description="dis-mean divides by the agreeing entries' count (paper) or summed weights (mergekit)"
    )
    scope: Literal["model", "tensor"] = Field(default="model", description="where the top-k is taken")
    rescale: Literal["none", "l1"] = Field(default="none", description="l1: restore each trimmed τ's L1 norm (mergekit)")
    zero_sign: Literal["majority", "positive"] = Field(
        default="majority", description="sign elected where the kept values cancel exactly (mergekit: positive)"
    )


def _prepare(stream, params: TiesParams, names: Sequence[str]):
    if params.scope == "model":
        return global_topk_thresholds(stream, params.density_for(names), len(names))
    return None


def _tensor_thresholds(task_vector, params: TiesParams, names: Sequence[str], key: str = ""):
    """``scope: tensor``: each expert's magnitude threshold over the whole tensor (one τ at a time)."""
    if params.scope != "tensor":
        return None
    return [topk_threshold(task_vector(i), d, inplace=True) for i, d in enumerate(params.density_for(names))]


@register(
    "ties",
    params=TiesParams,
    needs_base=True,
    paper="https://arxiv.org/abs/2306.01708",
    formula="θ = θ_0 + λ · disjoint_merge(elect(trim_k(τ_t)))",
    prepare=_prepare,
    chunkable=True,
    tensor_stats=_tensor_thresholds,
)
def ties(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: TiesParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """TIES-merge one tensor.

    Args:
        base: θ_0's tensor.
        experts: The experts' tensors.
        weights: Per-expert weights, applied to the trimmed task vectors before the sign election.
        params: density, λ (``scaling``), ``merge_func``, ``divisor``, ``scope`` and ``rescale``.
        ctx: With ``scope: model``, ``ctx.stats`` holds each expert's whole-model magnitude threshold;
            with ``scope: tensor``, ``ctx.local`` may hold the whole tensor's (when merged in pieces).

    Returns:
        The merged tensor (float32).
    """
    assert base is not None
    ctx = ctx or TensorContext()
    tv = stack_task_vectors(base, experts)
    if params.scope == "model" and ctx.stats is not None:
        thresholds = ctx.stats
    elif params.scope == "tensor" and ctx.local is not None:
        thresholds = ctx.local
    else:  # per tensor (also what a lone tensor outside the engine gets)
        densities = params.density_for(ctx.experts, len(experts))
        thresholds = [topk_threshold(tv[t], d) for t, d in enumerate(densities)]
    trimmed = trim_by_threshold_(tv, thresholds)  # tv is a fresh stack: trim it in place
    if params.rescale == "l1":
        trimmed = rescale_l1(stack_task_vectors(base, experts), trimmed)
    trimmed = weighted(trimmed, weights)
    divide_by = weights if params.divisor == "weights" else None
    merged_tv = disjoint_merge(trimmed, elect_sign(trimmed, params.zero_sign), params.merge_func, divide_by)
    return base.float() + params.scaling * merged_tv
