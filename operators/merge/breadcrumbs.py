"""Model breadcrumbs (Davari & Belilovsky, ECCV 2024, arXiv 2312.06795).

Per task vector and tensor: zero the top-γ fraction of entries by |τ| (outliers), keep the next
top-``density`` (β) fraction, zero the rest; then θ = θ_0 + λ Σ_t w_t τ̃_t.

The paper's code ranks each row of the last dimension (``scope: row``); mergekit ranks the whole
flattened tensor (``scope: tensor``). ``sign_election: true`` adds TIES' sign election and disjoint
merge (mergekit's ``breadcrumbs_ties``). Defaults are the paper's search starting point
(β = 0.15, γ = 0.006, λ = 0.2); the paper tunes all three on validation data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field
from torch import Tensor

from operators.merge.registry import DensityParams, TensorContext, register
from operators.merge.task_vectors import (
    add_weighted_sum,
    disjoint_merge,
    elect_sign,
    middle_band,
    normalized,
    stack_task_vectors,
    weighted,
)


class BreadcrumbsParams(DensityParams):
    density: float = Field(default=0.15, description="β: fraction of entries kept after the outliers")
    gamma: float = Field(default=0.006, ge=0.0, lt=1.0, description="γ: fraction of largest entries dropped")
    scaling: float = Field(default=0.2, ge=0.0, le=10.0, description="λ")
    scope: Literal["row", "tensor"] = "row"
    sign_election: bool = False
    zero_sign: Literal["majority", "positive"] = "majority"
    normalize: bool = Field(default=False, description="divide by the (agreeing) weights' sum, as mergekit's normalize")


@register(
    "breadcrumbs",
    params=BreadcrumbsParams,
    needs_base=True,
    paper="https://arxiv.org/abs/2312.06795",
    formula="θ = θ_0 + λ Σ w_t · mask_{γ,β}(τ_t) ⊙ τ_t",
    chunkable=lambda p: p.scope == "row",  # whole rows stay together
    allow_negative_weights=True,
)
def breadcrumbs(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: BreadcrumbsParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """Breadcrumbs-merge one tensor.

    Returns:
        θ_0 + λ Σ_t w_t τ̃_t (float32), or the sign-elected disjoint combination of the τ̃_t.
    """
    assert base is not None
    ctx = ctx or TensorContext()
    tv = stack_task_vectors(base, experts)
    densities = params.density_for(ctx.experts, len(experts))
    masked = tv.clone()
    for t, d in enumerate(densities):
        masked[t] = middle_band(tv[t : t + 1], d, params.gamma, params.scope)[0]
    if params.sign_election:
        w = weighted(masked, weights)
        how = "mean" if params.normalize else "sum"
        return base.float() + params.scaling * disjoint_merge(w, elect_sign(w, params.zero_sign), how, weights)
    if params.normalize:
        weights = normalized(weights)
    return add_weighted_sum(base, masked, weights, params.scaling)
