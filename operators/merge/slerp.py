"""SLERP: spherical linear interpolation of two models, tensor by tensor (Shoemake 1985; mergekit).

    cos Ω = ⟨v_0/‖v_0‖, v_1/‖v_1‖⟩ over the flattened tensor
    v = [sin((1 − t)Ω) · v_0 + sin(tΩ) · v_1] / sin Ω

with linear interpolation when |cos Ω| > 0.9995 (near-colinear tensors, where the formula is
unstable). t = 0 gives the first model, t = 1 the second. Exactly two experts; ``order`` names which
is first (by default the first by name).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field
from torch import Tensor

from operators.merge.registry import MergeParams, TensorContext, register

DOT_THRESHOLD = 0.9995


class SlerpParams(MergeParams):
    t: float = Field(default=0.5, ge=0.0, le=1.0, description="0 → the first model, 1 → the second")
    order: tuple[str, str] | None = Field(default=None, description="[first, second] expert names")


def slerp_tensors(t: float, v0: Tensor, v1: Tensor, eps: float = 1e-8) -> Tensor:
    """SLERP of two tensors in float32 (lerp fallback near colinearity)."""
    a, b = v0.float(), v1.float()
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = na if na > eps else torch.ones(())
    nb = nb if nb > eps else torch.ones(())
    dot = float(((a / na) * (b / nb)).sum().clamp(-1.0, 1.0))
    if abs(dot) > DOT_THRESHOLD:
        return (1 - t) * a + t * b
    omega = math.acos(dot)
    s = math.sin(omega)
    return (math.sin((1 - t) * omega) / s) * a + (math.sin(t * omega) / s) * b


@register(
    "slerp",
    params=SlerpParams,
    needs_base=False,
    paper="https://dl.acm.org/doi/10.1145/325165.325242",
    formula="θ = [sin((1−t)Ω) θ_a + sin(tΩ) θ_b] / sin Ω",
    experts=(2, 2),
)
def slerp(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: SlerpParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """Interpolate the two experts' tensors along the great circle.

    Returns:
        The interpolated tensor (float32).

    Raises:
        ValueError: unless there are exactly two experts, or when ``order`` names others.
    """
    if len(experts) != 2:
        raise ValueError(f"slerp interpolates exactly two models; got {len(experts)}. Merge two experts, or use linear")
    names = list((ctx or TensorContext()).experts) or ["0", "1"]
    first = 0
    if params.order is not None:
        if sorted(params.order) != sorted(names):
            raise ValueError(f"params.order: {list(params.order)} must name the two experts being merged ({names})")
        first = names.index(params.order[0])
    return slerp_tensors(params.t, experts[first], experts[1 - first])
