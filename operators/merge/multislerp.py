"""Multi-SLERP: a weighted average of several models on the hypersphere (mergekit's ``multislerp``).

Each tensor (of the task vectors with ``relative_to_base``, else of the models) is flattened to a vector
x_t; with weights w_t (normalized to sum 1 with ``normalize_weights``):

    u_t = x_t / (‖x_t‖ + ε);   m = Σ w_t u_t / ‖Σ w_t u_t‖           (the weighted mean direction)
    g = Σ w_t (u_t − ⟨u_t, m⟩ m);   ‖g‖' = ‖g‖ + ε                     (the mean tangent at m)
    x = (m cos ‖g‖' + g sin ‖g‖' / ‖g‖') · Σ w_t ‖x_t‖                  (one step along the sphere)

and θ = θ_0 + x (or x). When the weighted unit vectors cancel (‖Σ w_t u_t‖ < ε) two inputs fall back to
their weighted sum; more are refused, naming the tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from operators.merge.registry import MergeParams, TensorContext, register


class MultislerpParams(MergeParams):
    normalize_weights: bool = Field(default=True, description="divide the weights by their sum")
    eps: float = Field(default=1e-8, gt=0.0, le=1e-2, description="ε, guarding the divisions")
    relative_to_base: bool = Field(default=True, description="average the task vectors (θ_t − θ_0), not the models")


def multislerp_vectors(x: Tensor, weights: Tensor, eps: float, key: str = "") -> Tensor:
    """The spherical weighted mean of the rows of ``x`` (T × n), scaled by the weighted mean norm."""
    norms = torch.norm(x, dim=-1, keepdim=True)
    units = x / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if x.shape[0] == 2:
            return x[0] * weights[0] + x[1] * weights[1]
        raise ValueError(f"{key or 'a tensor'}: the weighted unit vectors of the inputs cancel out; multislerp "
                         "has no direction to go (change the weights)")
    mean = mean / mean_norm
    tangent = ((units - (units * mean).sum(-1, keepdim=True) * mean) * weights.view(-1, 1)).sum(0)
    tnorm = torch.norm(tangent) + eps
    out = mean * torch.cos(tnorm) + tangent * (torch.sin(tnorm) / tnorm)
    return out * (norms.squeeze(-1) * weights).sum()


@register(
    "multislerp",
    params=MultislerpParams,
    needs_base=True,
    paper="https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/multislerp.py",
    formula="m = normalized Σ w_t u_t; one geodesic step along the mean tangent; × Σ w_t ‖x_t‖; θ = θ_0 + x",
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
    w = torch.tensor(list(weights), dtype=torch.float32)
    if params.normalize_weights:
        if abs(float(w.sum())) < 1e-8:
            raise ValueError(f"weights: {list(weights)} sum to 0, so normalize_weights cannot divide by their sum "
                             "(give weights with a non-zero sum, or set normalize_weights: false)")
        w = w / w.sum()
    out = multislerp_vectors(x, w, params.eps, ctx.key if ctx else "").view(base.shape)
    return b + out if params.relative_to_base else out


__all__ = ["multislerp", "multislerp_vectors"]
