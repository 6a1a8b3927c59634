"""Multi-SLERP: a weighted average of several models on the hypersphere (mergekit's ``multislerp``).

Each tensor (of the task vectors with ``relative_to_base``, else of the models) is flattened to a vector
x_t; with weights w_t (normalized to sum 1 with ``normalize_weights``):

    u_t = x_t / (‖x_t‖ + ε);   m = Σ w_t u_t / ‖Σ w_t u_t‖           (the weighted mean direction)
    g = Σ w_t (u_t − ⟨u_t, m⟩ m);   ‖g‖' = ‖g‖ + ε                     (the mean tangent at m)
    x = (m cos ‖g‖' + g sin ‖g‖' / ‖g‖') · Σ w_t ‖x_t‖                  (one step along the sphere)

and θ = θ_0 + x (or x). Every vector here is a combination of the inputs, so the steps run on their Gram
matrix and the result is Σ_t k_t x_t: a large tensor is merged in row blocks after one pass that forms the
Gram matrix two task vectors at a time (the same result as mergekit's, within float rounding). The
tangent of the normalized mean vanishes (Σ w_t u_t is parallel to m), so the step leaves m in place up
to rounding: the result is the normalized weighted mean direction times the mean norm, mergekit's
definition kept as it is. When the weighted unit vectors cancel (‖Σ w_t u_t‖ < ε) two inputs fall back to
their weighted sum; more are refused, naming the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from operators.merge.registry import MergeParams, TensorContext, register
from operators.merge.task_vectors import dot64, gram64


class MultislerpParams(MergeParams):
    normalize_weights: bool = Field(default=True, description="divide the weights by their sum")
    eps: float = Field(default=1e-8, gt=0.0, le=1e-2, description="ε, guarding the divisions")
    relative_to_base: bool = Field(default=True, description="average the task vectors (θ_t − θ_0), not the models")


def gram_stats(task_vector, params: MultislerpParams, names: Sequence[str], key: str = "") -> Tensor | None:
    """The task vectors' Gram matrix over one whole tensor (T × T, float64), two task vectors at a time, so a
    large tensor can then be merged in row blocks."""
    if not params.relative_to_base:
        return None
    n = len(names)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        ti = task_vector(i)
        gram[i, i] = dot64(ti, ti)
        for j in range(i + 1, n):
            gram[i, j] = gram[j, i] = dot64(ti, task_vector(j))
    return gram


def coefficients(gram: Tensor, weights: Tensor, eps: float, key: str = "") -> Tensor:
    """Each input's coefficient in the result, Σ_t k_t x_t: the steps of the module docstring on the inputs'
    Gram matrix (every vector involved is a combination of the inputs)."""
    w = weights.double()
    d = gram.diagonal().clamp(min=0).sqrt() + eps  # ‖x_t‖ + ε
    g_u = gram / (d[:, None] * d[None, :])  # the unit vectors' Gram matrix
    mean_norm = float(w @ g_u @ w) ** 0.5
    if mean_norm < eps:
        if len(w) == 2:
            return w
        raise ValueError(f"{key or 'a tensor'}: the weighted unit vectors of the inputs cancel out; multislerp "
                         "has no direction to go (change the weights)")
    c = w / mean_norm  # m = Σ c_t u_t
    tangent = w - float(w @ (g_u @ c)) * c  # Σ w_t (u_t − ⟨u_t, m⟩ m)
    tnorm = float(tangent @ g_u @ tangent) ** 0.5 + eps
    unit = c * math.cos(tnorm) + tangent * (math.sin(tnorm) / tnorm)
    return unit * float(w @ (d - eps)) / d


@register(
    "multislerp",
    params=MultislerpParams,
    needs_base=True,
    paper="https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/multislerp.py",
    formula="m = normalized Σ w_t u_t; one geodesic step along the mean tangent; × Σ w_t ‖x_t‖; θ = θ_0 + x",
    chunkable=lambda p: p.relative_to_base,
    tensor_stats=gram_stats,
)
def multislerp(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: MultislerpParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """Multi-SLERP one tensor (see the module docstring).

    Returns:
        The merged tensor (float32).
    """
    assert base is not None
    b = base.float()
    if len(experts) == 1:
        return experts[0].float()
    x = torch.stack([e.float() - b if params.relative_to_base else e.float() for e in experts]).reshape(len(experts), -1)
    w = torch.tensor(list(weights), dtype=torch.float64)
    if params.normalize_weights:
        if abs(float(w.sum())) < 1e-8:
            raise ValueError(f"weights: {list(weights)} sum to 0, so normalize_weights cannot divide by their sum "
                             "(give weights with a non-zero sum, or set normalize_weights: false)")
        w = w / w.sum()
    gram = ctx.local if ctx is not None and ctx.local is not None else gram64(list(x))  # whole, or a block's
    out = torch.tensordot(coefficients(gram, w, params.eps, ctx.key if ctx else "").float(), x, dims=1).view(base.shape)
    return b + out if params.relative_to_base else out


__all__ = ["coefficients", "gram_stats", "multislerp"]
