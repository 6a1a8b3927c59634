"""Nearswap: take the other model where it is near the base (mergekit's ``nearswap``).

For the base θ_0 and one other model θ_1, entry by entry:

    w = clamp(t / max(|θ_0 − θ_1|, 1e-6), 0, 1);     θ = w θ_1 + (1 − w) θ_0

Where the two differ by at most t the other model's value is taken whole; where they differ more, it is
interpolated toward the base in proportion. Exactly one expert besides the base.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field
from torch import Tensor

from operators.merge.registry import MergeParams, TensorContext, register


class NearswapParams(MergeParams):
    t: float = Field(ge=0.0, description="the distance within which the other model's value is taken whole")


@register(
    "nearswap",
    params=NearswapParams,
    needs_base=True,
    paper="https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/nearswap.py",
    formula="w = clamp(t / |θ_0 − θ_1|, 0, 1);  θ = w θ_1 + (1 − w) θ_0, entry by entry",
    chunkable=True,
    experts=(1, 1),
)
def nearswap(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: NearswapParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """Nearswap one tensor (see the module docstring).

    Returns:
        The merged tensor (float32).
    """
    assert base is not None
    if len(experts) != 1:
        raise ValueError(f"nearswap takes the base and exactly one other model (got {len(experts)} experts)")
    a, b = base.float(), experts[0].float()
    w = (params.t / (a - b).abs().clamp(min=1e-6)).clamp(0.0, 1.0)
    return w * b + (1 - w) * a


__all__ = ["nearswap"]
