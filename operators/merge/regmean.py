"""RegMean: regression mean (Jin et al., ICLR 2023, arXiv 2212.09849).

For every linear layer y = W x, the merged W* minimises Σ_i ‖W* X_iᵀ − W_i X_iᵀ‖², whose closed
form over the experts' input Gram matrices G_i = X_iᵀ X_i is

    W*ᵀ = (Σ_i w_i G̃_i)⁻¹ Σ_i w_i G̃_i W_iᵀ,     G̃_i = α G_i + (1 − α) diag(G_i)

(α shrinks the off-diagonal entries; α = 1 is plain RegMean, α = 0 a per-input-feature weighted
mean). Every other parameter (embeddings, LayerNorms, biases) is the weighted mean of the experts.
The Gram matrices come from ``operators.learn.statistics`` (``gram``: N = ``examples`` training inputs
per task, computed beside each expert). Defaults: α = 0.95, N = 256 (FusionBench's RegMean
defaults; MergeLM searches α ∈ {0.7, 0.8, 0.9, 1.0}).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from operators.merge.registry import MergeParams, TensorContext, register
from operators.merge.statistics import open_statistics


class RegMeanParams(MergeParams):
    alpha: float = Field(default=0.95, ge=0.0, le=1.0, description="α: off-diagonal Gram entries are scaled by α")
    examples: int = Field(default=256, ge=1, le=100_000, description="N: training inputs per task for the Grams")
    statistics: dict[str, str] | None = Field(
        default=None, description="expert name → directory of its gram statistics (filled in by the pipeline)")


def shrink(gram: Tensor, alpha: float) -> Tensor:
    """G̃ = α G + (1 − α) diag(G)."""
    g = gram.float()
    return alpha * g + (1.0 - alpha) * torch.diag(torch.diagonal(g))


def regmean_linear(weights_in: Sequence[Tensor], grams: Sequence[Tensor], coefficients: Sequence[float],
                   alpha: float) -> Tensor:
    """Merge one linear layer's weight matrices (``[out, in]``, as ``torch.nn.Linear`` stores them).

    Args:
        weights_in: Each expert's W_i, ``[out, in]``.
        grams: Each expert's input Gram matrix G_i, ``[in, in]``.
        coefficients: w_i per expert.
        alpha: Off-diagonal shrinkage α.

    Returns:
        W* = ((Σ w_i G̃_i)⁻¹ Σ w_i G̃_i W_iᵀ)ᵀ, float32.
    """
    gs = [c * shrink(g, alpha).double() for g, c in zip(grams, coefficients, strict=True)]
    lhs = torch.stack(gs).sum(0)
    rhs = torch.stack([g @ w.double().T for g, w in zip(gs, weights_in, strict=True)]).sum(0)
    try:
        sol = torch.linalg.solve(lhs, rhs)
    except RuntimeError:  # a singular Σ G̃ (an input feature never active): least squares
        sol = torch.linalg.lstsq(lhs, rhs).solution
    return sol.T.float().contiguous()


def weighted_mean(experts: Sequence[Tensor], coefficients: Sequence[float]) -> Tensor:
    w = torch.tensor(list(coefficients), dtype=torch.float32)
    return torch.tensordot(w, torch.stack([e.float() for e in experts]), dims=1) / float(w.sum())


def _prepare(stream, params: RegMeanParams, names: Sequence[str]):
    return _open_all(params.statistics, names, "gram", "regmean", open_statistics)


def _open_all(given: dict[str, str] | None, names: Sequence[str], kind: str, method: str, opener) -> dict:
    missing = [n for n in names if not (given or {}).get(n)]
    if missing:
        raise ValueError(f"params.statistics: {method} needs the {kind} statistics of every expert; none for "
                         f"{missing} (run the merge through a workflow, which computes them beside each expert, or "
                         "give {expert: statistics directory})")
    return {n: opener(given[n], kind, who=n) for n in names}


@register(
    "regmean",
    params=RegMeanParams,
    needs_base=False,
    paper="https://arxiv.org/abs/2212.09849",
    formula="θ* = (Σ w_i G̃_i)⁻¹ Σ w_i G̃_i θ_i per linear layer (G̃: shrunk input Grams); weighted mean elsewhere",
    prepare=_prepare,
    statistics="gram",
)
def regmean(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: RegMeanParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """RegMean-merge one tensor: closed form for linear weights with Grams, weighted mean otherwise.

    Args:
        base: Unused.
        experts: One tensor per expert.
        weights: One weight per expert.
        params: ``alpha``, the off-diagonal shrinkage.
        ctx: ``ctx.stats`` maps each expert name to its statistics (anything with ``get(key)``).

    Returns:
        The merged tensor (float32).
    """
    stats = ctx.stats if ctx is not None else None
    if stats and experts[0].dim() == 2:
        grams = [stats[n].get(ctx.key) for n in ctx.experts]
        if all(g is not None for g in grams):
            n_in = experts[0].shape[1]
            for n, g in zip(ctx.experts, grams, strict=True):
                if tuple(g.shape) != (n_in, n_in):
                    raise ValueError(f"expert {n!r}: the Gram matrix of {ctx.key!r} is {list(g.shape)} but the layer "
                                     f"has {n_in} inputs; the statistics were computed on another base: recompute them")
            return regmean_linear(experts, grams, weights, params.alpha)
        if any(g is not None for g in grams):
            lacking = [n for n, g in zip(ctx.experts, grams, strict=True) if g is None]
            raise ValueError(f"experts {lacking}: no Gram matrix for {ctx.key!r}, which others have; the statistics "
                             "were computed on another architecture: recompute them")
    return weighted_mean(experts, weights)
