"""NuSLERP: spherical interpolation of two models or of their task vectors (mergekit's ``nuslerp``).

With weights w_0, w_1 of the two experts, t = w_1 / (w_0 + w_1) (0.5 when the sum is ~0), and for
vectors v_0, v_1:

    cos Ω = ⟨v_0/‖v_0‖, v_1/‖v_1‖⟩;   v = [sin((1 − t)Ω) v_0 + sin(tΩ) v_1] / sin Ω

with (1 − t) v_0 + t v_1 where the two are colinear (1 − cos²Ω ≤ 1e-16). With ``relative_to_base``
(mergekit's, when the config has a ``base_model``) v_i are the task vectors and θ = θ_0 + v; without,
v_i are the models. ``flatten`` treats the whole tensor as one vector; otherwise each row is slerped
(the last dimension), or each column with ``row_wise`` (mergekit's naming: vectors along dimension 0).
Unlike ``slerp``, its t comes from the weights, it works on task vectors, and row by row. Flattened
task vectors are slerped through their norms and dot product, a pass over the whole tensor, so a large
tensor is merged in row blocks after it (the same result as mergekit's, within float rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from operators.merge.registry import MergeParams, TensorContext, register
from operators.merge.task_vectors import dot64


class NuslerpParams(MergeParams):
    flatten: bool = Field(default=True, description="slerp the whole tensor as one vector")
    row_wise: bool = Field(default=False, description="without flatten: slerp along dimension 0 (columns)")
    relative_to_base: bool = Field(default=True, description="slerp the task vectors (θ_t − θ_0), not the models")


def nuslerp_tensors(t: float, v0: Tensor, v1: Tensor, dim: int = -1, flatten: bool = False, eps: float = 1e-8) -> Tensor:
    """mergekit's ``nuslerp`` of two tensors (float32): per vector along ``dim``, or of the whole tensors."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)

    def unit(x: Tensor) -> Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = (unit(v0) * unit(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros(()), cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def _flat_gram(task_vector, params: NuslerpParams, names: Sequence[str], key: str = ""
               ) -> tuple[float, float, float] | None:
    """‖τ_0‖², ‖τ_1‖², ⟨τ_0, τ_1⟩ over one whole tensor (flatten), so it can be merged in row blocks."""
    if not (params.flatten and params.relative_to_base) or len(names) != 2:
        return None
    t0, t1 = task_vector(0), task_vector(1)
    return dot64(t0, t0), dot64(t1, t1), dot64(t0, t1)


def flat_coefficients(t: float, n00: float, n11: float, n01: float, eps: float = 1e-8) -> tuple[float, float]:
    """(a, b) with slerp_t(v_0, v_1) = a v_0 + b v_1 for whole flattened vectors, from their norms and dot."""
    cos = max(-1.0, min(1.0, n01 / (max(n00 ** 0.5, 1e-7) * max(n11 ** 0.5, 1e-7))))
    if 1 - cos * cos <= eps**2:
        return 1 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def _chunkable(p: NuslerpParams) -> bool:
    return (p.flatten and p.relative_to_base) or (not p.flatten and not p.row_wise)  # whole rows stay in a block


@register(
    "nuslerp",
    params=NuslerpParams,
    needs_base=True,
    paper="https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/nuslerp.py",
    formula="t = w_1 / (w_0 + w_1); θ = θ_0 + slerp_t(τ_0, τ_1) (or slerp_t(θ_0', θ_1') of the models), "
            "whole tensor or row by row",
    experts=(2, 2),
    chunkable=_chunkable,
    tensor_stats=_flat_gram,
)
def nuslerp(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: NuslerpParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """NuSLERP one tensor (see the module docstring).

    Returns:
        The merged tensor (float32).
    """
    assert base is not None
    if len(experts) != 2:
        raise ValueError(f"nuslerp interpolates exactly two experts (got {len(experts)})")
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    dim = 0 if params.row_wise else -1
    if params.relative_to_base:
        b = base.float()
        v0, v1 = experts[0].float() - b, experts[1].float() - b
        if params.flatten:  # through the norms and the dot: the same whole or in row blocks (ctx.local)
            n = ctx.local if ctx is not None and ctx.local is not None else \
                (dot64(v0, v0), dot64(v1, v1), dot64(v0, v1))
            a, c = flat_coefficients(t, *n)
            return b + a * v0 + c * v1
        return b + nuslerp_tensors(t, v0, v1, dim, params.flatten)
    return nuslerp_tensors(t, experts[0].float(), experts[1].float(), dim, params.flatten)


__all__ = ["nuslerp", "nuslerp_tensors"]
