"""Arcee Fusion: take the other model's changes only where they matter most (mergekit's ``arcee_fusion``).

For the base θ_0 and one other model θ_1, each entry's importance is its change times how far the
row's output distribution moved::

    I = |θ_1 − θ_0| · KL(softmax(θ_1) ‖ softmax(θ_0))        (softmax and KL over each row, ε = 1e-8)

An entry keeps its change where its importance reaches the tensor's outlier fence, the median plus
1.5 inter-quartile ranges of I (Tukey's upper fence); elsewhere it stays at the base::

    θ = θ_0 + (θ_1 − θ_0) · [I ≥ q_50 + 1.5 (q_75 − q_25)]

The quantiles are the order statistics ``sorted(I)[⌊q · (n − 1)⌋]`` of the whole tensor, as mergekit
takes them. mergekit estimates them from a random sample of 10⁶ entries (with replacement, from torch's
global generator) when a tensor has more; mergeflow always takes them exactly, so tensors of up to 10⁶
entries equal mergekit's and larger ones differ only where mergekit's sampled fence moved.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from operators.merge.registry import MergeParams, TensorContext, register

QUANTILES = (0.25, 0.5, 0.75)


class ArceeFusionParams(MergeParams):
    """No parameters: the fence is the tensor's own."""


def importance(base: Tensor, other: Tensor) -> Tensor:
    """|θ_1 − θ_0| times the KL divergence of each row's softmax from the base's (ε 1e-8, as mergekit)."""
    p = F.softmax(other, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    return (other - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


ROWS_PER_PASS = 1024  # rows of the importance computed at a time in the fence's pass


def fence_stats(task_vector, params: ArceeFusionParams, names, key: str = "") -> Tensor:
    """The fence of one whole tensor (its importance formed a few thousand rows at a time), so that the tensor
    can then be merged in row blocks."""
    other, base = task_vector.model(0), task_vector.base()
    flat_o, flat_b = other.reshape(-1, other.shape[-1]), base.reshape(-1, base.shape[-1])
    scores = torch.empty_like(flat_o)
    for r in range(0, flat_o.shape[0], ROWS_PER_PASS):
        scores[r:r + ROWS_PER_PASS] = importance(flat_b[r:r + ROWS_PER_PASS], flat_o[r:r + ROWS_PER_PASS])
    del other, base, flat_o, flat_b
    return fence(scores)


def fence(scores: Tensor) -> Tensor:
    """Median + 1.5 IQR of ``scores``, each quantile the order statistic at ⌊q · (n − 1)⌋ (float32 index), found by
    one partial sort of a copy (no index tensor: a fraction of ``kthvalue``'s memory on large tensors)."""
    flat = scores.detach().reshape(-1).cpu().numpy()
    idx = (torch.tensor(QUANTILES) * (flat.size - 1)).long().tolist()
    part = np.partition(flat, idx)
    q1, median, q3 = (torch.tensor(part[i]) for i in idx)
    return median + 1.5 * (q3 - q1)


@register(
    "arcee_fusion",
    params=ArceeFusionParams,
    needs_base=True,
    paper="https://github.com/arcee-ai/mergekit/blob/main/mergekit/merge_methods/arcee_fusion.py",
    formula="θ = θ_0 + Δ · [|Δ|·KL(softmax θ_1 ‖ softmax θ_0) ≥ median + 1.5 IQR]",
    experts=(1, 1),
    chunkable=True,
    tensor_stats=fence_stats,
)
def arcee_fusion(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: ArceeFusionParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """Arcee Fusion of one tensor (see the module docstring).

    Returns:
        The merged tensor (float32).
    """
    assert base is not None
    if len(experts) != 1:
        raise ValueError(f"arcee_fusion takes the base and exactly one other model (got {len(experts)} experts)")
    a, b = base.float(), experts[0].float()
    scores = importance(a, b)
    threshold = ctx.local if ctx is not None and ctx.local is not None else fence(scores)  # a block's, or whole
    return a + (b - a) * (scores >= threshold).float()


__all__ = ["arcee_fusion", "fence", "fence_stats", "importance"]
