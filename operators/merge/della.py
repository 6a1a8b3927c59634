"""DELLA: drop by magnitude rank, then merge (Deep et al., arXiv 2406.11617; mergekit's ``della`` and
``della_linear``).

DARE drops every entry of a task vector with the same probability; DELLA's MAGPRUNE keeps the larger
ones more often. Per expert and tensor, along each row (dimension 1, as mergekit ranks: a matrix's rows; a vector is
one row), the entries are ranked by |τ| (rank 0 the smallest, n − 1 the largest) and entry i is kept with
probability

    p_i = (density − ε) + 2ε · rank_i / (n − 1)            (a one-entry row: p = density)

so the mean keep rate is ``density`` and the largest entries are kept with ``density + ε``. Survivors are
rescaled: by 1/p_i each (``inverse_keep``, the paper's: unbiased), by one factor matching the task vector's
L1 norm (``l1``, mergekit's ``rescale: true``), or not at all. Then, with per-expert weights w_t:

- ``della``: TIES' sign election over the weighted vectors (a zero sum counts as +, as mergekit does) and
  the disjoint merge: θ = θ_0 + λ Σ_t w_t δ_t [agree] / Σ_t w_t [agree] (``normalize``; the plain sum
  without it);
- ``della_linear``: θ = θ_0 + λ Σ_t w_t δ_t / Σ_t w_t (``normalize``; the plain sum without it).

The draws are seeded per (seed, tensor name, expert name), as DARE's are, and each element's draw is a
hash of that seed and its index in the tensor: the same seed gives the same merge whatever order tensors
are streamed in, on every machine, and a large tensor merged in row blocks draws what it would whole
(with ``l1``, a first pass over the whole tensor finds each expert's factor). mergekit draws from torch's global
generator in its own order, so for the same config the kept entries differ from mergekit's (the method
and the probabilities are the same); with ``density: 1`` nothing is dropped and the two agree.
Ties in |τ| are ranked by position (a stable sort; mergekit's sort is not stable).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from operators.merge.registry import MergeParams, TensorContext, register, resolve_per_expert
from operators.merge.task_vectors import (
    disjoint_merge,
    elect_sign,
    magnitude_ranks,
    stack_task_vectors,
    tensor_seed,
)


class DellaParams(MergeParams):
    density: float = Field(default=0.5, gt=0.0, le=1.0, description="mean share of each task vector kept")
    densities: dict[str, float] | None = Field(default=None, description="per-expert density (overrides density)")
    epsilon: float = Field(default=0.15, ge=0.0, lt=0.5,
                           description="keep probabilities span density ± ε, by magnitude rank within a row")
    scaling: float = Field(default=1.0, ge=0.0, le=10.0, description="λ, applied to the merged task vector")
    normalize: bool = Field(default=True, description="divide by the (agreeing) experts' summed weights")
    rescale: Literal["inverse_keep", "l1", "none"] = Field(
        default="inverse_keep", description="survivors × 1/p_i (paper), or match each τ's L1 norm (mergekit)")
    seed: int = 0

    @model_validator(mode="after")
    def _range(self) -> DellaParams:
        for name, d in [("density", self.density), *(self.densities or {}).items()]:
            if not 0.0 < d <= 1.0:
                raise ValueError(f"{'density' if name == 'density' else f'densities.{name}'}: {d} must be in (0, 1], "
                                 "the mean share of the task vector kept")
            if d < 1.0 and not (0.0 < d - self.epsilon and d + self.epsilon < 1.0):
                raise ValueError(f"{'density' if name == 'density' else f'densities.{name}'}: {d} ± epsilon "
                                 f"{self.epsilon} must stay inside (0, 1); lower epsilon or move the density")
        return self


def keep_probabilities(tv: Tensor, density: float, epsilon: float) -> Tensor:
    """MAGPRUNE's keep probability of each entry of one task vector (rank by |τ| along the last dimension)."""
    rows = tv.reshape(1, -1) if tv.dim() < 2 else tv.movedim(1, -1)  # mergekit ranks along dim 1
    n = rows.shape[-1]
    if n == 1:
        return torch.full(tv.shape, density, dtype=torch.float32)
    ranks = magnitude_ranks(rows, dtype=torch.int32)  # int32 ranks: half the memory of argsort's int64
    p = ranks.to(torch.float32).mul_(2.0 * epsilon / (n - 1)).add_(density - epsilon)
    return p.reshape(tv.shape) if tv.dim() < 2 else p.movedim(-1, 1)


_M32 = 0xFFFFFFFF
STATS_BLOCK = 1 << 20  # elements per piece of the L1 pass over a whole tensor


def uniforms(seed: int, start: int, n: int) -> Tensor:
    """n uniform draws in [0, 1) for elements ``start … start + n − 1`` of a tensor: a counter-based hash of
    (seed, element index), so a row block draws exactly what the whole tensor draws for its elements.
    (A 32-bit integer hash, 0x45d9f3b twice, in int64 arithmetic that cannot overflow; 24 bits kept.)"""
    offset = (((seed ^ (seed >> 32)) & _M32) * 0x9E3779B1) & _M32  # the seed folded to 32 bits, spread
    x = (torch.arange(start, start + n, dtype=torch.int64) + offset) & _M32
    for _ in range(2):
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    x = x ^ (x >> 16)
    return (x >> 8).to(torch.float32) * (1.0 / (1 << 24))


