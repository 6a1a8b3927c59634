"""The task-vector family's shared pipeline: sparsify → elect sign → combine → scale.

TIES, DARE and their combinations are switches over these few functions, so their maths cannot
drift apart (mergekit's generalized task arithmetic does the same). Every function is pure and
works on float32 task vectors stacked as ``(experts, *shape)``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from operators.merge.registry import TensorStream


def stack_task_vectors(base: Tensor, experts: Sequence[Tensor]) -> Tensor:
    """τ_t = θ_t − θ_0, stacked in float32: shape ``(T, *base.shape)``."""
    b = base.float()
    return torch.stack([e.float() - b for e in experts])


def add_weighted_sum(base: Tensor, tv: Tensor, weights: Sequence[float], scaling: float) -> Tensor:
    """Task arithmetic's combine step: θ_0 + λ Σ_t w_t τ_t (float32)."""
    w = torch.tensor(list(weights), dtype=torch.float32)
    return base.float() + scaling * torch.tensordot(w, tv, dims=1)


# --- sparsify -------------------------------------------------------------------------------------

def trim_by_threshold(tv: Tensor, thresholds: Sequence[float]) -> Tensor:
    """TIES' trim: keep entries with |τ_t| ≥ threshold_t (ties at the threshold are kept)."""
    thr = torch.tensor(list(thresholds), dtype=tv.dtype).view(-1, *([1] * (tv.dim() - 1)))
    return torch.where(tv.abs() >= thr, tv, torch.zeros((), dtype=tv.dtype))


def topk_threshold(values: Tensor, density: float) -> float:
    """The k-th largest |value| with k = max(1, round(density · n)); 0 when density = 1."""
    flat = values.abs().flatten()
    if density >= 1.0:
        return 0.0
    k = max(1, round(density * flat.numel()))
    return float(torch.topk(flat, k, sorted=False).values.min())


def dare(tv: Tensor, drop_rate: float, seeds: Sequence[int]) -> Tensor:
    """DARE: drop each entry with probability p, rescale the survivors by 1/(1 − p).

    Args:
        tv: Stacked task vectors ``(T, ...)``.
        drop_rate: p in [0, 1).
        seeds: One seed per expert (see :func:`tensor_seed`), so results do not depend on the order
            in which tensors are streamed.
    """
    if drop_rate == 0.0:
        return tv
    out = torch.empty_like(tv)
    for t, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        keep = torch.rand(tv[t].shape, generator=g) >= drop_rate  # P(keep) = 1 − p
        out[t] = torch.where(keep, tv[t] / (1.0 - drop_rate), torch.zeros((), dtype=tv.dtype))
    return out


def tensor_seed(seed: int, key: str, expert: str) -> int:
    """A seed for one expert's copy of one tensor: stable across runs, processes and tensor order."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}/{expert}".encode()).digest()[:8], "little") & (2**63 - 1)


# --- elect and combine ----------------------------------------------------------------------------

def elect_sign(tv: Tensor) -> Tensor:
    """TIES' sign election: the sign of Σ_t τ_t (the sign with the larger total mass).

    Entries whose sum is exactly zero take the majority sign of the tensor's elected signs (TIES'
    reference code takes it over the whole flattened model; exact zero sums with non-zero entries
    are measure-zero events, and an entry whose every value is zero merges to zero either way).
    """
    sign = torch.sign(tv.sum(dim=0))
    majority = torch.sign(sign.sum())
    if majority == 0:
        majority = torch.ones((), dtype=sign.dtype)
    return torch.where(sign == 0, majority, sign)


def disjoint_merge(tv: Tensor, sign: Tensor, how: str = "mean") -> Tensor:
    """Combine only the entries whose sign agrees with the elected sign.

    ``mean``: divide by the number of agreeing non-zero entries (TIES "dis-mean", the paper's);
    ``sum``: their sum ("dis-sum", used by AdaMerging and FusionBench).
    """
    agree = torch.where(sign > 0, tv > 0, tv < 0)
    selected = tv * agree
    total = selected.sum(dim=0)
    if how == "sum":
        return total
    count = agree.sum(dim=0).clamp(min=1)
    return total / count


def weighted(tv: Tensor, weights: Sequence[float]) -> Tensor:
    w = torch.tensor(list(weights), dtype=tv.dtype).view(-1, *([1] * (tv.dim() - 1)))
    return tv * w


# --- whole-model statistics (a streaming pass, bounded memory) ------------------------------------

def global_topk_thresholds(stream: TensorStream, density: float, n_experts: int) -> list[float]:
    """Per expert, the exact k-th largest |τ| over the *whole model* (k = max(1, round(density·n))).

    Exact and in bounded memory: a radix select over the bit patterns of |τ| as float32 (for
    non-negative floats the bit pattern orders like the value). Pass 1 counts the top 16 bits into
    65,536 bins and finds the bin holding the k-th largest value; pass 2 counts the low 16 bits of
    the values in that bin. Memory: two histograms per expert, plus one tensor at a time.
    """
    if density >= 1.0:
        return [0.0] * n_experts
    hi_counts = torch.zeros(n_experts, 65536, dtype=torch.int64)
    total = 0
    for _key, base, experts in stream():
        for t, e in enumerate(experts):
            bits = (e.float() - base.float()).abs().flatten().view(torch.int32)
            hi_counts[t] += torch.bincount((bits >> 16).long(), minlength=65536)
        total += base.numel()
    k = max(1, round(density * total))
    bins, above = [], []
    for t in range(n_experts):
        from_top = hi_counts[t].flip(0).cumsum(0)  # from_top[i] = count of values with hi ≥ 65535 − i
        i = int(torch.searchsorted(from_top, torch.tensor(k)))  # first index where the count reaches k
        b = 65535 - i
        bins.append(b)
        above.append(int(from_top[i - 1]) if i > 0 else 0)  # values strictly above bin b
    lo_counts = torch.zeros(n_experts, 65536, dtype=torch.int64)
    for _key, base, experts in stream():
        for t, e in enumerate(experts):
            bits = (e.float() - base.float()).abs().flatten().view(torch.int32)
            in_bin = bits[(bits >> 16) == bins[t]]
            lo_counts[t] += torch.bincount((in_bin & 0xFFFF).long(), minlength=65536)
    thresholds = []
    for t in range(n_experts):
        from_top = lo_counts[t].flip(0).cumsum(0)
        i = int(torch.searchsorted(from_top, torch.tensor(k - above[t])))
        bits = (bins[t] << 16) | (65535 - i)
        thresholds.append(float(torch.tensor(bits, dtype=torch.int32).view(torch.float32)))
    return thresholds


def check_density(density: float) -> None:
    if not (0.0 < density <= 1.0) or math.isnan(density):
        raise ValueError(f"density must be in (0, 1] (got {density})")
