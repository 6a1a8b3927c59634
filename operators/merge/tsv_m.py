"""TSV-M: Task Singular Vectors merging (Gargiulo et al., CVPR 2025, arXiv 2412.00081).

A fine-tune's update of a weight matrix is low-rank in effect: a few singular directions carry it. Where
two tasks' directions overlap they interfere. TSV-M, for each weight matrix (d_out × d_in):

1. for each task, τ_t = U_t Σ_t V_tᵀ, keeps its top ``k = ⌊min(d_out, d_in) / T⌋`` singular triplets
   (at least one): each task gets an equal share of the layer's rank;
2. places them side by side: Û = [U_1,k … U_T,k], Σ̂ = diag(σ_1,1..k … σ_T,1..k), V̂ = [V_1,k … V_T,k];
3. decorrelates the tasks' directions: Û and V̂ are replaced by their nearest matrices with orthonormal
   columns (the orthogonal Procrustes / polar factor: Û = P S Qᵀ → U⊥ = P Qᵀ; the same for V̂);
4. θ = θ_0 + α · U⊥ Σ̂ V⊥ᵀ.

Tensors that are not matrices (biases, norms) take the mean of the task vectors, θ_0 + α · mean_t τ_t, as
the authors' code does. Per-expert ``weights`` scale each task's singular values. α (``scaling``) is 1.0,
the paper's setting without validation data. The SVDs run in float32; a tensor no expert changed is the
base's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from operators.merge.registry import MergeParams, TensorContext, register
from operators.merge.task_vectors import per_matrix


class TsvMParams(MergeParams):
    scaling: float = Field(default=1.0, ge=0.0, le=10.0, description="α, applied to the merged update")


def polar(m: Tensor) -> Tensor:
    """The matrix with orthonormal columns (rows, for a wide ``m``) nearest to ``m``: ``P Qᵀ`` of ``m = P S Qᵀ``."""
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def task_singular_vectors(tv: Tensor, weights: Sequence[float]) -> tuple[Tensor, Tensor, Tensor]:
    """Û (d_out × kT), the weighted σ̂ (kT) and V̂ᵀ (kT × d_in) of the tasks' top-k triplets, task by task."""
    n_tasks, d_out, d_in = tv.shape
    k = max(1, min(d_out, d_in) // n_tasks)
    us, ss, vhs = [], [], []
    for t in range(n_tasks):
        u, s, vh = torch.linalg.svd(tv[t], full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k] * weights[t])
        vhs.append(vh[:k])
    return torch.cat(us, dim=1), torch.cat(ss), torch.cat(vhs, dim=0)


@register(
    "tsv_m",
    params=TsvMParams,
    needs_base=True,
    paper="https://arxiv.org/abs/2412.00081",
    formula="per matrix: each τ_t's top ⌊rank/T⌋ singular triplets side by side, Û, V̂ orthogonalized (polar); "
            "θ = θ_0 + α U⊥ Σ̂ V⊥ᵀ",
)
def tsv_m(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: TsvMParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """TSV-M-merge one tensor (see the module docstring).

    Args:
        base: θ_0's tensor.
        experts: The experts' tensors.
        weights: Per-expert weights on each task's singular values (on its task vector, off matrices).
        params: α (``scaling``).
        ctx: unused.

    Returns:
        The merged tensor (float32).
    """
    assert base is not None

    def update(tv: Tensor, scaling: float) -> Tensor:
        u, s, vh = task_singular_vectors(tv, weights)
        return scaling * (polar(u) * s) @ polar(vh.T).T

    return per_matrix(base, experts, weights, params.scaling, update)
