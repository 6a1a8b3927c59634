"""SCE: select, calculate, erase (Wan et al., FuseChat, arXiv 2408.07990; mergekit's ``sce``).

Per tensor, with the task vectors τ_t = θ_t − θ_0 stacked:

1. select: keep the entries where the tasks vary most, the top ``select_topk`` share (of the entries
   whose variance is not zero) by the variance of τ over the tasks (population variance); all when 1;
2. calculate: each task's weight is the mean of its selected τ's squares, normalized to sum to 1
   (equal weights when they all vanish);
3. erase: TIES' sign election on the sum of the selected τ (a zero sum counts as +); an entry of a task
   whose sign disagrees, or that is zero, is left out;

    θ = θ_0 + λ · Σ_t η_t [agree_t] τ_t / max(Σ_t η_t [agree_t], 1e-6)

(λ = 1 is mergekit's, which has no λ). The weights come from the task vectors; per-expert ``weights``
are not taken (refused unless all equal). A large tensor is merged in row blocks after passes over the
whole tensor, one task vector at a time, for the variance threshold and the η: the selection there keeps
every entry whose variance reaches the k-th largest (mergekit's top-k keeps exactly k; they differ only
where variances tie at the threshold).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field, model_validator
from torch import Tensor

from operators.merge.registry import MergeParams, TensorContext, register
from operators.merge.task_vectors import elect_sign, kth_largest, stack_task_vectors


class SceParams(MergeParams):
    select_topk: float = Field(default=1.0, gt=0.0, le=1.0,
                               description="share of the entries kept, those that vary most across tasks")
    scaling: float = Field(default=1.0, ge=0.0, le=10.0, description="λ, applied to the merged task vector")

    @model_validator(mode="after")
    def _no_weights(self) -> SceParams:
        if self.weights and len(set(self.weights.values()) | {1.0}) > 1:
            raise ValueError("weights: sce weighs each task by its task vector's energy; per-expert weights are "
                             "not taken (remove them)")
        return self


def variance_mask(tv: Tensor, share: float) -> Tensor:
    """1 where an entry is among the top ⌊share · (entries of non-zero variance)⌋ by variance over tasks."""
    if share >= 1.0:
        return torch.ones(tv.shape[1:], dtype=torch.bool)
    var = tv.var(dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * share)
    mask = torch.zeros(var.numel(), dtype=torch.bool)
    if k:
        mask[torch.topk(var.abs().flatten(), k=k, largest=True).indices] = True
    return mask.view(var.shape)


def energy_shares(energy: Tensor) -> Tensor:
    """Each task's mean square over their sum (equal shares when all are ~0)."""
    total = float(energy.sum())
    return torch.full_like(energy, 1.0 / len(energy)) if abs(total) < 1e-6 else energy / total


def energy_weights(tv: Tensor) -> Tensor:
    """η_t: the mean square of each task vector, normalized to sum to 1 (equal when all are ~0)."""
    return energy_shares(tv.square().reshape(tv.shape[0], -1).mean(dim=1))


def population_variance(task_vector, n: int) -> Tensor:
    """The variance over tasks of each entry (population), from ``task_vector(i)`` fresh tensors one at a time,
    in a fixed order of operations: a row block computes exactly what the whole tensor's pass did."""
    mean = task_vector(0).div_(n)
    for i in range(1, n):
        mean.add_(task_vector(i).div_(n))
    var = torch.zeros_like(mean)
    for i in range(n):
        var.add_(task_vector(i).sub_(mean).square_())
    return var.div_(n)


def sce_stats(task_vector, params: SceParams, names: Sequence[str], key: str = "") -> tuple[float | None, Tensor]:
    """For a tensor merged in row blocks: the variance threshold of the top ``select_topk`` share (None: all kept)
    and each task's η over the whole tensor, one task vector at a time (mean, then variance, then η)."""
    n = len(names)
    threshold = None
    if params.select_topk < 1.0:
        var = population_variance(task_vector, n)
        k = int(int(torch.count_nonzero(var)) * params.select_topk)
        threshold = kth_largest(var.flatten(), k) if k else float("inf")
    energy = torch.zeros(n, dtype=torch.float32)
    for i in range(n):
        tv = task_vector(i)
        if threshold is not None:
            tv.masked_fill_(var < threshold, 0.0)
        energy[i] = tv.square().mean()
    return threshold, energy_shares(energy)


@register(
    "sce",
    params=SceParams,
    needs_base=True,
    paper="https://arxiv.org/abs/2408.07990",
    formula="select top-k entries by variance over tasks; η_t = mean(τ_t²) normalized; erase sign disagreements; "
            "θ = θ_0 + λ Σ η_t [agree] τ_t / Σ η_t [agree]",
    chunkable=True,
    tensor_stats=sce_stats,
)
def sce(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: SceParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """SCE-merge one tensor (see the module docstring).

    Returns:
        θ_0 + λ τ_m (float32).
    """
    assert base is not None
    if len(set(weights)) > 1:
        raise ValueError("weights: sce weighs each task by its task vector's energy; per-expert weights are not "
                         "taken (remove them)")
    tv = stack_task_vectors(base, experts)
    if ctx is not None and ctx.local is not None:  # a row block: the whole tensor's threshold and η
        threshold, eta = ctx.local
        if threshold is not None:
            tv *= population_variance(lambda i: tv[i].clone(), len(experts)) >= threshold
    else:
        tv *= variance_mask(tv, params.select_topk)
        eta = energy_weights(tv)
    sign = elect_sign(tv, "positive")
    num, den = torch.zeros_like(sign), torch.zeros_like(sign)
    for t in range(len(experts)):  # task by task: no stack-sized temporaries
        agree = (tv[t] * sign > 0).to(torch.float32).mul_(float(eta[t]))
        den += agree
        num += agree.mul_(tv[t])
    return base.float() + params.scaling * num / den.clamp_(min=1e-6)


__all__ = ["energy_weights", "sce", "sce_stats", "variance_mask"]
