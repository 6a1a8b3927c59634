"""WUDI: data-free merging guided by the task vectors themselves (Cheng et al., "Whoever Started the
Interference Should End It", ICML 2025, arXiv 2503.08099).

A linear layer's task vector τ_t (d_out × d_in) lies, the paper shows, close to the span of the inputs its
task feeds that layer, so the rows of τ_t stand in for the task's inputs. The merged update τ_m should act
on them as each expert does: the interference (τ_m − τ_t) τ_tᵀ should vanish. Per weight matrix WUDI
minimises

    L(τ_m) = Σ_t ‖(τ_m − τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F

from τ_m = Σ_t τ_t (the sum, task arithmetic at λ = 1) with Adam (lr 1e-5, 300 steps, no weight decay;
the authors' ViT settings), and θ = θ_0 + α · τ_m (α = 1 in the paper). Every other tensor (biases, norms)
takes the mean task vector, θ_0 + α · mean_t τ_t (FusionBench's treatment; the authors' ViT script leaves
them at θ_0). Per-expert ``weights`` scale each τ_t before anything else.

The loss is a quadratic: with G_t = τ_tᵀ τ_t / ‖τ_t‖² (d_in × d_in), S = Σ_t G_t and C = Σ_t τ_t G_t, its
gradient is 2 (τ_m S − C). Each Adam step here uses that gradient (one d_out × d_in × d_in product, not
T products through autograd): the same steps as the authors' code, to float rounding. ``solver: exact``
goes to the minimum instead, τ_m = C S⁺ (the pseudo-inverse, in float64): the limit the Adam steps walk
towards from the sum, which keeps nothing outside the tasks' row spaces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from operators.merge.registry import MergeParams, TensorContext, register
from operators.merge.task_vectors import per_matrix


class WudiParams(MergeParams):
    scaling: float = Field(default=1.0, ge=0.0, le=10.0, description="α, applied to the merged task vector")
    solver: Literal["adam", "exact"] = Field(
        default="adam", description="adam: the paper's gradient steps from the sum; exact: the loss's minimum")
    iterations: int = Field(default=300, ge=1, le=100_000, description="Adam steps per matrix (solver adam)")
    learning_rate: float = Field(default=1e-5, gt=0.0, le=1.0, description="Adam's learning rate (solver adam)")


def interference_terms(tv: Tensor) -> tuple[Tensor, Tensor]:
    """S = Σ_t τ_tᵀ τ_t / ‖τ_t‖² and C = Σ_t τ_t τ_tᵀ τ_t / ‖τ_t‖² (float32; a zero τ_t adds nothing)."""
    d_in = tv.shape[2]
    s = torch.zeros(d_in, d_in, dtype=torch.float32)
    c = torch.zeros(tv.shape[1:], dtype=torch.float32)
    for t in range(tv.shape[0]):
        norm2 = float(tv[t].double().square().sum())
        if norm2 == 0.0:
            continue
        g = tv[t].T @ tv[t] / norm2
        s += g
        c += tv[t] @ g
    return s, c


def wudi_loss(merged: Tensor, tv: Tensor) -> Tensor:
    """The paper's L(τ_m) = Σ_t ‖(τ_m − τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F, written out as the authors compute it."""
    norms = tv.reshape(tv.shape[0], -1).norm(dim=-1).square()
    product = (merged.unsqueeze(0) - tv) @ tv.transpose(1, 2)
    return (product.square() / norms.view(-1, 1, 1)).sum()


def solve(tv: Tensor, params: WudiParams) -> Tensor:
    """τ_m for one matrix's stacked task vectors (T × d_out × d_in)."""
    s, c = interference_terms(tv)
    if params.solver == "exact":
        return (c.double() @ torch.linalg.pinv(s.double(), hermitian=True, rtol=1e-7)).float()
    merged = torch.nn.Parameter(tv.sum(dim=0))
    opt = torch.optim.Adam([merged], lr=params.learning_rate, weight_decay=0.0)
    for _ in range(params.iterations):
        with torch.no_grad():
            merged.grad = 2.0 * (merged @ s - c)
        opt.step()
    return merged.detach()


@register(
    "wudi",
    params=WudiParams,
    needs_base=True,
    paper="https://arxiv.org/abs/2503.08099",
    formula="per matrix: τ_m = argmin Σ_t ‖(τ_m − τ_t) τ_tᵀ‖² / ‖τ_t‖² (Adam from Σ τ_t, or exactly); "
            "θ = θ_0 + α τ_m",
)
def wudi(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: WudiParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """WUDI-merge one tensor (see the module docstring).

    Args:
        base: θ_0's tensor.
        experts: The experts' tensors.
        weights: Per-expert weights on the task vectors.
        params: α (``scaling``), the solver and Adam's steps and learning rate.
        ctx: unused.

    Returns:
        The merged tensor (float32).
    """
    assert base is not None
    w = torch.tensor(list(weights), dtype=torch.float32).view(-1, 1, 1)
    return per_matrix(base, experts, weights, params.scaling, lambda tv, scaling: scaling * solve(w * tv, params))
