"""The task-vector family's shared pipeline: sparsify → elect sign → combine → scale.

TIES, DARE and their combinations are switches over these few functions, so their maths cannot
drift apart (mergekit's generalized task arithmetic does the same). Every function is pure and
works on float32 task vectors stacked as ``(experts, *shape)``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from operators.merge.registry import TensorStream


def stack_task_vectors(base: Tensor, experts: Sequence[Tensor]) -> Tensor:
    """τ_t = θ_t − θ_0, stacked in float32: shape ``(T, *base.shape)`` (a fresh tensor)."""
    b = base.float()
    out = torch.empty((len(experts), *base.shape), dtype=torch.float32)
    for t, e in enumerate(experts):
        torch.sub(e.float(), b, out=out[t])
    return out


def per_matrix(base: Tensor, experts: Sequence[Tensor], weights: Sequence[float], scaling: float,
               update: Callable[[Tensor, float], Tensor]) -> Tensor:
    """The subspace merges' frame (TSV-M, Iso-C, Iso-CTS): θ_0 + ``update(τ, α)`` (the scaled update) for a
    matrix (``τ`` stacked, T × d_out × d_in), θ_0 + α · the weighted mean of the task vectors for any other
    tensor, and the base itself where no expert changed it (float32)."""
    tv = stack_task_vectors(base, experts)
    if not bool(tv.any()):
        return base.float()
    if tv.dim() != 3:  # not a matrix (a bias, a norm): the (weighted) mean of the task vectors
        return base.float() + scaling * torch.tensordot(torch.tensor(list(weights), dtype=torch.float32), tv,
                                                        dims=1) / len(experts)
    return base.float() + update(tv, scaling)


def dot64(a: Tensor, b: Tensor, piece: int = 1 << 20) -> float:
    """⟨a, b⟩ of two flattened tensors, each piece's products summed in float64: accurate for tensors of
    millions of elements, where a float32 matrix product's running sum loses about 1e-5 of the total."""
    a, b = a.reshape(-1), b.reshape(-1)
    return sum(float((a[i:i + piece] * b[i:i + piece]).sum(dtype=torch.float64)) for i in range(0, a.numel(), piece))


def gram64(vectors: Sequence[Tensor]) -> Tensor:
    """The Gram matrix (float64) of flattened tensors, pair by pair with :func:`dot64`."""
    n = len(vectors)
    g = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            g[i, j] = g[j, i] = dot64(vectors[i], vectors[j])
    return g


def add_weighted_sum(base: Tensor, tv: Tensor, weights: Sequence[float], scaling: float) -> Tensor:
    """Task arithmetic's combine step: θ_0 + λ Σ_t w_t τ_t (float32)."""
    w = torch.tensor(list(weights), dtype=torch.float32)
    return base.float() + scaling * torch.tensordot(w, tv, dims=1)


def normalized(weights: Sequence[float]) -> list[float]:
    """Weights divided by their sum (mergekit's ``normalize``); left as they are when the sum is ~0."""
    total = sum(weights)
    return [w / total for w in weights] if abs(total) >= 1e-8 else list(weights)


# --- sparsify -------------------------------------------------------------------------------------

def trim_by_threshold_(tv: Tensor, thresholds: Sequence[float]) -> Tensor:
    """TIES' trim, in place: keep entries with |τ_t| ≥ threshold_t (ties at the threshold are kept)."""
    thr = torch.tensor(list(thresholds), dtype=tv.dtype).view(-1, *([1] * (tv.dim() - 1)))
    return tv.masked_fill_(tv.abs() < thr, 0.0)


def keep_count(density: float, n: int) -> int:
    """How many of ``n`` entries a density keeps: k = max(1, ⌊density · n⌋).

    The floor is what TIES' reference code (``int(d * K)``) and mergekit (``int(density * numel)``)
    both use; at least one entry is always kept.
    """
    return max(1, int(density * n))


def topk_threshold(values: Tensor, density: float, inplace: bool = False) -> float:
    """The k-th largest |value| with k = :func:`keep_count`; 0 when density = 1.

    ``inplace`` lets it overwrite ``values`` (a float32 scratch tensor) with their magnitudes. Float64 values
    are ranked in float64 (KnOTS' aligned coordinates), so the threshold is one of them exactly.
    """
    if density >= 1.0:
        return 0.0
    if values.dtype == torch.float64:
        flat = values.abs()
    else:
        flat = values.abs_() if inplace and values.dtype == torch.float32 else values.abs().float()
    return kth_largest(flat.flatten(), keep_count(density, flat.numel()))


