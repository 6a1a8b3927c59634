"""Linear merge / uniform model soup (Wortsman et al., ICML 2022, arXiv 2203.05482).

θ = Σ_t w_t θ_t / Σ_t w_t   (normalize=True, the default; uniform weights give the uniform soup)
θ = Σ_t w_t θ_t              (normalize=False)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import field_validator
from torch import Tensor

from operators.merge.registry import MergeParams, TensorContext, register


class LinearParams(MergeParams):
    normalize: bool = True

    @field_validator("weights")
    @classmethod
    def _not_all_zero(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None and v and all(w == 0 for w in v.values()):
            raise ValueError("all weights are zero; at least one expert needs a non-zero weight")
        return v


@register(
    "linear",
    params=LinearParams,
    needs_base=False,
    paper="https://arxiv.org/abs/2203.05482",
    formula="θ = Σ w_t θ_t / Σ w_t",
    chunkable=True,
)
def linear(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: LinearParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """Weighted average of the experts' tensors.

    Args:
        base: Unused (linear merging does not need the base).
        experts: One tensor per expert, same shape.
        weights: One weight per expert.
        params: ``normalize`` divides by the sum of weights.

    Returns:
        The merged tensor (float32).
    """
    w = torch.tensor(list(weights), dtype=torch.float32)
    stacked = torch.stack([e.float() for e in experts])
    out = torch.tensordot(w, stacked, dims=1)
    if params.normalize:
        total = float(w.sum())
        if total == 0:
            raise ValueError("linear merge: the weights sum to zero; cannot normalize")
        out = out / total
    return out
