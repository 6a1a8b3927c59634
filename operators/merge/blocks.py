"""The merge of every tensor, block by block: what the streaming engine reads, merges and hands on.

Element-wise methods get large matrices in row blocks of ``CHUNK_ELEMENTS``; the others get whole
tensors. A method with a whole-model pass (``prepare``) first streams over the model once; a method with
per-tensor statistics gets them before the first block of a tensor that comes in pieces. Every input is
checked for NaN/Inf as it is read. The readers are files (:class:`~operators.tensor_io.TensorReader`),
LoRA adapters as full weights, or tensors held in memory (:class:`_StateReader`); ``split_keys`` cuts a
model into parts that several workers merge together.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from operators.errors import MergeError
from operators.merge.registry import MergeMethod, ModelStream, TensorContext
from operators.tensor_io import TensorReader

# element-wise merges of large matrices go in row blocks of about this many elements (4 MiB per input
# in float32: measured as fast as 16 MiB blocks, with 100 MiB less peak memory on a 134M model)
CHUNK_ELEMENTS = 1024 * 1024


def _nonfinite(t: torch.Tensor) -> int:
    """How many NaN/Inf values ``t`` holds. Fast path: one sum (NaN/Inf make it non-finite); only a non-finite
    sum, which huge finite values could also give, pays for the exact element-wise check."""
    if not t.is_floating_point() or bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all()):
        return 0
    return int((~torch.isfinite(t)).sum())


def _check_finite(t: torch.Tensor, who: str, key: str) -> None:
    if bad := _nonfinite(t):
        raise MergeError(f"{who}: tensor {key!r} has {bad} NaN/Inf values; the checkpoint is broken, re-create it")


def cast_checked(merged: torch.Tensor, dtype: torch.dtype, key: str, method: str) -> torch.Tensor:
    """``merged`` in the output's ``dtype``, refused if the cast made it overflow (e.g. float16's ±65504)."""
    out = merged.to(dtype) if merged.is_floating_point() else merged
    if out is not merged:
        _check_merged(out, key, method, f" once cast to {str(dtype).removeprefix('torch.')}")
    return out


def _check_merged(t: torch.Tensor, key: str, method: str, where: str = "") -> None:
    # a merge of finite inputs can still overflow (scaled sums of large values): never publish it
    if bad := _nonfinite(t):
        raise MergeError(f"{method}: the merged tensor {key!r} has {bad} NaN/Inf values{where}, from finite inputs; "
                         "nothing was published. Lower the scaling or weights, or merge into a wider dtype "
                         "(float32)")


def _prepare(spec: MergeMethod, p: Any, keys: list[str], readers: Mapping[str, Any], names: list[str]) -> Any:
    """The method's whole-model statistics: a first streaming pass over the floating-point tensors (None for a
    method without one)."""
    if spec.prepare is None:
        return None
    ref = readers["__base__"]
    float_keys = [k for k in keys if ref.dtype(k).is_floating_point]
    return spec.prepare(ModelStream(float_keys, lambda k: (ref.get(k), [readers[n].get(k) for n in names])), p, names)


@dataclass(frozen=True)
class _Block:
    """A piece of one tensor to merge: elements start:stop of the flattened tensor."""

    key: str
    start: int
    stop: int
    view: tuple[int, ...]
    first: bool
    last: bool


def _plan_blocks(keys, ref: TensorReader, spec, p, chunk_elements: int, per_tensor=None) -> list[_Block]:
    """Whole tensors, except large matrices of element-wise methods: row blocks of ~chunk_elements."""
    blocks = []
    for key in keys:
        shape, numel = ref.shape(key), ref.numel(key)
        pk = per_tensor[key][0] if per_tensor else p
        pieces = ref.dtype(key).is_floating_point and len(shape) >= 2 and numel > chunk_elements and spec.chunkable(pk)
        if not pieces:
            blocks.append(_Block(key, 0, numel, tuple(shape), True, True))
            continue
        row = math.prod(shape[1:])
        step = max(1, chunk_elements // row) * row
        starts = range(0, numel, step)
        for j, start in enumerate(starts):
            blocks.append(_Block(key, start, min(numel, start + step), (-1, *shape[1:]), j == 0, j == len(starts) - 1))
    return blocks


def _read_block(readers, names, b: _Block) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    ref = readers["__base__"]
    base_t = ref.get_flat(b.key, b.start, b.stop).reshape(b.view)
    experts = [readers[n].get_flat(b.key, b.start, b.stop).reshape(b.view) if b.key in readers[n] else None
               for n in names]
    return base_t, experts


def _merge_blocks(keys, readers, names, spec, p, weights, stats, emit, chunk_elements,
                  per_tensor: Mapping[str, tuple[Any, list[float]]] | None = None) -> Iterator[str]:
    """Merge every tensor, block by block; ``emit(block, base_block, merged_block)`` takes each result.

    ``per_tensor``: tensor name → its own (parameters, weights), where they vary by tensor (mergekit's
    gradients and filters); else every tensor has ``p`` and ``weights``.
    Yields each tensor's name once all of it has been handed on.
    """
    ref = readers["__base__"]
    blocks = _plan_blocks(keys, ref, spec, p, chunk_elements, per_tensor)
    pk, wk = p, weights
    # (reading the next block on a second thread while merging this one was measured: no faster on
    # 2 cores, where torch's own threads already keep both busy, and it holds one more block)
    ctx, checked = None, set()
    for b in blocks:
        base_t, expert_ts = _read_block(readers, names, b)
        dtype = ref.dtype(b.key)
        if not dtype.is_floating_point:
            # integer buffers (e.g. position ids) are not weights: they must agree, and are copied
            for n, t in zip(names, expert_ts, strict=True):
                if t is not None and not torch.equal(t, base_t):
                    raise MergeError(f"expert {n!r}: integer tensor {b.key!r} differs from the base's")
            emit(b, base_t, base_t)
            yield b.key
            continue
        if b.first:  # per-tensor statistics are needed only when the tensor comes in pieces
            pk, wk = per_tensor[b.key] if per_tensor else (p, weights)
            ctx, checked = _tensor_context(b.key, readers, names, spec, pk, stats, whole=b.last)
        for who, t in (("base", base_t), *zip(names, expert_ts, strict=True)):
            if who not in checked:
                _check_finite(t, who, b.key)
        merged = spec.fn(base_t if spec.needs_base else None, expert_ts, wk, pk,
                         replace(ctx, start=b.start) if b.start else ctx)
        _check_merged(merged, b.key, spec.name)
        emit(b, base_t, merged)
        del base_t, expert_ts, merged
        if b.last:
            yield b.key


def _tensor_context(key, readers, names, spec, p, stats, whole: bool) -> tuple[TensorContext, set[str]]:
    """The tensor's context, with the method's per-tensor statistics (the inputs they checked).

    A tensor merged whole gets none: the method computes them from the tensors it is given.
    """
    ctx = TensorContext(key=key, stats=stats, experts=tuple(names))
    checked: set[str] = set()  # inputs already checked for NaN/Inf in full
    if spec.tensor_stats is None or whole:
        return ctx, checked
    ref = readers["__base__"]
    whole_base: list[torch.Tensor] = []

    def task_vector(i: int) -> torch.Tensor:
        if not whole_base:
            whole_base.append(ref.get(key).float())
            _check_finite(whole_base[0], "base", key)
            checked.add("base")
        e = readers[names[i]].get(key)  # a fresh buffer: the task vector may be formed in place
        _check_finite(e, names[i], key)
        checked.add(names[i])
        return e.sub_(whole_base[0]) if e.dtype == torch.float32 else e.float() - whole_base[0]

    def model(i: int) -> torch.Tensor:  # an input itself, for methods that merge the models (not task vectors)
        e = readers[names[i]].get(key)
        _check_finite(e, names[i], key)
        checked.add(names[i])
        return e.float()

    def base() -> torch.Tensor:  # the base itself (a fresh buffer)
        b = ref.get(key).float()
        _check_finite(b, "base", key)
        checked.add("base")
        return b

    task_vector.model = model  # type: ignore[attr-defined]
    task_vector.base = base  # type: ignore[attr-defined]
    return replace(ctx, local=spec.tensor_stats(task_vector, p, names, key)), checked


class _StateReader:
    """The reader interface of :class:`TensorReader` over tensors held in memory."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._t = tensors

    def keys(self) -> list[str]:
        return list(self._t)

    def __contains__(self, key: str) -> bool:
        return key in self._t

    def dtype(self, key: str) -> torch.dtype:
        return self._t[key].dtype

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._t[key].shape)

    def numel(self, key: str) -> int:
        return self._t[key].numel()

    def nbytes(self, key: str) -> int:
        return self._t[key].numel() * self._t[key].element_size()

    def get(self, key: str) -> torch.Tensor:
        return self._t[key].clone()  # a fresh buffer, as a file read gives: methods may work in place

    def get_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._t[key].reshape(-1)[start:stop].clone()

    def close(self) -> None:
        pass


def split_keys(keys: list[str], numels: list[int], parts: int) -> list[list[str]]:
    """``keys`` cut into ``parts`` runs of consecutive tensors of about equal size; a tensor larger than a part
    leaves the part it spans empty (any part may be empty, the first too: the heads travel with it all the same)."""
    total, out, acc = sum(numels), [[] for _ in range(parts)], 0
    for key, n in zip(keys, numels, strict=True):
        # a tensor goes to the part its middle element falls in
        out[min(parts - 1, int((acc + n / 2) * parts // max(1, total)))].append(key)
        acc += n
    return out
