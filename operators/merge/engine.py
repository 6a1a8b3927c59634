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

Here: the two entry points, :func:`merge_checkpoints` (files) and :func:`merge_states` (checkpoints held
in memory), and :class:`MergeReport`. The checks are in ``compat``, the block-by-block merge in
``blocks``, the output directory and shard writer in ``output``, the task heads in ``heads``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from operators.checkpoint_files import HEADS_DIR, copy_tokenizer, write_provenance
from operators.errors import MergeError
from operators.lora import LoraAdapter, LoraDeltaReader, check_same_task_type, is_adapter_dir, read_adapter
from operators.merge import split
from operators.merge.blocks import (
    CHUNK_ELEMENTS,
    _Block,
    _merge_blocks,
    _prepare,
    _StateReader,
    cast_checked,
    split_keys,
)
from operators.merge.compat import _check_lora_args, _check_states, check_compatible
from operators.merge.heads import _copy_heads, _plan_heads, _state_heads
from operators.merge.lora_adapter import AdapterBuilder, linear_coefficients
from operators.merge.output import (
    _BackgroundWriter,
    _write_config_and_tokenizer,
    atomic_output_dir,
    output_plan,
)
from operators.merge.registry import MergeMethod, get_method, resolve_weights
from operators.merge.vocab import VocabPlan, aligned_readers
from operators.state import AdapterCheckpoint, StateCheckpoint
from operators.tensor_io import ShardedWriter, TensorReader


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
    tensor_params: Callable[[str], Mapping[str, Any]] | None = None,
    vocab: VocabPlan | None = None,
    part: tuple[int, int] | None = None,
    whole_model_stats: Any = None,
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
        tensor_params: Tensor name → that tensor's parameters, where they vary by tensor (a mergekit
            config's gradients and filters, see ``operators.merge.schedule``); ``params`` is then the
            parameters reported for the merge as a whole. Every tensor's are checked before anything
            is written; the provenance lists each distinct set with its tensors.
        vocab: Models with different vocabularies (:func:`operators.merge.vocab.plan_vocab`): every model's
            token-indexed tensors laid out in the plan's output vocabulary first; the plan's tokenizer and
            ``vocab_size`` are written (lora mode exact).
        part: ``(i, n)``: write only part i of n of the output, for n workers that merge one model together
            (:mod:`operators.merge.split`): the whole output shards the split assigns to part i, and a
            ``part.json`` naming them; no index, config, tokenizer or heads (:func:`~operators.merge.split.
            assemble_parts` writes those once every part is in). Shards are then at most
            :func:`~operators.merge.split.part_shard_bytes` so that every part gets some.
        whole_model_stats: A part's method's whole-model pass (TIES' model-wide top-k thresholds, ...), computed
            once for every part by :func:`whole_model_statistics`, so that a part reads only its own tensors;
            None: computed here (reading the whole model).

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
    try:
        spec.check_expert_count(len(experts))
    except ValueError as exc:
        raise MergeError(str(exc)) from None
    names = sorted(experts)  # a fixed order: the result must not depend on the caller's order
    weights = resolve_weights(p, names)
    base = Path(base)
    paths = {n: Path(experts[n]) for n in names}
    adapters = {n: read_adapter(paths[n]) for n in names if is_adapter_dir(paths[n])}
    lora_bases = _check_lora_args(base, names, adapters, adapter_bases, lora_mode, adapter_rank,
                                  adapter_factorization, out_dtype)
    _check_exact_only(method, lora_mode, tensor_params, vocab)
    coefficients = None
    if lora_mode == "adapter" and adapter_factorization == "concat":
        coefficients = linear_coefficients(spec, p, weights, names)

    readers: dict[str, TensorReader | LoraDeltaReader] = {}
    try:
        readers["__base__"] = TensorReader(base)
        for n in names:
            readers[n] = LoraDeltaReader(adapters[n], lora_bases[n]) if n in adapters else TensorReader(paths[n])
        if vocab is not None:
            readers = aligned_readers(vocab, readers)
        check_compatible(base, paths, readers, config_dirs=lora_bases,
                         ignore=frozenset({"vocab_size"}) if vocab is not None else frozenset())
        heads = _plan_heads(paths)

        report = MergeReport(method=method, params=p.model_dump(mode="json"), experts=names, weights=weights,
                             lora_mode=lora_mode if adapters else None)
        lora_record = _lora_provenance(adapters, lora_bases, lora_mode, adapter_factorization) if adapters else {}
        keys = readers["__base__"].keys()
        per_tensor = _per_tensor_params(spec, tensor_params, keys, names) if tensor_params is not None else None
        stats = whole_model_stats if whole_model_stats is not None else _prepare(spec, p, keys, readers, names)
        if per_tensor is not None and stats is not None:
            raise MergeError(f"{method}: these parameters need a pass over the whole model before merging, which "
                             "parameters that vary by tensor (gradients, filters) cannot have; give one value per "
                             "parameter")
        if part is not None:
            return _merge_part(out_dir, part, keys, readers, names, spec, p, weights, stats, chunk_elements, out_dtype,
                               max_shard_bytes, report, progress, lora_mode == "adapter" or per_tensor is not None
                               or vocab is not None, start)
        if lora_mode == "adapter":
            builder = AdapterBuilder(adapters, {n: readers[n].targets for n in names}, adapter_factorization,
                                     adapter_rank, coefficients, method)
            return _merge_to_adapter(base, keys, readers, names, spec, p, weights, stats, chunk_elements, out_dir,
                                     builder, adapters, paths, heads, heads_from, report, progress, provenance,
                                     lora_record, start)
        with atomic_output_dir(out_dir) as tmp:
            _write_merged(tmp, keys, readers, names, spec, p, weights, stats, chunk_elements, out_dtype,
                          max_shard_bytes, report, progress, per_tensor)
            _write_config_and_tokenizer(base, tmp, out_dtype, vocab)
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
                **({"tensor_params": _params_record(per_tensor)} if per_tensor is not None else {}),
                **({"vocabulary": vocab.record()} if vocab is not None else {}),
                **(provenance or {}),
            })
        return report
    finally:
        for r in readers.values():
            r.close()


