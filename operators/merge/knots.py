"""KnOTS (Stoica et al., ICLR 2025, arXiv 2410.19735): align the experts' updates in one SVD basis, then TIES.

LoRA experts' updates ΔW_t = B_t A_t live in different low-rank subspaces, so merging them entry by entry
mixes unrelated directions. KnOTS, for each weight matrix (d_out × d_in):

1. concatenates the task vectors side by side and takes one SVD:  [τ_1 … τ_T] = U Σ [V_1ᵀ … V_Tᵀ]
   (in float64; singular values ≤ ``eps`` dropped: their directions carry no update);
2. represents task t by its coordinates in the shared basis, Σ V_tᵀ (k × d_in; k ≤ Σ_t rank τ_t);
3. merges those with TIES: keep each task's top-``density`` entries (1.0: all, the authors' setting),
   elect each entry's sign by the sum of values, take the mean of the agreeing entries (``merge_func``);
4. maps back: θ = θ_0 + λ · U · merged.

Per-expert ``weights`` multiply each task's coordinates before the sign election, as in TIES. Tensors
that are not matrices (biases, norms) are merged the same way without the SVD (TIES on the raw task
vectors); a tensor no expert changed is the base's. Differences from the authors' code, both small:
the top-k and the sign of a tie are taken per tensor, not over the concatenation of every layer.
For experts with full fine-tunes KnOTS applies too (the SVD is then of full-rank matrices: slower).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from operators.merge.registry import DensityParams, TensorContext, register
from operators.merge.task_vectors import (
    disjoint_merge,
    elect_sign,
    stack_task_vectors,
    topk_threshold,
    trim_by_threshold_,
    weighted,
)


class KnotsParams(DensityParams):
    density: float = Field(default=1.0, description="fraction of each task's aligned coordinates kept (TIES' trim)")
    scaling: float = Field(default=1.0, ge=0.0, le=10.0, description="λ")
    merge_func: Literal["mean", "sum"] = Field(default="mean", description="disjoint mean (TIES) or sum")
    eps: float = Field(default=1e-5, gt=0.0, description="singular values at or below it are dropped")


def aligned(tv: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``U`` (d_out × k) and every task's coordinates ``Σ V_tᵀ`` (T × k × d_in) of ``[τ_1 … τ_T] = U Σ Vᵀ``,
    in float64, the directions of singular values ≤ ``eps`` dropped."""
    n_tasks, d_out, d_in = tv.shape
    concat = tv.to(torch.float64).permute(1, 0, 2).reshape(d_out, n_tasks * d_in)
    u, s, vh = torch.linalg.svd(concat, full_matrices=False)
    keep = s > eps
    u, s, vh = u[:, keep], s[keep], vh[keep]
    coords = (s[:, None] * vh).reshape(len(s), n_tasks, d_in).permute(1, 0, 2)
    return u, coords.contiguous()


def _ties(coords: Tensor, weights: Sequence[float], params: KnotsParams, names: Sequence[str]) -> Tensor:
    densities = params.density_for(names, len(coords))
    trimmed = trim_by_threshold_(coords, [topk_threshold(coords[t], d) for t, d in enumerate(densities)])
    trimmed = weighted(trimmed, weights)
    return disjoint_merge(trimmed, elect_sign(trimmed), params.merge_func)


@register(
    "knots",
    params=KnotsParams,
    needs_base=True,
    paper="https://arxiv.org/abs/2410.19735",
    formula="[τ_1…τ_T] = U Σ [V_1ᵀ…V_Tᵀ];  θ = θ_0 + λ · U · TIES(Σ V_tᵀ)",
)
def knots(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: KnotsParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """KnOTS-TIES-merge one tensor (see the module docstring).

    Args:
        base: θ_0's tensor.
        experts: The experts' tensors (a LoRA expert's: its base's plus B·A·scaling, as the engine folds it).
        weights: Per-expert weights on each task's aligned coordinates, before the sign election.
        params: ``density``, λ (``scaling``), ``merge_func`` and ``eps``.
        ctx: The experts' names (for per-expert ``densities``).

    Returns:
        The merged tensor (float32).
    """
    assert base is not None
    ctx = ctx or TensorContext()
    tv = stack_task_vectors(base, experts)
    if not bool(tv.any()):  # no expert changed it (a LoRA expert leaves most tensors alone)
        return base.float()
    if tv.dim() != 3:  # not a matrix: TIES on the raw task vectors
        return base.float() + params.scaling * _ties(tv, weights, params, ctx.experts)
    u, coords = aligned(tv, params.eps)
    merged = _ties(coords, weights, params, ctx.experts)
    return (base.to(torch.float64) + params.scaling * (u @ merged)).float()
