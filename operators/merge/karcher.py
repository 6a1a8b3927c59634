"""Karcher mean: the Riemannian (Fréchet) mean of several models on the hypersphere (Karcher 1977;
mergekit's ``karcher``).

Each tensor of each model is split into its norm r_t and direction u_t = x_t / r_t (whole tensor,
flattened). The mean direction m minimises Σ_t α_t d(m, u_t)², d the angle; from m = the normalized
weighted mean of the u_t, up to ``max_iter`` steps of

    g = Σ_t α_t θ_t / sin θ_t · (u_t − cos θ_t m),   θ_t = arccos⟨m, u_t⟩     (terms with θ_t < tol skipped)
    m ← cos ‖g‖ m + sin ‖g‖ g / ‖g‖,  renormalized                            (stop when ‖g‖ < tol)

and x = (Σ_t α_t r_t) · m, with α_t the weights (normalized; mergekit's are equal). Inputs with a norm
at or below ``tol`` take no part in the direction; all of them so: zeros. The models themselves are
averaged (mergekit counts a ``base_model`` as one more input; so does ``mergeflow merge``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from operators.merge.registry import MergeParams, TensorContext, register
from operators.merge.task_vectors import dot64, gram64


class KarcherParams(MergeParams):
    max_iter: int = Field(default=10, ge=1, le=10_000, description="most gradient steps on the sphere")
    tol: float = Field(default=1e-5, gt=0.0, le=1e-1, description="stops when the tangent's norm is below it")


def karcher_mean(xs: Sequence[Tensor], alphas: Sequence[float], max_iter: int, tol: float) -> Tensor:
    """The Karcher mean direction of the flattened ``xs`` times their weighted mean norm (float32).

    The mean stays in the span of the unit vectors u_t at every step (it starts as their combination and
    each step adds a combination of them), so the iteration runs on its coefficients c (m = Σ c_t u_t)
    with the units' Gram matrix (T × T; the steps in float64): the same steps as mergekit's over whole tensors, each
    a few T × T products instead of passes over the tensors.
    """
    xs = [x.float() for x in xs]
    norms = [dot64(x, x) ** 0.5 for x in xs]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(xs[0])
    total = sum(alphas[i] for i in valid)
    a = torch.tensor([alphas[i] / total for i in valid], dtype=torch.float64)
    units = torch.stack([xs[i].flatten() / norms[i] for i in valid])
    gram = gram64(list(units))

    def norm(c: Tensor) -> float:
        return float(c @ gram @ c) ** 0.5

    c = a.clone()
    if norm(c) < tol:
        c = torch.zeros_like(a)
        c[0] = 1.0
    else:
        c = c / norm(c)
    for _ in range(max_iter):
        dots = (gram @ c).clamp(-1.0, 1.0)
        theta = torch.arccos(dots)
        w = torch.where(theta < tol, torch.zeros_like(theta), a * theta / torch.sin(theta))
        tangent = w - (w * dots).sum() * c  # Σ_t w_t (u_t − ⟨m, u_t⟩ m), as coefficients
        tnorm = norm(tangent)
        if tnorm < tol:
            break
        c = math.cos(tnorm) * c + math.sin(tnorm) * tangent / tnorm
        unorm = norm(c)
        if unorm > tol:
            c = c / unorm
    scale = sum(al * n for al, n in zip(alphas, norms, strict=True))
    return (scale * (c.float() @ units)).view(xs[0].shape)


@register(
    "karcher",
    params=KarcherParams,
    needs_base=False,
    paper="https://doi.org/10.1002/cpa.3160300502",
    formula="m = argmin Σ α_t arccos⟨m, u_t⟩² on the sphere (Riemannian gradient steps); θ = Σ α_t ‖θ_t‖ · m",
)
def karcher(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: KarcherParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """The Karcher mean of one tensor's models (see the module docstring).

    Returns:
        The merged tensor (float32).
    """
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"weights: {list(weights)} sum to {total}; karcher averages with the weights as shares "
                         "(give positive weights, or leave them out: equal shares)")
    alphas = [w / total for w in weights]
    return karcher_mean([e.float() for e in experts], alphas, params.max_iter, params.tol)


__all__ = ["karcher", "karcher_mean"]
