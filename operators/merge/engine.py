"""The streaming merge engine: checkpoints in, one merged checkpoint out, one tensor at a time.

1. Check before writing anything: same architecture (config), same tensor names, shapes and
   dtypes in the base and every expert, readable shards, valid parameters.
2. For every body tensor: read it from the base and each expert (``pread``, no memory map), merge
   it with the method's pure function in float32, cast, and append it to its planned output shard.
   Element-wise methods (linear, task arithmetic, TIES, consensus, row-wise breadcrumbs) get large
   matrices in row blocks of ``CHUNK_ELEMENTS``; the others get whole tensors.
3. Copy each expert's task head, the base's config and tokenizer; write provenance.

Peak memory stays near (experts + 2) × one row block (whole tensor for methods that need it, plus
one task vector for per-tensor statistics such as TIES' per-tensor top-k); output shards are
streamed to disk, never buffered.
The output appears under ``out_dir`` only when complete: it is written to a hidden sibling
directory and renamed into place; a failure removes the partial directory.
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from operators.checkpoint import (
    HEADS_DIR,
    AdapterCheckpoint,
    StateCheckpoint,
    copy_head,
    copy_tokenizer,
    head_names,
    write_provenance,
)
from operators.errors import MergeError
from operators.lora import (
    LoraAdapter,
    LoraDeltaReader,
    check_same_task_type,
    is_adapter_dir,
    read_adapter,
)
from operators.merge.lora_adapter import AdapterBuilder, linear_coefficients
from operators.merge.registry import MergeMethod, ModelStream, TensorContext, get_method, resolve_weights
from operators.tensor_io import ShardedWriter, TensorReader

# element-wise merges of large matrices go in row blocks of about this many elements (4 MiB per input
# in float32: measured as fast as 16 MiB blocks, with 100 MiB less peak memory on a 134M model)
CHUNK_ELEMENTS = 1024 * 1024

# config.json keys that do not change the architecture
_CONFIG_NOISE = {"_name_or_path", "transformers_version", "architectures", "id2label", "label2id",
                 "num_labels", "problem_type", "torch_dtype", "dtype", "finetuning_task"}


@dataclass
class MergeReport:
    """What a merge did (also written into the output's provenance)."""

    method: str
    params: dict[str, Any]
    experts: list[str]
    weights: list[float]
    tensors: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    heads: list[str] = field(default_factory=list)
    output_files: list[str] = field(default_factory=list)
    # LoRA experts: "exact" (a full checkpoint) or "adapter" (one peft adapter); None without adapters
    lora_mode: str | None = None
    adapter_rank: int | None = None  # the written adapter's r
    adapter_error: float | None = None  # ‖ΔW − BA‖_F / ‖ΔW‖_F over every adapted module
    adapter_worst_module_error: float | None = None
    adapter_worst_module: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary directory beside ``out_dir``; rename it to ``out_dir`` on success.

    Raises:
        MergeError: if ``out_dir`` already exists and is not empty (nothing is overwritten).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise MergeError(f"{out_dir}: output directory exists and is not empty; choose a new path or remove it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _arch(config_path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise MergeError(f"{config_path.parent}: no config.json; is this a Hugging Face checkpoint?") from None
    except json.JSONDecodeError as exc:
        raise MergeError(f"{config_path}: not valid JSON ({exc}); re-save the checkpoint's config") from None
    return {k: v for k, v in cfg.items() if k not in _CONFIG_NOISE}


def check_compatible(base: Path, experts: Mapping[str, Path], readers: Mapping[str, TensorReader],
                     config_dirs: Mapping[str, Path] | None = None) -> None:
    """Raise :class:`MergeError` naming the first difference between the base and an expert.

    ``config_dirs`` gives, per expert, the directory whose ``config.json`` describes it (a LoRA
    expert's is its base's; default: the expert's own directory).
    """
    base_arch = _arch(base / "config.json")
    ref = readers["__base__"]
    ref_keys = set(ref.keys())
    for name, path in experts.items():
        arch = _arch((config_dirs or {}).get(name, path) / "config.json")
        # transformers versions add or drop default keys when saving; compare what both declare
        # (tensor names, shapes and dtypes are compared one by one below)
        diff = sorted(k for k in set(base_arch) & set(arch) if base_arch[k] != arch[k])
        if base_arch.get("model_type") != arch.get("model_type"):
            diff = ["model_type", *diff]
        if diff:
            k = diff[0]
            raise MergeError(
                f"expert {name!r} ({path}) has a different architecture from the base: config.json "
                f"{k}={arch.get(k)!r} vs base {base_arch.get(k)!r} ({len(diff)} keys differ). "
                "Experts must be fine-tuned from the same base model."
            )
        keys = set(readers[name].keys())
        # integer buffers (e.g. position_ids) are not weights; some transformers versions stop
        # saving them, so an expert may lack one its base has: the base's copy is used
        missing = sorted(k for k in ref_keys - keys if ref.dtype(k).is_floating_point)
        extra = sorted(k for k in keys - ref_keys if readers[name].dtype(k).is_floating_point)
        if missing or extra:
            raise MergeError(
                f"expert {name!r} ({path}) does not have the base's tensors: "
                f"missing {missing[:3]}{'...' if len(missing) > 3 else ''} ({len(missing)}), "
                f"extra {extra[:3]}{'...' if len(extra) > 3 else ''} ({len(extra)}). "
                "Experts must share the base's architecture and parameter names."
            )
        for key in sorted(ref_keys & keys):
            if readers[name].shape(key) != ref.shape(key):
                raise MergeError(
                    f"expert {name!r}: tensor {key!r} has shape {list(readers[name].shape(key))}, "
                    f"base has {list(ref.shape(key))}"
                )
            if readers[name].dtype(key) != ref.dtype(key):
                raise MergeError(
                    f"expert {name!r}: tensor {key!r} has dtype {readers[name].dtype(key)}, base has "
                    f"{ref.dtype(key)}. Convert the checkpoints to one dtype first."
                )


def _check_finite(t: torch.Tensor, who: str, key: str) -> None:
    # fast path: one sum (NaN/Inf make it non-finite); only a non-finite sum, which huge finite
    # values could also give, pays for the exact element-wise check
    if t.is_floating_point() and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise MergeError(f"{who}: tensor {key!r} has {bad} NaN/Inf values; the checkpoint is broken, re-create it")


def merge_checkpoints(
    base: str | Path,
    experts: Mapping[str, str | Path],
    method: str,
    params: dict[str, Any] | None,
    out_dir: str | Path,
    *,
    max_shard_bytes: int = 2 * 1024**3,
    provenance: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    out_dtype: torch.dtype | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
    heads_from: str | Path | None = None,
    adapter_bases: Mapping[str, str | Path] | None = None,
    lora_mode: Literal["exact", "adapter"] = "exact",
    adapter_rank: int | None = None,
    adapter_factorization: Literal["svd", "concat"] = "svd",
) -> MergeReport:
    """Merge the experts' bodies with ``method``; keep each expert's task head.

    An expert may be a peft LoRA adapter directory: it is merged as its full weights, its base's
    plus ``ΔW = B·A·scaling`` (exactly, row block by row block; see ``operators.lora``).

    Args:
        base: The base checkpoint θ_0 (its config and tokenizer are copied to the output).
        experts: Expert name (= task name) → checkpoint directory.
        method: A registered merge method (see ``MERGE_METHODS``).
        params: The method's parameters (validated here).
        out_dir: Output directory; must not exist yet (or be empty).
        max_shard_bytes: Output shard size.
        provenance: Extra fields for the output's ``mergeflow.json`` (parents, round, ...).
        progress: Called as ``progress(done, total)`` after each tensor.
        out_dtype: Floating-point dtype of the output (default: each tensor's input dtype).
        chunk_elements: Element-wise methods merge matrices in row blocks of about this many elements.
        heads_from: A mergeflow checkpoint whose task heads are kept for tasks no expert brings
            (ColD Fusion's shared model keeps every task's latest head).
        adapter_bases: Expert name → the checkpoint its LoRA adapter was trained from (default:
            ``base``; in ATM with task vectors from the original base, the round's start model).
        lora_mode: ``exact`` writes a full checkpoint (any method). ``adapter`` (every expert an
            adapter) writes one peft adapter over ``base`` holding the merged ΔW of each targeted
            module; tensors no adapter targets must merge to the base.
        adapter_rank: Adapter mode, svd: the output rank (default: per module the sum of the
            experts' ranks, capped by the matrix dimensions).
        adapter_factorization: Adapter mode: ``svd`` (any method; error measured and reported) or
            ``concat`` (the experts' factors stacked: exact, for linear and task_arithmetic only).

    Returns:
        A :class:`MergeReport`.

    Raises:
        MergeError / CheckpointError / ValueError: for any input problem. Structure, headers and
            parameters are checked before anything is written; NaN/Inf values are found as each
            tensor is read, and then the partial output is removed (nothing is left behind).
    """
    start = time.perf_counter()
    spec = get_method(method)
    p = spec.parse_params(params)
    if not experts:
        raise MergeError("no experts to merge; give at least one expert checkpoint")
    names = sorted(experts)  # a fixed order: the result must not depend on the caller's order
    weights = resolve_weights(p, names)
    base = Path(base)
    paths = {n: Path(experts[n]) for n in names}
    adapters = {n: read_adapter(paths[n]) for n in names if is_adapter_dir(paths[n])}
    lora_bases = _check_lora_args(base, names, adapters, adapter_bases, lora_mode, adapter_rank,
                                  adapter_factorization, out_dtype)
    coefficients = None
    if lora_mode == "adapter" and adapter_factorization == "concat":
        coefficients = linear_coefficients(spec, p, weights, names)

    readers: dict[str, TensorReader | LoraDeltaReader] = {}
    try:
        readers["__base__"] = TensorReader(base)
        for n in names:
            readers[n] = LoraDeltaReader(adapters[n], lora_bases[n]) if n in adapters else TensorReader(paths[n])
        check_compatible(base, paths, readers, config_dirs=lora_bases)
        heads = _plan_heads(paths)

        report = MergeReport(method=method, params=p.model_dump(mode="json"), experts=names, weights=weights,
                             lora_mode=lora_mode if adapters else None)
        lora_record = _lora_provenance(adapters, lora_bases, lora_mode, adapter_factorization) if adapters else {}
        keys = readers["__base__"].keys()
        stats = _prepare(spec, p, keys, readers, names)
        if lora_mode == "adapter":
            builder = AdapterBuilder(adapters, {n: readers[n].targets for n in names}, adapter_factorization,
                                     adapter_rank, coefficients, method)
            return _merge_to_adapter(base, keys, readers, names, spec, p, weights, stats, chunk_elements, out_dir,
                                     builder, adapters, paths, heads, heads_from, report, progress, provenance,
                                     lora_record, start)
        with atomic_output_dir(out_dir) as tmp:
            _write_merged(tmp, keys, readers, names, spec, p, weights, stats, chunk_elements, out_dtype,
                          max_shard_bytes, report, progress)
            _write_config(base / "config.json", tmp / "config.json", out_dtype)
            copy_tokenizer(base, tmp)
            report.heads = _copy_heads(heads, paths, heads_from, tmp)
            report.seconds = time.perf_counter() - start
            write_provenance(tmp, {
                "kind": "merged",
                "method": method,
                "params": report.params,
                "weights": dict(zip(names, weights, strict=True)),
                "base": str(base),
                "experts": {n: str(paths[n]) for n in names},
                **lora_record,
                **(provenance or {}),
            })
        return report
    finally:
        for r in readers.values():
            r.close()


def _prepare(spec: MergeMethod, p: Any, keys: list[str], readers: Mapping[str, Any], names: list[str]) -> Any:
    """The method's whole-model statistics: a first streaming pass over the floating-point tensors (None for a
    method without one)."""
    if spec.prepare is None:
        return None
    ref = readers["__base__"]
    float_keys = [k for k in keys if ref.dtype(k).is_floating_point]
    return spec.prepare(ModelStream(float_keys, lambda k: (ref.get(k), [readers[n].get(k) for n in names])), p, names)


def _write_merged(tmp: Path, keys: list[str], readers: Mapping[str, Any], names: list[str], spec: MergeMethod, p: Any,
                  weights: list[float], stats: Any, chunk_elements: int, out_dtype: torch.dtype | None,
                  max_shard_bytes: int, report: MergeReport, progress: Callable[[int, int], None] | None) -> None:
    """Merge every tensor block by block into sharded safetensors in ``tmp``, written by a background thread."""
    ref = readers["__base__"]
    plan = [(k, (out_dtype or ref.dtype(k)) if ref.dtype(k).is_floating_point else ref.dtype(k), ref.shape(k))
            for k in keys]
    writer = ShardedWriter(tmp, plan, max_shard_bytes=max_shard_bytes, metadata={"merge_method": spec.name})
    with _BackgroundWriter(writer) as out:
        def emit(b: _Block, base_t: torch.Tensor, merged: torch.Tensor) -> None:
            out.write(b.key, merged.to(out_dtype or ref.dtype(b.key)) if merged.is_floating_point() else merged)

        for key in _merge_blocks(keys, readers, names, spec, p, weights, stats, emit, chunk_elements):
            report.bytes_read += ref.nbytes(key) * (1 + sum(key in readers[n] for n in names))
            report.tensors += 1
            if progress is not None:
                progress(report.tensors, len(keys))
    report.output_files = writer.close()
    report.bytes_written = writer.bytes_written


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


def merge_states(
    base: StateCheckpoint,
    experts: Mapping[str, StateCheckpoint | AdapterCheckpoint],
    method: str,
    params: dict[str, Any] | None,
    *,
    heads_from: StateCheckpoint | None = None,
    adapter_bases: Mapping[str, StateCheckpoint] | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
    part: tuple[int, int] | None = None,
) -> tuple[StateCheckpoint, MergeReport]:
    """:func:`merge_checkpoints` over checkpoints held in memory (resident workers' rounds).

    The same method functions over the same blocks in the same order, so the merged tensors are
    bit for bit those ``merge_checkpoints`` writes for the same inputs; nothing touches a disk.
    Each expert keeps its own task's head; ``heads_from`` gives the heads of tasks no expert brings.
    A LoRA expert (:class:`AdapterCheckpoint`) is merged as its full weights, exactly as
    ``merge_checkpoints`` merges an adapter directory (lora_mode ``exact``): its start checkpoint
    (``adapter_bases``, default ``base``) plus ``B·A·scaling``, row block by row block.

    ``part=(i, n)``: only the i-th of n runs of consecutive tensors (:func:`split_keys`; the heads
    with part 0), so that n workers merge one model together. A tensor's merge depends on that tensor
    alone for methods without a whole-model pass (``prepare``), so the parts, put together, are the
    whole merge bit for bit; a method with one refuses.
    """
    start = time.perf_counter()
    spec = get_method(method)
    p = spec.parse_params(params)
    if not experts:
        raise MergeError("no experts to merge; give at least one expert checkpoint")
    names = sorted(experts)
    weights = resolve_weights(p, names)
    adapters = {n: experts[n].lora(f"memory:{n}") for n in names if isinstance(experts[n], AdapterCheckpoint)}
    unknown = sorted(set(adapter_bases or {}) - set(adapters))
    if unknown:
        raise MergeError(f"adapter_bases: {unknown[0]!r} is not a LoRA expert; give bases for LoRA experts only")
    if adapters:
        check_same_task_type(adapters)
    readers: dict[str, Any] = {"__base__": _StateReader(base.body)}
    for n in names:
        if n in adapters:
            start_state = (adapter_bases or {}).get(n, base)
            readers[n] = LoraDeltaReader(adapters[n], _StateReader(start_state.body), base_name=f"{n}'s start model")
        else:
            readers[n] = _StateReader(experts[n].body)
    ref, keys = readers["__base__"], list(base.body)
    if part is not None and spec.prepare is not None and part[1] > 1:
        raise MergeError(f"{method}: its merge of each tensor needs a pass over the whole model first; it cannot be "
                         "merged in parts (merge it whole)")
    _check_states(readers, names, keys)
    report = MergeReport(method=method, params=p.model_dump(mode="json"), experts=names, weights=weights)
    stats = _prepare(spec, p, keys, readers, names)
    pieces: dict[str, list[torch.Tensor]] = {}

    def emit(b: _Block, base_t: torch.Tensor, merged: torch.Tensor) -> None:
        pieces.setdefault(b.key, []).append(merged.to(ref.dtype(b.key)) if merged.is_floating_point() else merged)

    body = {}
    if part is not None:
        keys = split_keys(keys, [ref.numel(k) for k in keys], part[1])[part[0]]
    for key in _merge_blocks(keys, readers, names, spec, p, weights, stats, emit, chunk_elements):
        parts = pieces.pop(key)
        body[key] = (parts[0] if len(parts) == 1 else torch.cat([t.reshape(-1) for t in parts])).reshape(ref.shape(key))
        report.tensors += 1
    heads = _state_heads(experts, names, heads_from) if part is None or part[0] == 0 else {}
    report.heads = sorted(heads)
    report.lora_mode = "exact" if adapters else None
    report.seconds = time.perf_counter() - start
    return StateCheckpoint(base.files, body, heads, causal_lm=base.causal_lm), report


def _check_states(readers: Mapping[str, Any], names: list[str], keys: list[str]) -> None:
    """The checks :func:`check_compatible` makes of files, on tensors held in memory."""
    ref = readers["__base__"]
    for n in names:
        missing = sorted(k for k in keys if k not in readers[n] and ref.dtype(k).is_floating_point)
        bad = next((k for k in keys if k in readers[n] and (readers[n].shape(k), readers[n].dtype(k))
                    != (ref.shape(k), ref.dtype(k))), None)
        if missing or bad or set(readers[n].keys()) - set(keys):
            raise MergeError(f"expert {n!r} does not have the base's tensors (missing {missing[:3]}, first mismatch "
                             f"{bad!r}); experts must be fine-tuned from the same base model")


def _state_heads(experts: Mapping[str, StateCheckpoint | AdapterCheckpoint], names: list[str],
                 heads_from: StateCheckpoint | None) -> dict[str, tuple[dict[str, torch.Tensor], str]]:
    """Each expert's own task's head (or every head it carries), then ``heads_from``'s for the other tasks."""
    heads: dict[str, tuple[dict[str, torch.Tensor], str]] = {}
    for n in names:
        own = [n] if n in experts[n].heads else list(experts[n].heads)
        for task in own:
            if task in heads:
                raise MergeError(f"two experts carry a head for task {task!r}; name each expert after its task")
            heads[task] = experts[n].heads[task]
    if heads_from is not None:
        heads |= {t: h for t, h in heads_from.heads.items() if t not in heads}
    return heads


def split_keys(keys: list[str], numels: list[int], parts: int) -> list[list[str]]:
    """``keys`` cut into ``parts`` runs of consecutive tensors of about equal size; a tensor larger than a part
    leaves the part it spans empty (any part may be empty, the first too: the heads travel with it all the same)."""
    total, out, acc = sum(numels), [[] for _ in range(parts)], 0
    for key, n in zip(keys, numels, strict=True):
        # a tensor goes to the part its middle element falls in
        out[min(parts - 1, int((acc + n / 2) * parts // max(1, total)))].append(key)
        acc += n
    return out


def _check_lora_args(base: Path, names: list[str], adapters: Mapping[str, LoraAdapter],
                     adapter_bases: Mapping[str, str | Path] | None, lora_mode: str, adapter_rank: int | None,
                     factorization: str, out_dtype: torch.dtype | None) -> dict[str, Path]:
    """Validate the LoRA arguments; return each adapter expert's base checkpoint."""
    if lora_mode not in ("exact", "adapter"):
        raise MergeError(f"lora_mode: {lora_mode!r} is not a LoRA merge mode; use 'exact' (a full checkpoint) or "
                         "'adapter' (one peft adapter)")
    if factorization not in ("svd", "concat"):
        raise MergeError(f"adapter_factorization: {factorization!r} is not known; use 'svd' or 'concat'")
    if adapter_rank is not None and (isinstance(adapter_rank, bool) or not isinstance(adapter_rank, int)
                                     or adapter_rank < 1):
        raise MergeError(f"adapter_rank: {adapter_rank!r} must be a positive integer (or left out: the sum of the "
                         "experts' ranks)")
    if adapter_rank is not None and (lora_mode != "adapter" or factorization != "svd"):
        raise MergeError(f"adapter_rank: {adapter_rank} applies to lora_mode 'adapter' with svd only (concat's rank is "
                         "the sum of the experts' ranks; exact mode writes full weights); leave it out")
    unknown = sorted(set(adapter_bases or {}) - set(adapters))
    if unknown:
        what = "is not an expert" if unknown[0] not in names else "is not a LoRA adapter directory"
        raise MergeError(f"adapter_bases: {unknown[0]!r} {what}; give bases for LoRA experts only "
                         f"(adapters: {', '.join(sorted(adapters)) or 'none'})")
    if lora_mode == "adapter":
        full = [n for n in names if n not in adapters]
        if full:
            raise MergeError(f"lora_mode 'adapter': expert {full[0]!r} is a full checkpoint, not a LoRA adapter; "
                             "adapter mode needs every expert to be an adapter (use lora_mode: exact)")
        if out_dtype is not None:
            raise MergeError(f"out_dtype {out_dtype}: applies to full checkpoints; an adapter-mode output keeps the "
                             "adapters' dtype (leave dtype out, or use lora_mode: exact)")
    if adapters:
        check_same_task_type(dict(adapters))
    return {n: Path((adapter_bases or {}).get(n, base)) for n in adapters}


def _lora_provenance(adapters: Mapping[str, LoraAdapter], bases: Mapping[str, Path], lora_mode: str,
                     factorization: str) -> dict[str, Any]:
    return {"lora": {
        "mode": lora_mode,
        **({"factorization": factorization} if lora_mode == "adapter" else {}),
        "adapters": {n: {"base": str(bases[n]), "task_type": a.task_type,
                         "ranks": sorted(set(a.ranks.values())), "modules": len(a.modules),
                         "use_rslora": bool(a.config.get("use_rslora"))} for n, a in sorted(adapters.items())},
    }}


def _merge_to_adapter(base, keys, readers, names, spec, p, weights, stats, chunk_elements, out_dir,
                      builder: AdapterBuilder, adapters, paths, heads, heads_from, report: MergeReport, progress,
                      provenance, lora_record, start) -> MergeReport:
    """Adapter mode: merge exactly, in float32, and hand each block to ``builder`` instead of a writer."""
    with atomic_output_dir(out_dir) as tmp:
        def emit(b: _Block, base_t: torch.Tensor, merged: torch.Tensor) -> None:
            builder.add(b.key, base_t, merged, b.last)

        ref = readers["__base__"]
        for key in _merge_blocks(keys, readers, names, spec, p, weights, stats, emit, chunk_elements):
            report.bytes_read += ref.nbytes(key) * (1 + sum(key in readers[n] for n in names))
            report.tensors += 1
            if progress is not None:
                progress(report.tensors, len(keys))
        res = builder.write(tmp, adapters[names[0]].config, base)
        report.output_files = sorted(f.name for f in tmp.iterdir())
        report.bytes_written = sum(f.stat().st_size for f in tmp.iterdir())
        report.adapter_rank = res.rank
        report.adapter_error = res.error
        report.adapter_worst_module = res.worst_module
        report.adapter_worst_module_error = res.worst_module_error
        copy_tokenizer(base, tmp)
        report.heads = _copy_heads(heads, paths, heads_from, tmp)
        report.seconds = time.perf_counter() - start
        lora_record["lora"].update(
            rank=res.rank, modules=res.modules, error=res.error, worst_module=res.worst_module,
            worst_module_error=res.worst_module_error, module_errors=res.module_errors,
            **({"svd_algorithms": res.svd_algorithms} if res.svd_algorithms else {}),
            factorization_seconds=round(res.seconds, 3),
            error_definition="relative Frobenius norm ||dW - B A||_F / ||dW||_F of the merged update dW "
                             "(merged - base), measured on the written factors; 'error' over all modules together")
        write_provenance(tmp, {
            "kind": "merged",
            "format": "peft_adapter",
            "method": report.method,
            "params": report.params,
            "weights": dict(zip(names, weights, strict=True)),
            "base": str(base),
            "experts": {n: str(paths[n]) for n in names},
            **lora_record,
            **(provenance or {}),
        })
    return report


@dataclass(frozen=True)
class _Block:
    """A piece of one tensor to merge: elements start:stop of the flattened tensor."""

    key: str
    start: int
    stop: int
    view: tuple[int, ...]
    first: bool
    last: bool


def _plan_blocks(keys, ref: TensorReader, spec, p, chunk_elements: int) -> list[_Block]:
    """Whole tensors, except large matrices of element-wise methods: row blocks of ~chunk_elements."""
    blocks = []
    for key in keys:
        shape, numel = ref.shape(key), ref.numel(key)
        pieces = ref.dtype(key).is_floating_point and len(shape) >= 2 and numel > chunk_elements and spec.chunkable(p)
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


def _merge_blocks(keys, readers, names, spec, p, weights, stats, emit, chunk_elements) -> Iterator[str]:
    """Merge every tensor, block by block; ``emit(block, base_block, merged_block)`` takes each result.

    Yields each tensor's name once all of it has been handed on.
    """
    ref = readers["__base__"]
    blocks = _plan_blocks(keys, ref, spec, p, chunk_elements)
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
            ctx, checked = _tensor_context(b.key, readers, names, spec, p, stats, whole=b.last)
        for who, t in (("base", base_t), *zip(names, expert_ts, strict=True)):
            if who not in checked:
                _check_finite(t, who, b.key)
        merged = spec.fn(base_t if spec.needs_base else None, expert_ts, weights, p, ctx)
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

    return replace(ctx, local=spec.tensor_stats(task_vector, p, names)), checked


class _BackgroundWriter:
    """Hands tensors to a :class:`ShardedWriter` on a thread, so disk writes overlap merging."""

    def __init__(self, writer: ShardedWriter, depth: int = 2):
        self._writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mergeflow-write", daemon=True)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._writer.write(*item)
                except BaseException as exc:  # surfaced in the merging thread
                    self._error = exc

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((key, tensor))

    def __enter__(self) -> _BackgroundWriter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None and exc[0] is None:
            raise self._error


def _write_config(src: Path, dst: Path, out_dtype: torch.dtype | None) -> None:
    if out_dtype is None:
        shutil.copy2(src, dst)
        return
    cfg = json.loads(src.read_text())
    name = str(out_dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in cfg or key == "dtype":
            cfg[key] = name
    dst.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _copy_heads(heads: list[tuple[str, str]], paths: Mapping[str, Path], heads_from: str | Path | None,
                out: Path) -> list[str]:
    """Copy each planned expert head into ``out``, then ``heads_from``'s heads of the other tasks.

    Returns:
        The tasks whose heads the output carries, sorted.
    """
    for expert_name, task in heads:
        copy_head(paths[expert_name], out, task)
    carried = []
    if heads_from is not None:
        carried = [t for t in head_names(heads_from) if t not in {task for _, task in heads}]
        for task in carried:
            copy_head(Path(heads_from), out, task)
    return sorted([t for _, t in heads] + carried)


def _plan_heads(paths: Mapping[str, Path]) -> list[tuple[str, str]]:
    """Which head to take from which expert: its own task's head, else all it carries (no clashes)."""
    plan: dict[str, str] = {}
    for name, path in paths.items():
        available = head_names(path)
        chosen = [name] if name in available else available
        for task in chosen:
            if task in plan:
                raise MergeError(
                    f"two experts carry a head for task {task!r} ({plan[task]!r} and {name!r}); "
                    "name each expert after its task"
                )
            plan[task] = name
    return [(expert, task) for task, expert in sorted(plan.items())]


__all__ = ["HEADS_DIR", "MergeError", "MergeReport", "atomic_output_dir", "check_compatible", "merge_checkpoints",
           "merge_states"]
