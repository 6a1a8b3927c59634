"""Consensus merging with TALL masks (Wang, Dimitriadis et al., ICML 2024, arXiv 2405.07813).

τ_MTL = Σ_t w_t τ_t;  per task, the TALL mask m_t = 1{|τ_t| ≥ λ_t · |τ_MTL − τ_t|} marks the weights
task t relies on; the consensus mask keeps weights at least ``k`` tasks rely on,
m = 1{Σ_t m_t ≥ k}, which drops "catastrophic" (no task) and "selfish" (one task, k = 2) weights:

    θ = θ_0 + α · (m ⊙ τ_MTL)

Element-wise, so it streams tensor by tensor. The paper picks each λ_t from {0.2, …, 0.6} and α on
validation data; the defaults (λ_t = 0.4, k = 2, α = 0.3) are starting points.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from operators.merge.registry import MergeParams, TensorContext, register, resolve_per_expert
from operators.merge.task_vectors import stack_task_vectors, weighted


class ConsensusParams(MergeParams):
    k: int = Field(default=2, ge=0, description="keep weights that at least k tasks' TALL masks select")
    lam: float = Field(default=0.4, gt=0.0, description="λ_t of every task's TALL mask")
    lambdas: dict[str, float] | None = Field(default=None, description="λ_t per task (overrides lam)")
    scaling: float = Field(default=0.3, ge=0.0, le=10.0, description="α")


def tall_masks(tv: Tensor, lambdas: Sequence[float]) -> Tensor:
    """Per-task TALL masks m_t = |τ_t| ≥ λ_t |τ_MTL − τ_t| over stacked (weighted) task vectors."""
    mtl = tv.sum(dim=0)
    lam = torch.tensor(list(lambdas), dtype=tv.dtype).view(-1, *([1] * (tv.dim() - 1)))
    return tv.abs() >= lam * (mtl - tv).abs()


@register(
    "consensus",
    params=ConsensusParams,
    needs_base=True,
    paper="https://arxiv.org/abs/2405.07813",
    formula="θ = θ_0 + α · 1{Σ_t 1{|τ_t| ≥ λ_t|τ_MTL − τ_t|} ≥ k} ⊙ τ_MTL",
    chunkable=True,
)
def consensus(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: ConsensusParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """Consensus-merge one tensor (task arithmetic restricted to weights ≥ k tasks agree on).

    Returns:
        θ_0 + α (m ⊙ τ_MTL) (float32).

    Raises:
        ValueError: if ``k`` exceeds the number of experts (every weight would be masked out).
    """
    assert base is not None
    if params.k > len(experts):
        raise ValueError(
            f"params.k: {params.k} is more than the {len(experts)} experts being merged, so every weight "
            "would be masked out; use k ≤ the number of experts (the paper uses 2)"
        )
    ctx = ctx or TensorContext()
    lambdas = resolve_per_expert(params.lambdas, params.lam, ctx.experts, "lambdas", len(experts))
    tv = weighted(stack_task_vectors(base, experts), weights)
    keep = tall_masks(tv, lambdas).sum(dim=0) >= params.k
    return base.float() + params.scaling * (tv.sum(dim=0) * keep)
