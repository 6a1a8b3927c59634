"""Iso-CTS: isotropic merging with common and task-specific subspaces (Marczak et al., ICML 2025,
arXiv 2502.04959).

Iso-C (``iso_c``) keeps the directions of the summed task vectors; a task whose update lies outside the
sum's dominant directions is still drowned. Iso-CTS, for each weight matrix (rank r = min(d_out, d_in)),
gives each task a subspace of its own beside the common one:

1. common subspace: the top ``k`` left/right singular vectors of Δ = Σ_t w_t τ_t, with k about
   ``common_fraction`` · r, adjusted so that the r − k directions left divide equally among the T tasks;
2. task-specific subspaces: each task's update with the common subspace projected out,
   τ_t − U_k U_kᵀ τ_t, keeps its top (r − k)/T singular triplets;
3. the common and task-specific triplets side by side, U and V decorrelated to their polar factors
   (as TSV-M does), and every singular value replaced by their mean σ̄ (as Iso-C does);
4. θ = θ_0 + α · U⊥ σ̄ V⊥ᵀ.

Tensors that are not matrices (biases, norms) take the mean of the task vectors. ``common_fraction`` is
0.8 and α 1.0 by default (the paper tunes α on validation data). The SVDs run in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from operators.merge.registry import MergeParams, TensorContext, register
from operators.merge.task_vectors import per_matrix
from operators.merge.tsv_m import polar


class IsoCtsParams(MergeParams):
    scaling: float = Field(default=1.0, ge=0.0, le=10.0, description="α, applied to the isotropic update")
    common_fraction: float = Field(default=0.8, ge=0.0, le=1.0,
                                   description="share of each matrix's rank given to the common subspace")


def subspace_sizes(rank: int, n_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(common k, per-task n): k ≈ common_fraction · rank, the rest split equally, k + n_tasks · n = rank when
    it divides (the common subspace takes what is left over)."""
    k = int(rank * common_fraction)
    per_task = round((rank - k) / n_tasks)
    per_task = min(per_task, rank // n_tasks)
    return rank - per_task * n_tasks, per_task


def common_and_specific(tv: Tensor, weights: Sequence[float], common_fraction: float) -> tuple[Tensor, Tensor, Tensor]:
    """U (d_out × r), σ (r) and Vᵀ (r × d_in): the common triplets of Σ w_t τ_t, then each task's own."""
    n_tasks, d_out, d_in = tv.shape
    k, n = subspace_sizes(min(d_out, d_in), n_tasks, common_fraction)
    w = torch.tensor(list(weights), dtype=torch.float32)
    u, s, vh = torch.linalg.svd(torch.tensordot(w, tv, dims=1), full_matrices=False)
    us, ss, vhs = [u[:, :k]], [s[:k]], [vh[:k]]
    if n:
        common = u[:, :k]
        for t in range(n_tasks):
            own = weights[t] * tv[t]
            ut, st, vht = torch.linalg.svd(own - common @ (common.T @ own), full_matrices=False)
            us.append(ut[:, :n])
            ss.append(st[:n])
            vhs.append(vht[:n])
    return torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)


@register(
    "iso_cts",
    params=IsoCtsParams,
    needs_base=True,
    paper="https://arxiv.org/abs/2502.04959",
    formula="per matrix: Σ w_t τ_t's top-k triplets (common) + each τ_t's top (r−k)/T outside them; U, V "
            "orthogonalized (polar); θ = θ_0 + α σ̄ U⊥ V⊥ᵀ",
)
def iso_cts(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: IsoCtsParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """Iso-CTS-merge one tensor (see the module docstring).

    Args:
        base: θ_0's tensor.
        experts: The experts' tensors.
        weights: Per-expert weights on the task vectors.
        params: α (``scaling``) and ``common_fraction``.
        ctx: unused.

    Returns:
        The merged tensor (float32).
    """
    assert base is not None

    def update(tv: Tensor, scaling: float) -> Tensor:
        u, s, vh = common_and_specific(tv, weights, params.common_fraction)
        return scaling * s.mean() * (polar(u) @ polar(vh.T).T)

    return per_matrix(base, experts, weights, params.scaling, update)
