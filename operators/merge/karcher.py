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

The mean stays in the span of the unit vectors, so everything runs on the models' Gram matrix (T × T) and
the result is Σ_t k_t x_t: a large tensor is merged in row blocks after one pass that forms the Gram matrix
two models at a time.
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


def model_gram(task_vector, params: KarcherParams, names: Sequence[str], key: str = "") -> Tensor:
    """The models' Gram matrix over one whole tensor (T × T, float64), two models at a time, so that a large
    tensor can then be merged in row blocks."""
    n = len(names)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        xi = task_vector.model(i)
        gram[i, i] = dot64(xi, xi)
        for j in range(i + 1, n):
            gram[i, j] = gram[j, i] = dot64(xi, task_vector.model(j))
    return gram


def karcher_coefficients(gram: Tensor, alphas: Sequence[float], max_iter: int, tol: float) -> Tensor:
    """k with the Karcher mean direction times the weighted mean norm = Σ_t k_t x_t, from the models' Gram matrix.

    The mean stays in the span of the unit vectors u_t at every step (it starts as their combination and
    each step adds a combination of them), so the iteration runs on its coefficients c (m = Σ c_t u_t)
    with the units' Gram matrix (T × T; the steps in float64): the same steps as mergekit's over whole tensors, each
    a few T × T products instead of passes over the tensors.
    """
    norms = [float(v) for v in gram.diagonal().clamp(min=0).sqrt()]
    valid = [i for i, n in enumerate(norms) if n > tol]
    k = torch.zeros(len(norms), dtype=torch.float64)
    if not valid:
        return k
    total = sum(alphas[i] for i in valid)
    a = torch.tensor([alphas[i] / total for i in valid], dtype=torch.float64)
    nv = torch.tensor([norms[i] for i in valid], dtype=torch.float64)
    gram = gram[valid][:, valid] / (nv[:, None] * nv[None, :])  # the unit vectors' Gram matrix

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
    k[valid] = scale * c / nv
    return k


def karcher_mean(xs: Sequence[Tensor], alphas: Sequence[float], max_iter: int, tol: float,
                 gram: Tensor | None = None) -> Tensor:
    """The Karcher mean direction of the flattened ``xs`` times their weighted mean norm (float32); ``gram``: the
    models' Gram matrix over the whole tensors when ``xs`` are row blocks of them."""
    x = torch.stack([t.float().reshape(-1) for t in xs])
    k = karcher_coefficients(gram if gram is not None else gram64(list(x)), alphas, max_iter, tol)
    return torch.tensordot(k.float(), x, dims=1).view(xs[0].shape)


@register(
    "karcher",
    params=KarcherParams,
    needs_base=False,
    paper="https://doi.org/10.1002/cpa.3160300502",
    formula="m = argmin Σ α_t arccos⟨m, u_t⟩² on the sphere (Riemannian gradient steps); θ = Σ α_t ‖θ_t‖ · m",
    chunkable=True,
    tensor_stats=model_gram,
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
    gram = ctx.local if ctx is not None and ctx.local is not None else None  # whole tensors, or a block's
    return karcher_mean([e.float() for e in experts], alphas, params.max_iter, params.tol, gram)


__all__ = ["karcher", "karcher_coefficients", "karcher_mean", "model_gram"]
