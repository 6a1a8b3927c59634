"""CART: centered arithmetic with rank reduction (Choi et al., "Revisiting Weight Averaging for Model
Merging", arXiv 2412.12153).

Task arithmetic measures each fine-tune from the pretrained weights θ_0. CART measures it from the
experts' average instead: the centred task vectors C_t = θ_t − θ̄ are low-rank in effect, and what the
tasks do not share lives in their top singular directions. For each weight matrix (d_out × d_in):

    θ̄   = θ_0 + Σ_t p_t τ_t                    (p_t = w_t / Σ w: the plain average with equal weights)
    C_t = θ_t − θ̄ = τ_t − Σ_s p_s τ_s
    θ   = θ̄ + λ · Σ_t (T p_t) · SVD_k(C_t),     k = max(1, ⌊rank_ratio · min(d_out, d_in)⌋)

where SVD_k keeps the top k singular triplets. Every other tensor (biases, norms) is θ̄: the centred
vectors of a tensor, untruncated, sum to zero. Defaults are the authors' for eight ViT-B/32 tasks
(``rank_ratio`` 0.12, λ = 2.0; they use λ 1.5 for 14 tasks, 1.9 for 20); choose λ on validation data
where you have it. The authors' code truncates the attention and MLP matrices of open_clip (whose query,
key and value form one fused matrix) and leaves the embeddings at θ̄; here every matrix is truncated,
each of query, key and value on its own, as TSV-M and Iso-C do. The SVDs run in float32; a tensor no
expert changed is the base's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from operators.merge.registry import MergeParams, TensorContext, register
from operators.merge.task_vectors import normalized, per_matrix


class CartParams(MergeParams):
    scaling: float = Field(default=2.0, ge=0.0, le=10.0,
                           description="λ, applied to the sum of the centred low-rank task vectors")
    rank_ratio: float = Field(default=0.12, gt=0.0, le=1.0,
                              description="share of each matrix's rank kept of each centred task vector")


def low_rank(m: Tensor, k: int) -> Tensor:
    """``m``'s best rank-``k`` approximation: its top ``k`` singular triplets, ``U_k Σ_k V_kᵀ``."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


@register(
    "cart",
    params=CartParams,
    needs_base=True,
    paper="https://arxiv.org/abs/2412.12153",
    formula="per matrix: θ̄ = θ_0 + mean_t τ_t;  θ = θ̄ + λ Σ_t SVD_k(θ_t − θ̄), k = ⌊rank_ratio · rank⌋; "
            "θ̄ elsewhere",
)
def cart(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: CartParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """CART-merge one tensor (see the module docstring).

    Args:
        base: θ_0's tensor.
        experts: The experts' tensors.
        weights: Per-expert weights: the average θ̄ is weighted by them (normalized), and so is each
            centred vector's share of the correction (equal weights: the paper's plain mean and sum).
        params: λ (``scaling``) and ``rank_ratio``.
        ctx: unused.

    Returns:
        The merged tensor (float32).
    """
    assert base is not None
    p = torch.tensor(normalized(list(weights)), dtype=torch.float32)
    n = len(experts)

    def update(tv: Tensor, _: float) -> Tensor:
        mean = torch.tensordot(p, tv, dims=1)
        k = max(1, int(params.rank_ratio * min(tv.shape[1:])))
        correction = sum(float(n * p[t]) * low_rank(tv[t] - mean, k) for t in range(n))
        return mean + params.scaling * correction

    # off matrices per_matrix adds α · Σ_t w'_t τ_t / T; with w'_t = T p_t and α = 1 that is θ̄
    return per_matrix(base, experts, [n * float(x) for x in p], 1.0, update)
