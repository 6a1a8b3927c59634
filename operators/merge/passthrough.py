"""Passthrough with slices: a model whose layers are stacked from other models' layer ranges (mergekit's
``passthrough`` merges, the "frankenmerges"), written as a checkpoint ``from_pretrained`` loads.

A stack is a list of slices, each one model and a half-open layer range ``[start, end)``. The output's
layers are the slices' layers in order, renumbered from 0; tensors outside the layers come from the first
slice's model when they are embeddings (their names hold ``embed``, ``wte`` or ``wpe``) and from the last
slice's model otherwise (the final norm, the output head), as mergekit takes its "pre" and "post" weights.
Each slice may scale its tensors (``scale``; embeddings by the first slice's, the rest by the last's).
The output's config is the first slice's model's with the new layer count (and per-layer lists such as
``layer_types`` stacked likewise; other per-layer settings, such as Qwen2's ``max_window_layers``, are
copied as they are); its tokenizer is that model's too. The models must share their shape (hidden,
intermediate and vocabulary sizes, heads). Tensors are copied as they are
(cast to ``out_dtype`` when given): no arithmetic unless scaled, so the stack is bit-exact. Tensors are
copied in pieces of ``CHUNK_ELEMENTS``, so memory stays near a few pieces whatever the model's size.

Layers are found by name, ``….layers.N.…`` (Llama, Mistral, Qwen, Gemma …), ``….h.N.…`` (GPT-2) or
``….layer.N.…`` / ``….blocks.N.…``; the layer count by ``num_hidden_layers`` / ``n_layer`` in config.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from operators.checkpoint_files import copy_tokenizer, write_provenance
from operators.errors import MergeError
from operators.merge.blocks import CHUNK_ELEMENTS
from operators.merge.engine import MergeReport
from operators.merge.layers import LAYER_RE, layer_count
from operators.merge.output import _BackgroundWriter, atomic_output_dir
from operators.merge.schedule import evaluate
from operators.tensor_io import ShardedWriter, TensorReader

PRE_WEIGHT_MARKERS = ("embed", "wte", "wpe")
SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size")


@dataclass(frozen=True)
class LayerSlice:
    """Layers ``[start, end)`` of ``model``, each tensor times ``scale`` when given: one number, or a setting
    that varies by tensor (a gradient over the slice's layers, filters on the tensors' names;
    ``operators.merge.schedule``)."""

    model: Path
    start: int
    end: int
    scale: Any = None


def _scale(s: LayerSlice, key: str, t: float) -> float | None:
    value = None if s.scale is None else evaluate(s.scale, key, t)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise MergeError(f"scale: {value!r} for tensor {key!r} is not a number")
    return None if value is None else float(value)


def check_slices(slices: Sequence[LayerSlice]) -> None:
    """Every range inside its model, none empty; raises :class:`MergeError` naming the slice."""
    if not slices:
        raise MergeError("slices: at least one slice is needed")
    first = json.loads((slices[0].model / "config.json").read_text())
    for i, s in enumerate(slices):
        _, n = layer_count(s.model)
        cfg = json.loads((s.model / "config.json").read_text())
        for key in SHAPE_KEYS:
            if cfg.get(key) != first.get(key):
                raise MergeError(f"slices[{i}]: {s.model} has {key} {cfg.get(key)!r}, slices[0]'s model "
                                 f"{first.get(key)!r}; layers stack only between models of one shape")
        if not 0 <= s.start < s.end <= n:
            raise MergeError(f"slices[{i}].layer_range: [{s.start}, {s.end}] is not a non-empty range of "
                             f"{s.model}'s {n} layers (a half-open [start, end), end at most {n})")


def _plan(slices: Sequence[LayerSlice], readers: Sequence[TensorReader]) -> list[tuple[str, int, str, float | None]]:
    """Each output tensor: (output name, source slice, source name, scale), in output order."""
    first, last = readers[0], readers[-1]
    pre = [k for k in first.keys() if not LAYER_RE.match(k) and any(m in k for m in PRE_WEIGHT_MARKERS)]
    post = [k for k in last.keys() if not LAYER_RE.match(k) and not any(m in k for m in PRE_WEIGHT_MARKERS)]
    plan = [(k, 0, k, _scale(slices[0], k, 0.0)) for k in pre]
    out_layer = 0
    for i, (s, r) in enumerate(zip(slices, readers, strict=True)):
        by_layer: dict[int, list[tuple[str, str]]] = {}
        for k in r.keys():
            m = LAYER_RE.match(k)
            if m and s.start <= int(m["idx"]) < s.end:
                by_layer.setdefault(int(m["idx"]), []).append((k, m["pre"] + "{}" + m["post"]))
        for layer in range(s.start, s.end):
            if layer not in by_layer:
                raise MergeError(f"slices[{i}]: {s.model} has no tensors of layer {layer}")
            t = (layer - s.start) / (s.end - s.start - 1) if s.end - s.start > 1 else 1.0  # mergekit's position
            plan += [(pattern.format(out_layer), i, k, _scale(s, k, t)) for k, pattern in by_layer[layer]]
            out_layer += 1
    plan += [(k, len(slices) - 1, k, _scale(slices[-1], k, 0.0)) for k in post]
    return plan


def _config(slices: Sequence[LayerSlice], out_dtype: torch.dtype | None) -> dict:
    cfg = json.loads((slices[0].model / "config.json").read_text())
    key, _ = layer_count(slices[0].model)
    cfg[key] = sum(s.end - s.start for s in slices)
    if isinstance(cfg.get("layer_types"), list):  # per-layer kinds (sliding or full attention) move with their layers
        kinds = [json.loads((s.model / "config.json").read_text()).get("layer_types") for s in slices]
        if any(not isinstance(k, list) for k in kinds):
            raise MergeError("slices: some of the models' configs list layer_types and some do not; stack models "
                             "of one kind")
        cfg["layer_types"] = [t for s, k in zip(slices, kinds, strict=True) for t in k[s.start:s.end]]
    if out_dtype is not None:
        cfg["torch_dtype"] = cfg["dtype"] = str(out_dtype).removeprefix("torch.")
    return cfg


def stack_layers(slices: Sequence[LayerSlice], out_dir: str | Path, *, out_dtype: torch.dtype | None = None,
                 max_shard_bytes: int = 2 * 1024**3, provenance: dict | None = None,
                 progress: Callable[[int, int], None] | None = None) -> MergeReport:
    """Write the stack of ``slices`` to ``out_dir`` (see the module docstring); nothing is left on failure.

    Raises:
        MergeError / CheckpointError: a range outside its model, a missing layer, a model without a layer count.
    """
    start = time.perf_counter()
    check_slices(slices)
    readers = [TensorReader(s.model) for s in slices]
    try:
        plan = _plan(slices, readers)
        dtypes = {o: (out_dtype if out_dtype is not None and readers[i].dtype(k).is_floating_point
                      else readers[i].dtype(k)) for o, i, k, _ in plan}
        names = [str(s.model) for s in slices]
        report = MergeReport(method="passthrough", params={"slices": [
            {"model": str(s.model), "layer_range": [s.start, s.end], **({"scale": s.scale} if s.scale is not None else {})}
            for s in slices]}, experts=names, weights=[1.0] * len(slices))
        with atomic_output_dir(out_dir) as tmp:
            writer = ShardedWriter(tmp, [(o, dtypes[o], readers[i].shape(k)) for o, i, k, _ in plan], max_shard_bytes,
                                   metadata={"mergeflow_method": "passthrough"})
            with _BackgroundWriter(writer) as bg:
                for n, (o, i, k, scale) in enumerate(plan, 1):
                    numel = readers[i].numel(k)
                    for start in range(0, max(1, numel), CHUNK_ELEMENTS):  # copied in pieces: memory stays flat
                        t = readers[i].get_flat(k, start, min(numel, start + CHUNK_ELEMENTS))
                        report.bytes_read += t.numel() * t.element_size()
                        if scale is not None and t.is_floating_point():
                            t = t * scale
                        bg.write(o, t.to(dtypes[o]))
                    if progress is not None:
                        progress(n, len(plan))
            report.output_files = writer.close()
            report.bytes_written = writer.bytes_written
            (tmp / "config.json").write_text(json.dumps(_config(slices, out_dtype), indent=2, sort_keys=True) + "\n")
            copy_tokenizer(slices[0].model, tmp)
            report.tensors = len(plan)
            report.seconds = time.perf_counter() - start
            write_provenance(tmp, {"kind": "merged", "method": "passthrough", "params": report.params,
                                   "layers": sum(s.end - s.start for s in slices), **(provenance or {})})
        return report
    finally:
        for r in readers:
            r.close()


__all__ = ["LayerSlice", "check_slices", "layer_count", "stack_layers"]
