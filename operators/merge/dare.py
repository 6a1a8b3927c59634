"""DARE: drop and rescale (Yu et al., ICML 2024, arXiv 2311.03099).

Per task vector and tensor: m ~ Bernoulli(p), δ̃ = (1 − m) ⊙ δ / (1 − p); then merge the δ̃ with
task arithmetic (``dare_linear``) or with TIES' sign election and disjoint merge (``dare_ties``).
The masks are seeded per (seed, tensor name, expert name): the same seed gives the same merge,
whatever order tensors are streamed in. p = 0 gives the base method exactly. ``rescale: l1`` is
mergekit's rescaling (match each task vector's L1 norm) instead of the paper's 1/(1 − p).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field
from torch import Tensor

from operators.merge.registry import MergeParams, TensorContext, register
from operators.merge.task_vectors import (
    add_weighted_sum,
    dare,
    disjoint_merge,
    elect_sign,
    stack_task_vectors,
    tensor_seed,
    weighted,
)


class DareParams(MergeParams):
    drop_rate: float = Field(default=0.5, ge=0.0, lt=1.0, description="p, the probability of dropping an entry")
    seed: int = 0
    rescale: Literal["inverse_keep", "l1", "none"] = Field(
        default="inverse_keep", description="survivors × 1/(1 − p) (paper), or match each τ's L1 norm (mergekit)"
    )


class DareLinearParams(DareParams):
    scaling: float = Field(default=0.3, ge=0.0, le=10.0, description="λ of task arithmetic")


class DareTiesParams(DareParams):
    scaling: float = Field(default=1.0, ge=0.0, le=10.0, description="λ")
    merge_func: Literal["mean", "sum"] = "mean"
    divisor: Literal["count", "weights"] = "count"
    zero_sign: Literal["majority", "positive"] = "majority"


def _dropped(base: Tensor, experts: Sequence[Tensor], params: DareParams, ctx: TensorContext | None) -> Tensor:
    ctx = ctx or TensorContext()
    names = ctx.experts or tuple(str(i) for i in range(len(experts)))
    seeds = [tensor_seed(params.seed, ctx.key, n) for n in names]
    return dare(stack_task_vectors(base, experts), params.drop_rate, seeds, params.rescale)


@register(
    "dare_linear",
    params=DareLinearParams,
    needs_base=True,
    paper="https://arxiv.org/abs/2311.03099",
    formula="θ = θ_0 + λ Σ w_t · (1 − m_t) ⊙ τ_t / (1 − p)",
    allow_negative_weights=True,
)
def dare_linear(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: DareLinearParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """DARE, then task arithmetic.

    Returns:
        θ_0 + λ Σ_t w_t δ̃_t (float32).
    """
    assert base is not None
    return add_weighted_sum(base, _dropped(base, experts, params, ctx), weights, params.scaling)


@register(
    "dare_ties",
    params=DareTiesParams,
    needs_base=True,
    paper="https://arxiv.org/abs/2311.03099",
    formula="θ = θ_0 + λ · disjoint_merge(elect(DARE_p(τ_t)))",
)
def dare_ties(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: DareTiesParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """DARE in place of TIES' trim, then TIES' sign election and disjoint merge.

    Returns:
        θ_0 + λ τ_m (float32).
    """
    assert base is not None
    tv = weighted(_dropped(base, experts, params, ctx), weights)
    divide_by = weights if params.divisor == "weights" else None
    return base.float() + params.scaling * disjoint_merge(tv, elect_sign(tv, params.zero_sign), params.merge_func, divide_by)


__all__ = ["dare_linear", "dare_ties"]
