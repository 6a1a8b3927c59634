"""Model Stock (Jang, Yun, Han, ECCV 2024, arXiv 2403.19522).

For fine-tuned runs of the *same* task: per tensor, with offsets δ_i = θ_i − θ_0 and cos θ the mean
pairwise cosine between them,

    t = N cos θ / (1 + (N − 1) cos θ),   θ = t · mean_i θ_i + (1 − t) · θ_0

(the paper's N = 2 formula, generalised with the mean pairwise cosine as mergekit and FusionBench
do). ``filter_wise`` computes the cosine per output row instead of per tensor. Where
1 + (N − 1) cos θ ≈ 0 the base is kept (no finite estimate), as mergekit does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from operators.merge.registry import MergeParams, TensorContext, register


class ModelStockParams(MergeParams):
    filter_wise: bool = False


@register(
    "model_stock",
    params=ModelStockParams,
    needs_base=True,
    paper="https://arxiv.org/abs/2403.19522",
    formula="θ = t·mean(θ_i) + (1−t)·θ_0,  t = N cos θ / (1 + (N−1) cos θ)",
)
def model_stock(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: ModelStockParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """Model-Stock-merge one tensor (weights are not used: the ratio comes from the geometry).

    Returns:
        t · mean θ_i + (1 − t) θ_0 (float32).

    Raises:
        ValueError: with fewer than two experts (the angle needs two offsets).
    """
    assert base is not None
    if len(experts) < 2:
        raise ValueError("model_stock needs at least two fine-tuned models (it measures the angle between them)")
    b = base.float()
    shape = b.shape
    if params.filter_wise:
        rows = (lambda x: x.unsqueeze(0)) if b.dim() <= 1 else (lambda x: x.reshape(x.shape[0], -1))
    else:
        rows = lambda x: x.reshape(1, -1)  # noqa: E731
    w0 = rows(b)
    ws = [rows(e.float()) for e in experts]
    offsets = [w - w0 for w in ws]
    cos = []
    for i, a in enumerate(offsets):
        for c in offsets[i + 1:]:
            norms = (torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(c, dim=-1)).clamp(min=1e-6)
            cos.append(((a * c).sum(dim=-1) / norms).clamp(-1, 1))
    cos_theta = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denom = 1 + (n - 1) * cos_theta
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos_theta), n * cos_theta / torch.where(singular, 1.0, denom))
    avg = torch.stack(ws).mean(dim=0)
    return (t * avg + (1 - t) * w0).reshape(shape)