def whole_model_statistics(base: str | Path, experts: Mapping[str, str | Path], method: str,
                           params: dict[str, Any] | None, *, adapter_bases: Mapping[str, str | Path] | None = None) -> Any:
    """A method's whole-model pass alone (None for a method without one, or whose parameters need none): what
    every part of a split merge would otherwise compute for itself, reading the whole model (``whole_model_stats``
    of :func:`merge_checkpoints`)."""
    spec = get_method(method)
    p = spec.parse_params(params)
    if spec.prepare is None:
        return None
    names = sorted(experts)
    paths = {n: Path(experts[n]) for n in names}
    adapters = {n: read_adapter(paths[n]) for n in names if is_adapter_dir(paths[n])}
    lora_bases = _check_lora_args(Path(base), names, adapters, adapter_bases, "exact", None, "svd", None)
    readers: dict[str, Any] = {"__base__": TensorReader(Path(base))}
    try:
        for n in names:
            readers[n] = LoraDeltaReader(adapters[n], lora_bases[n]) if n in adapters else TensorReader(paths[n])
        check_compatible(Path(base), paths, readers, config_dirs=lora_bases)
        return _prepare(spec, p, readers["__base__"].keys(), readers, names)
    finally:
        for r in readers.values():
            r.close()


def _merge_part(out_dir, part, keys, readers, names, spec, p, weights, stats, chunk_elements, out_dtype,
                max_shard_bytes, report, progress, whole_only: bool, start: float) -> MergeReport:
    """``merge_checkpoints(part=...)``: this part's shards and its ``part.json`` (:mod:`operators.merge.split`)."""
    if whole_only:
        raise MergeError("a merge in parts writes full checkpoints of one set of parameters and one vocabulary: "
                         "merge adapters, gradients, filters and vocabularies in one process")
    with atomic_output_dir(out_dir) as tmp:
        shard_bytes, only = split.part_shards(output_plan(keys, readers["__base__"], out_dtype), max_shard_bytes, part)
        _write_merged(tmp, keys, readers, names, spec, p, weights, stats, chunk_elements, out_dtype,
                      shard_bytes, report, progress, only=only)
        report.seconds = time.perf_counter() - start
        split.write_part_record(tmp, part, shard_bytes, report.as_dict())
    return report


