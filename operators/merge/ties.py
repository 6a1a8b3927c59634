"""TIES-Merging (Yadav et al., NeurIPS 2023, arXiv 2306.01708).

1. Trim: keep each task vector's top-``density`` fraction of entries by magnitude.
2. Elect: γ = sign(Σ_t τ̂_t).
3. Disjoint merge: average only the entries whose sign agrees with γ.
4. θ = θ_0 + λ · τ_m.

Defaults follow the paper: the top-k is taken over the *whole model* per task vector
(``scope: model``; computed exactly in a streaming pass), and the disjoint merge is a mean
(``merge_func: mean``). ``scope: tensor`` trims each tensor separately (mergekit's behaviour);
``merge_func: sum`` is the "dis-sum" variant AdaMerging and FusionBench use (with λ = 0.3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field
from torch import Tensor

from operators.merge.registry import MergeParams, TensorContext, register
from operators.merge.task_vectors import (
    disjoint_merge,
    elect_sign,
    global_topk_thresholds,
    stack_task_vectors,
    topk_threshold,
    trim_by_threshold,
    weighted,
)


class TiesParams(MergeParams):
    density: float = Field(default=0.2, gt=0.0, le=1.0, description="fraction of each task vector kept")
    scaling: float = Field(default=1.0, ge=0.0, le=10.0, description="λ")
    merge_func: Literal["mean", "sum"] = "mean"
    scope: Literal["model", "tensor"] = Field(default="model", description="where the top-k is taken")


def _prepare(stream, params: TiesParams, names: Sequence[str]):
    if params.scope == "model":
        return global_topk_thresholds(stream, params.density, len(names))
    return None


@register(
    "ties",
    params=TiesParams,
    needs_base=True,
    paper="https://arxiv.org/abs/2306.01708",
    formula="θ = θ_0 + λ · disjoint_merge(elect(trim_k(τ_t)))",
    prepare=_prepare,
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
        params: density, λ (``scaling``), ``merge_func`` and ``scope``.
        ctx: With ``scope: model``, ``ctx.stats`` holds each expert's whole-model magnitude threshold.

    Returns:
        The merged tensor (float32).
    """
    assert base is not None
    tv = stack_task_vectors(base, experts)
    if params.scope == "model" and ctx is not None and ctx.stats is not None:
        thresholds = ctx.stats
    else:  # per tensor (also what a lone tensor outside the engine gets)
        thresholds = [topk_threshold(tv[t], params.density) for t in range(len(experts))]
    trimmed = weighted(trim_by_threshold(tv, thresholds), weights)
    merged_tv = disjoint_merge(trimmed, elect_sign(trimmed), params.merge_func)
    return base.float() + params.scaling * merged_tv