def kth_largest(a: Tensor, k: int) -> float:
    """Exactly the k-th largest of a flat tensor, faster than a full selection on large tensors.

    A strided sample brackets the answer; one pass counts the values above the bracket and picks
    out those inside it, and a selection over that small band finds the exact value. If the
    bracket misses (an unlucky sample), the full selection runs instead, so the result is exact.
    """
    n = a.numel()
    if k >= n:
        return float(a.min())
    if n <= 1 << 18:
        return float(torch.kthvalue(a, n - k + 1).values)
    sample = a[:: n // 16384].sort().values
    m = sample.numel()
    q = 1.0 - k / n  # the answer's quantile
    margin = int(6 * math.sqrt(m * q * (1 - q))) + 32
    lo = sample[max(0, int(q * m) - margin)]
    hi = sample[min(m - 1, int(q * m) + margin)]
    candidates = a[a > lo]  # about a fraction 1 − q of the values: everything the answer can be
    above = int((candidates > hi).sum())
    if above < k <= candidates.numel():
        band = candidates[candidates <= hi]
        need = k - above
        if need <= band.numel():
            return float(torch.kthvalue(band, band.numel() - need + 1).values)
    return float(torch.kthvalue(a, n - k + 1).values)


def rescale_l1(original: Tensor, sparsified: Tensor, eps: float = 1e-7) -> Tensor:
    """mergekit's ``rescale``: scale each sparsified task vector so its L1 norm matches the original's.

    Works per expert on stacked ``(T, ...)`` tensors; an expert whose norm (before or after) is
    below ``eps`` is left as it is, as mergekit does.
    """
    dims = tuple(range(1, original.dim()))
    before = original.abs().sum(dim=dims) if dims else original.abs()
    after = sparsified.abs().sum(dim=dims) if dims else sparsified.abs()
    ok = (before >= eps) & (after >= eps)
    factor = torch.where(ok, before / torch.where(ok, after, torch.ones_like(after)), torch.ones_like(after))
    return sparsified * factor.view(-1, *([1] * (original.dim() - 1)))


def magnitude_ranks(x: Tensor, descending: bool = False, dtype: torch.dtype = torch.int64) -> Tensor:
    """Each entry's rank by |x| along the last dimension (0 the smallest, or the largest with ``descending``);
    ties ranked by position (a stable sort)."""
    order = x.abs().argsort(dim=-1, descending=descending, stable=True)
    ranks = torch.empty(order.shape, dtype=dtype)
    ranks.scatter_(-1, order, torch.arange(x.shape[-1], dtype=dtype).expand_as(order).contiguous())
    return ranks


def middle_band(tv: Tensor, density: float, gamma: float, scope: str) -> Tensor:
    """Model breadcrumbs' mask: drop the top-γ outliers by |τ|, keep the next top-``density`` entries.

    Per expert, over each row of the last dimension (``scope="row"``, the paper's code) or over the
    whole flattened tensor (``scope="tensor"``, mergekit's). Counts are ⌊γ·n⌋ removed and ⌊density·n⌋
    kept; when the two together exceed n, fewer outliers are removed so the kept count holds
    (mergekit's rule). Scalars are kept as they are.
    """
    if tv.dim() <= 1:  # one expert's scalar each: nothing to rank
        return tv
    flat = tv.reshape(tv.shape[0], -1) if scope == "tensor" or tv.dim() == 2 else tv
    n = flat.shape[-1]
    keep = int(density * n)
    top = min(int(gamma * n), n - keep)
    ranks = magnitude_ranks(flat, descending=True)
    mask = (ranks >= top) & (ranks < top + keep)
    return (flat * mask).reshape(tv.shape)


def dare(tv: Tensor, drop_rate: float, seeds: Sequence[int], rescale: str = "inverse_keep") -> Tensor:
    """DARE: drop each entry with probability p, rescale the survivors.

    Args:
        tv: Stacked task vectors ``(T, ...)``.
        drop_rate: p in [0, 1).
        seeds: One seed per expert (see :func:`tensor_seed`), so results do not depend on the order
            in which tensors are streamed.
        rescale: ``inverse_keep`` multiplies survivors by 1/(1 − p) (the paper: unbiased);
            ``l1`` matches each task vector's L1 norm (mergekit's ``rescale``); ``none`` keeps them.
    """
    if drop_rate == 0.0:
        return tv
    out = torch.empty_like(tv)
    factor = 1.0 / (1.0 - drop_rate) if rescale == "inverse_keep" else 1.0
    for t, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(seed)
        keep = torch.rand(tv[t].shape, generator=g) >= drop_rate  # P(keep) = 1 − p
        out[t] = torch.where(keep, tv[t] * factor, torch.zeros((), dtype=tv.dtype))
    return rescale_l1(tv, out) if rescale == "l1" else out


def tensor_seed(seed: int, key: str, expert: str) -> int:
    """A seed for one expert's copy of one tensor: stable across runs, processes and tensor order."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}/{expert}".encode()).digest()[:8], "little") & (2**63 - 1)


# --- elect and combine ----------------------------------------------------------------------------

def elect_sign(tv: Tensor, zero: str = "majority") -> Tensor:
    """TIES' sign election: the sign of Σ_t τ_t (the sign with the larger total mass).

    Entries whose sum is exactly zero (kept values that cancel exactly) take the majority sign of
    the tensor's elected signs with ``zero="majority"`` (TIES' reference code, which takes it over
    the whole flattened model), or + with ``zero="positive"`` (mergekit: ``sum >= 0``).
    """
    sign = torch.sign(tv.sum(dim=0))
    if zero == "positive":
        return sign.masked_fill_(sign == 0, 1.0)
    majority = torch.sign(sign.sum())
    if majority == 0:
        majority = torch.ones((), dtype=sign.dtype)
    return torch.where(sign == 0, majority, sign)


def disjoint_merge(tv: Tensor, sign: Tensor, how: str = "mean", weights: Sequence[float] | None = None) -> Tensor:
    """Combine only the (weighted) entries whose sign agrees with the elected sign (overwrites ``tv``).

    ``mean``: divide by the number of agreeing non-zero entries (TIES "dis-mean", the paper's), or,
    given ``weights``, by the sum of the agreeing entries' weights (mergekit's ``normalize``; equal
    to the count for unit weights); ``sum``: their sum ("dis-sum", used by AdaMerging and FusionBench).
    """
    agree = (tv * sign) > 0
    total = tv.mul_(agree).sum(dim=0)  # tv is consumed: it is always a fresh stack here
    if how == "sum":
        return total
    if weights is None or all(w == 1.0 for w in weights):
        divisor = agree.sum(dim=0, dtype=tv.dtype)
    else:
        divisor = weighted(agree.to(tv.dtype), weights).sum(dim=0)
    return total / divisor.masked_fill_(divisor == 0, 1.0)


def weighted(tv: Tensor, weights: Sequence[float]) -> Tensor:
    if all(w == 1.0 for w in weights):
        return tv
    w = torch.tensor(list(weights), dtype=tv.dtype).view(-1, *([1] * (tv.dim() - 1)))
    return tv * w


# --- whole-model statistics (a streaming pass, bounded memory) ------------------------------------

def global_topk_thresholds(stream: TensorStream, density: float | Sequence[float], n_experts: int) -> list[float]:
    """Per expert, the exact k-th largest |τ| over the *whole model* (k = :func:`keep_count`).

    Exact and in bounded memory: a radix select over the bit patterns of |τ| as float32 (for
    non-negative floats the bit pattern orders like the value). Pass 1 counts the top 16 bits into
    65,536 bins and finds the bin holding the k-th largest value; pass 2 counts the low 16 bits of
    the values in that bin. Memory: two histograms per expert, plus one tensor at a time.
    """
    densities = [density] * n_experts if isinstance(density, (int, float)) else list(density)
    if all(d >= 1.0 for d in densities):
        return [0.0] * n_experts
    hi_counts = torch.zeros(n_experts, 65536, dtype=torch.int64)
    total = 0
    for _key, base, experts in stream():
        for t, e in enumerate(experts):
            bits = (e.float() - base.float()).abs().flatten().view(torch.int32)
            hi_counts[t] += torch.bincount((bits >> 16).long(), minlength=65536)
        total += base.numel()
    ks = [keep_count(d, total) for d in densities]
    bins, above = [], []
    for t in range(n_experts):
        k = ks[t]
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
        i = int(torch.searchsorted(from_top, torch.tensor(ks[t] - above[t])))
        bits = (bins[t] << 16) | (65535 - i)
        thresholds.append(float(torch.tensor(bits, dtype=torch.int32).view(torch.float32)))
    return [0.0 if d >= 1.0 else thr for d, thr in zip(densities, thresholds, strict=True)]