def _write_merged(tmp: Path, keys: list[str], readers: Mapping[str, Any], names: list[str], spec: MergeMethod, p: Any,
                  weights: list[float], stats: Any, chunk_elements: int, out_dtype: torch.dtype | None,
                  max_shard_bytes: int, report: MergeReport, progress: Callable[[int, int], None] | None,
                  per_tensor: Mapping[str, tuple[Any, list[float]]] | None = None, only: list[int] | None = None) -> None:
    """Merge every tensor block by block into sharded safetensors in ``tmp``, written by a background thread
    (``only``: just those shards of the whole output, and the tensors in them)."""
    ref = readers["__base__"]
    writer = ShardedWriter(tmp, output_plan(keys, ref, out_dtype), max_shard_bytes=max_shard_bytes,
                           metadata={"merge_method": spec.name}, only=only)
    keys = writer.keys()
    with _BackgroundWriter(writer) as out:
        def emit(b: _Block, base_t: torch.Tensor, merged: torch.Tensor) -> None:
            out.write(b.key, cast_checked(merged, out_dtype or ref.dtype(b.key), b.key, spec.name))

        for key in _merge_blocks(keys, readers, names, spec, p, weights, stats, emit, chunk_elements, per_tensor):
            report.bytes_read += ref.nbytes(key) * (1 + sum(key in readers[n] for n in names))
            report.tensors += 1
            if progress is not None:
                progress(report.tensors, len(keys))
    report.output_files = writer.close()
    report.bytes_written = writer.bytes_written


def _check_exact_only(method: str, lora_mode: str, tensor_params: Any, vocab: VocabPlan | None) -> None:
    if vocab is not None and lora_mode == "adapter":
        raise MergeError("tokenizer: merging vocabularies writes full checkpoints; use lora mode exact")
    if tensor_params is not None and lora_mode == "adapter":
        raise MergeError(f"{method}: parameters that vary by tensor (gradients, filters) need lora mode exact; "
                         "give one value per parameter")


def _per_tensor_params(spec: MergeMethod, tensor_params: Callable[[str], Mapping[str, Any]], keys: list[str],
                       names: list[str]) -> dict[str, tuple[Any, list[float]]]:
    """Each tensor's parsed parameters and weights (one parse per distinct set), all checked up front."""
    parsed: dict[str, tuple[Any, list[float]]] = {}
    out = {}
    for key in keys:
        raw = dict(tensor_params(key))
        sig = json.dumps(raw, sort_keys=True, default=str)
        if sig not in parsed:
            try:
                pk = spec.parse_params(raw)
                parsed[sig] = (pk, resolve_weights(pk, names))
            except ValueError as exc:
                raise MergeError(f"tensor {key!r}: its parameters {raw} are not valid for {spec.name}: {exc}") from None
        out[key] = parsed[sig]
    return out


def _params_record(per_tensor: Mapping[str, tuple[Any, list[float]]]) -> list[dict[str, Any]]:
    """The provenance of parameters that vary by tensor: each distinct set, with the tensors that had it."""
    groups: dict[str, dict[str, Any]] = {}
    for key, (pk, _) in per_tensor.items():
        dumped = pk.model_dump(mode="json")
        groups.setdefault(json.dumps(dumped, sort_keys=True), {"params": dumped, "tensors": []})["tensors"].append(key)
    return list(groups.values())


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
    try:
        spec.check_expert_count(len(experts))
    except ValueError as exc:
        raise MergeError(str(exc)) from None
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
        pieces.setdefault(b.key, []).append(cast_checked(merged, ref.dtype(b.key), b.key, method))

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


__all__ = ["HEADS_DIR", "MergeError", "MergeReport", "atomic_output_dir", "check_compatible", "merge_checkpoints",
           "merge_states"]
