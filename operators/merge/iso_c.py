"""Iso-C: isotropic merging in the common subspace (Marczak et al., ICML 2025, arXiv 2502.04959).

Task arithmetic's sum of task vectors has a skewed spectrum: a few directions, shared by the tasks that
agree most, dominate it and the others are drowned. Iso-C, for each weight matrix, keeps the sum's
singular directions and makes its spectrum flat:

    Δ = Σ_t w_t τ_t = U Σ Vᵀ;   σ̄ = mean of the singular values (all min(d_out, d_in) of them);
    θ = θ_0 + α · σ̄ U Vᵀ

Tensors that are not matrices (biases, norms) take the mean of the task vectors, θ_0 + α · mean_t τ_t, as
the authors' code does. α (``scaling``) is 1.0 by default; the paper chooses it on validation data (about
1.0-1.5 for eight ViT tasks). The SVD runs in float32; a tensor no expert changed is the base's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from operators.merge.registry import MergeParams, TensorContext, register
from operators.merge.task_vectors import per_matrix


class IsoCParams(MergeParams):
    scaling: float = Field(default=1.0, ge=0.0, le=10.0, description="α, applied to the isotropic update")


def isotropic(delta: Tensor) -> Tensor:
    """``σ̄ U Vᵀ`` of ``delta = U Σ Vᵀ``: the same singular directions, every singular value their mean."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return s.mean() * (u @ vh)


@register(
    "iso_c",
    params=IsoCParams,
    needs_base=True,
    paper="https://arxiv.org/abs/2502.04959",
    formula="per matrix: Σ_t w_t τ_t = U Σ Vᵀ;  θ = θ_0 + α σ̄ U Vᵀ (σ̄: the mean singular value)",
)
def iso_c(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: IsoCParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """Iso-C-merge one tensor (see the module docstring).

    Args:
        base: θ_0's tensor.
        experts: The experts' tensors.
        weights: Per-expert weights on the task vectors.
        params: α (``scaling``).
        ctx: unused.

    Returns:
        The merged tensor (float32).
    """
    assert base is not None
    w = torch.tensor(list(weights), dtype=torch.float32)
    return per_matrix(base, experts, weights, params.scaling,
                      lambda tv, scaling: scaling * isotropic(torch.tensordot(w, tv, dims=1)))