def l1_factor(before: float, after: float) -> float:
    """mergekit's rescale: scale a pruned τ back to its original L1 norm, unless either is ~0."""
    return before / after if before >= 1e-7 and after >= 1e-7 else 1.0


def prune_one(tv: Tensor, density: float, epsilon: float, seed: int, rescale: str, start: int = 0) -> Tensor:
    """One task vector (or a row block of it, starting at element ``start``) pruned by MAGPRUNE, in place;
    survivors × 1/p_i with ``inverse_keep`` (the L1 rescale is the caller's: it needs the whole tensor)."""
    if density >= 1.0:
        return tv
    p = keep_probabilities(tv, density, epsilon)
    drop = uniforms(seed, start, tv.numel()).view(tv.shape) >= p
    if rescale == "inverse_keep":
        tv.div_(p)
    return tv.masked_fill_(drop, 0.0)


def magprune(tv: Tensor, densities: Sequence[float], epsilon: float, seeds: Sequence[int], rescale: str,
             inplace: bool = False, start: int = 0, factors: Sequence[float] | None = None) -> Tensor:
    """Each task vector of the stack ``(T, ...)`` pruned by MAGPRUNE (in place with ``inplace``). With ``l1``, each
    is scaled back to its original L1 norm: by ``factors`` (computed over the whole tensor) for a row block."""
    before = [float(t.abs().sum()) for t in tv] if rescale == "l1" and factors is None else None
    out = tv if inplace else tv.clone()
    for t, (density, seed) in enumerate(zip(densities, seeds, strict=True)):
        prune_one(out[t], density, epsilon, seed, rescale, start)
    if rescale == "l1":
        scale = factors if factors is not None else [l1_factor(b, float(o.abs().sum())) for b, o in zip(before, out,
                                                                                                       strict=True)]
        out.mul_(torch.tensor(list(scale), dtype=out.dtype).view(-1, *([1] * (out.dim() - 1))))
    return out


def _l1_factors(task_vector, params: DellaParams, names: Sequence[str], key: str = "") -> list[float] | None:
    """``rescale: l1`` over a tensor merged in row blocks: each expert's factor, from its whole pruned τ (the
    same draws as the blocks make), one task vector at a time."""
    if params.rescale != "l1":
        return None
    factors = []
    densities = resolve_per_expert(params.densities, params.density, names, "densities")
    for i, (n, d) in enumerate(zip(names, densities, strict=True)):
        tv = task_vector(i)
        rows = tv.reshape(1, -1) if tv.dim() < 2 else tv
        step = max(1, STATS_BLOCK // max(1, rows[0].numel()))  # whole rows, ~1M elements: bounded scratch memory
        before = after = 0.0
        for r in range(0, rows.shape[0], step):
            block = rows[r:r + step]
            before += float(block.abs().sum())
            start = r * rows[0].numel()
            pruned = prune_one(block.clone(), d, params.epsilon, tensor_seed(params.seed, key, n), "l1", start)
            after += float(pruned.abs().sum())
        factors.append(l1_factor(before, after))
    return factors


def _pruned(base: Tensor, experts: Sequence[Tensor], weights: Sequence[float], params: DellaParams,
            ctx: TensorContext | None) -> Tensor:
    ctx = ctx or TensorContext()
    names = ctx.experts or tuple(str(i) for i in range(len(experts)))
    densities = resolve_per_expert(params.densities, params.density, ctx.experts, "densities", len(experts))
    seeds = [tensor_seed(params.seed, ctx.key, n) for n in names]
    tv = magprune(stack_task_vectors(base, experts), densities, params.epsilon, seeds, params.rescale, inplace=True,
                  start=ctx.start, factors=ctx.local)
    return tv.mul_(torch.tensor(list(weights), dtype=torch.float32).view(-1, *([1] * (tv.dim() - 1))))


@register(
    "della",
    params=DellaParams,
    needs_base=True,
    paper="https://arxiv.org/abs/2406.11617",
    formula="θ = θ_0 + λ · disjoint_merge(elect(w_t · MAGPRUNE(τ_t))), keep p = density ± ε by magnitude rank",
    chunkable=True,
    tensor_stats=_l1_factors,
)
def della(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: DellaParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """MAGPRUNE each task vector, then TIES' sign election and disjoint merge (see the module docstring).

    Returns:
        θ_0 + λ τ_m (float32).
    """
    assert base is not None
    tv = _pruned(base, experts, weights, params, ctx)
    merged = disjoint_merge(tv, elect_sign(tv, "positive"), "mean" if params.normalize else "sum", weights)
    return base.float() + params.scaling * merged


@register(
    "della_linear",
    params=DellaParams,
    needs_base=True,
    paper="https://arxiv.org/abs/2406.11617",
    formula="θ = θ_0 + λ Σ_t w_t MAGPRUNE(τ_t) (/ Σ_t w_t with normalize), keep p = density ± ε by magnitude rank",
    allow_negative_weights=True,
    chunkable=True,
    tensor_stats=_l1_factors,
)
def della_linear(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: DellaParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """MAGPRUNE each task vector, then their weighted sum (see the module docstring).

    Returns:
        θ_0 + λ τ_m (float32).
    """
    assert base is not None
    merged = _pruned(base, experts, weights, params, ctx).sum(dim=0)
    if params.normalize:
        total = sum(weights)
        merged = merged / (total if abs(total) >= 1e-8 else 1.0)
    return base.float() + params.scaling * merged


__all__ = ["della", "della_linear", "keep_probabilities", "l1_factor", "magprune", "prune_one", "uniforms"]
