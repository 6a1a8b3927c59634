"""Fisher merging (Matena & Raffel, NeurIPS 2022, arXiv 2111.09832).

    θ* = Σ_i w_i F̃_i ⊙ θ_i / Σ_i w_i F̃_i,     F̃_i = F_i / ‖F_i‖₂ + ε   (normalize, the default)
                                               F̃_i = F_i + ε           (normalize: false)

F_i is expert i's diagonal Fisher (``operators.learn.statistics``, ``fisher``: N = ``examples``
training inputs of its task, labels drawn from the expert's own predictions), computed beside
the expert. Defaults follow FusionBench: N = 256, each model's Fisher L2-normalised over the whole
model (Fisher magnitudes differ between tasks by orders of magnitude), floor ε = 1e-6. With equal
Fishers the merge is the weighted mean; one expert gives that expert back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from operators.merge.registry import MergeParams, TensorContext, register
from operators.merge.regmean import _open_all
from operators.merge.statistics import open_statistics


class FisherParams(MergeParams):
    examples: int = Field(default=256, ge=1, le=100_000, description="N: training inputs per task for the Fisher")
    normalize: bool = Field(default=True, description="divide each model's Fisher by its whole-model L2 norm")
    floor: float = Field(default=1e-6, ge=0.0, le=1.0, description="ε added to every Fisher entry")
    statistics: dict[str, str] | None = Field(
        default=None, description="expert name → directory of its fisher statistics (filled in by the pipeline)")


def fisher_weighted(experts: Sequence[Tensor], fishers: Sequence[Tensor], coefficients: Sequence[float],
                    floor: float = 1e-6) -> Tensor:
    """θ* = Σ w_i (F_i + ε) θ_i / Σ w_i (F_i + ε), element-wise (float32).

    Args:
        experts: θ_i per expert.
        fishers: F_i per expert (same shapes; already normalised if wanted).
        coefficients: w_i per expert.
        floor: ε, so entries no expert has Fisher mass on get the weighted mean.
    """
    num = torch.zeros_like(experts[0], dtype=torch.float32)
    den = torch.zeros_like(num)
    for theta, f, c in zip(experts, fishers, coefficients, strict=True):
        wf = c * (f.float() + floor)
        num.add_(wf * theta.float())
        den.add_(wf)
    return num / den


def _prepare(stream, params: FisherParams, names: Sequence[str]):
    return _open_all(params.statistics, names, "fisher", "fisher", open_statistics)


@register(
    "fisher",
    params=FisherParams,
    needs_base=False,
    paper="https://arxiv.org/abs/2111.09832",
    formula="θ = Σ w_i F_i θ_i / Σ w_i F_i (diagonal Fisher)",
    prepare=_prepare,
    statistics="fisher",
)
def fisher(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: FisherParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """Fisher-merge one tensor.

    Args:
        base: Unused.
        experts: One tensor per expert.
        weights: One weight per expert.
        params: ``normalize`` and ``floor``.
        ctx: ``ctx.stats`` maps each expert name to its Fisher statistics (``get(key)``, ``l2_norm``).

    Returns:
        The merged tensor (float32).
    """
    if ctx is None or not ctx.stats:
        raise ValueError("params.statistics: fisher needs each expert's Fisher statistics")
    fishers = []
    for n, theta in zip(ctx.experts, experts, strict=True):
        st = ctx.stats[n]
        f = st.get(ctx.key)
        if f is None:
            raise ValueError(f"expert {n!r}: its Fisher statistics have no {ctx.key!r}; they were computed on another "
                             "architecture: recompute them")
        if f.shape != theta.shape:
            raise ValueError(f"expert {n!r}: the Fisher of {ctx.key!r} is {list(f.shape)} but the tensor is "
                             f"{list(theta.shape)}; the statistics were computed on another base: recompute them")
        if params.normalize:
            f = f / max(st.l2_norm, 1e-30)
        fishers.append(f)
    return fisher_weighted(experts, fishers, weights, params.floor)
