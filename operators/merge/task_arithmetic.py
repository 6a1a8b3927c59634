"""Task arithmetic (Ilharco et al., ICLR 2023, arXiv 2212.04089).

τ_t = θ_t − θ_0;   θ = θ_0 + λ Σ_t w_t τ_t

λ = ``scaling`` (default 0.3, the value AdaMerging and FusionBench fix; the paper picks it on
validation data). Weight averaging is the special case λ = 1/T with unit weights.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field
from torch import Tensor

from operators.merge.registry import MergeParams, TensorContext, register
from operators.merge.task_vectors import add_weighted_sum, normalized, stack_task_vectors


class TaskArithmeticParams(MergeParams):
    scaling: float = Field(default=0.3, ge=0.0, le=10.0, description="λ, applied to the sum of task vectors")
    normalize: bool = Field(default=False, description="divide by the sum of weights (mergekit's normalize)")


@register(
    "task_arithmetic",
    params=TaskArithmeticParams,
    needs_base=True,
    paper="https://arxiv.org/abs/2212.04089",
    formula="θ = θ_0 + λ Σ w_t (θ_t − θ_0)",
    allow_negative_weights=True,  # negation (forgetting a task) is part of the method
    chunkable=True,
)
def task_arithmetic(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: TaskArithmeticParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """Add the scaled, weighted sum of task vectors to the base.

    Args:
        base: The base tensor θ_0.
        experts: The experts' tensors θ_t.
        weights: One weight per expert.
        params: ``scaling`` is λ; ``normalize`` divides by Σ_t w_t.

    Returns:
        θ_0 + λ Σ_t w_t τ_t (float32).
    """
    assert base is not None  # the engine guarantees it for needs_base methods
    if params.normalize:
        weights = normalized(weights)
    return add_weighted_sum(base, stack_task_vectors(base, experts), weights, params.scaling)
