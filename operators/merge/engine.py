"""The streaming merge engine: checkpoints in, one merged checkpoint out, one tensor at a time.

1. Check before writing anything: same architecture (config), same tensor names, shapes and
   dtypes in the base and every expert, readable shards, valid parameters.
2. For every body tensor: read it from the base and each expert (memory-mapped), merge it with the
   method's pure function in float32, cast back, hand it to a sharded writer.
3. Copy each expert's task head, the base's config and tokenizer; write provenance.

Peak memory stays near (experts + 2) × the largest tensor plus one output shard, never × the model.
The output appears under ``out_dir`` only when complete: it is written to a hidden sibling
directory and renamed into place; a failure removes the partial directory.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from operators.checkpoint import (
    HEADS_DIR,
    copy_head,
    copy_tokenizer,
    head_names,
    write_provenance,
)
from operators.merge.registry import ModelStream, TensorContext, get_method, resolve_weights
from operators.tensor_io import ShardedWriter, TensorReader

# config.json keys that do not change the architecture
_CONFIG_NOISE = {"_name_or_path", "transformers_version", "architectures", "id2label", "label2id",
                 "num_labels", "problem_type", "torch_dtype", "dtype", "finetuning_task"}


class MergeError(ValueError):
    """Inputs that cannot be merged, with what differs and how to fix it."""


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
    return {k: v for k, v in cfg.items() if k not in _CONFIG_NOISE}


def check_compatible(base: Path, experts: Mapping[str, Path], readers: Mapping[str, TensorReader]) -> None:
    """Raise :class:`MergeError` naming the first difference between the base and an expert."""
    base_arch = _arch(base / "config.json")
    ref = readers["__base__"]
    ref_keys = set(ref.keys())
    for name, path in experts.items():
        arch = _arch(path / "config.json")
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
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
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
) -> MergeReport:
    """Merge the experts' bodies with ``method``; keep each expert's task head.

    Args:
        base: The base checkpoint θ_0 (its config and tokenizer are copied to the output).
        experts: Expert name (= task name) → checkpoint directory.
        method: A registered merge method (see ``MERGE_METHODS``).
        params: The method's parameters (validated here).
        out_dir: Output directory; must not exist yet (or be empty).
        max_shard_bytes: Output shard size.
        provenance: Extra fields for the output's ``mergeflow.json`` (parents, round, ...).
        progress: Called as ``progress(done, total)`` after each tensor.

    Returns:
        A :class:`MergeReport`.

    Raises:
        MergeError / CheckpointError: before anything is written, for any input problem.
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

    readers: dict[str, TensorReader] = {}
    try:
        readers["__base__"] = TensorReader(base)
        for n in names:
            readers[n] = TensorReader(paths[n])
        check_compatible(base, paths, readers)
        heads = _plan_heads(paths)

        report = MergeReport(method=method, params=p.model_dump(mode="json"), experts=names, weights=weights)
        keys = readers["__base__"].keys()
        stats = None
        if spec.prepare is not None:  # a first streaming pass for whole-model statistics
            float_keys = [k for k in keys if readers["__base__"].dtype(k).is_floating_point]
            stream = ModelStream(float_keys, lambda k: (readers["__base__"].get(k), [readers[n].get(k) for n in names]))
            stats = spec.prepare(stream, p, names)
        with atomic_output_dir(out_dir) as tmp:
            writer = ShardedWriter(tmp, max_shard_bytes=max_shard_bytes, metadata={"merge_method": method})
            for i, key in enumerate(keys):
                base_t = readers["__base__"].get(key)
                if not base_t.is_floating_point() and not all(key in readers[n] for n in names):
                    writer.add(key, base_t)  # an integer buffer some experts did not save
                    report.tensors += 1
                    continue
                expert_ts = [readers[n].get(key) for n in names]
                report.bytes_read += readers["__base__"].nbytes(key) * (1 + len(names))
                for who, t in (("base", base_t), *zip(names, expert_ts, strict=True)):
                    _check_finite(t, who, key)
                if not base_t.is_floating_point():
                    # integer buffers (e.g. position ids) are not weights: they must agree, and are copied
                    for n, t in zip(names, expert_ts, strict=True):
                        if not torch.equal(t, base_t):
                            raise MergeError(f"expert {n!r}: integer tensor {key!r} differs from the base's")
                    merged = base_t
                else:
                    ctx = TensorContext(key=key, stats=stats, experts=tuple(names))
                    merged = spec.fn(base_t if spec.needs_base else None, expert_ts, weights, p, ctx).to(base_t.dtype)
                writer.add(key, merged)
                del base_t, expert_ts, merged
                report.tensors += 1
                if progress is not None:
                    progress(i + 1, len(keys))
            report.output_files = writer.close()
            report.bytes_written = writer.bytes_written
            shutil.copy2(base / "config.json", tmp / "config.json")
            copy_tokenizer(base, tmp)
            for expert_name, task in heads:
                copy_head(paths[expert_name], tmp, task)
            report.heads = sorted(t for _, t in heads)
            report.seconds = time.perf_counter() - start
            write_provenance(tmp, {
                "kind": "merged",
                "method": method,
                "params": report.params,
                "weights": dict(zip(names, weights, strict=True)),
                "base": str(base),
                "experts": {n: str(paths[n]) for n in names},
                **(provenance or {}),
            })
        return report
    finally:
        for r in readers.values():
            r.close()


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


__all__ = ["HEADS_DIR", "MergeError", "MergeReport", "atomic_output_dir", "check_compatible", "merge_checkpoints"]
