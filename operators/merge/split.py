"""A merge split by tensors across several workers (on several nodes), then put together.

Each worker runs :func:`~operators.merge.engine.merge_checkpoints` with ``part=(i, n)``: it reads only the
tensors of its part from the base and the experts, and writes whole output shards of the one-process plan,
so the parts' files, put side by side, are the files one process writes (with the same shard size), byte
for byte. :func:`assemble_parts` then moves the shards into one directory and writes what only makes sense
once every part is in: the index, the config and tokenizer, the task heads and the provenance. Nothing is
visible at the output until it is complete (the same hidden directory renamed into place as one merge).

How the output is cut: shards of at most ``min(max_shard_bytes, ⌈total / 4n⌉)`` (:func:`part_shard_bytes`: about
four a part, so that parts of whole shards come out about equal), assigned to parts as consecutive runs of
about equal bytes. A method with a whole-model pass (TIES' model-wide top-k, LiNeS) has it computed once
(:func:`~operators.merge.engine.whole_model_statistics`) and handed to every part, which then reads only its
own tensors.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from operators.checkpoint_files import write_provenance
from operators.errors import MergeError
from operators.merge.blocks import split_keys
from operators.merge.heads import _copy_heads, _plan_heads
from operators.merge.output import _write_config_and_tokenizer, atomic_output_dir, output_plan
from operators.tensor_io import TensorReader, plan_shards, shard_files, write_index

PART_FILE = "part.json"


SHARDS_PER_PART = 4  # finer shards than one a part: whole shards then split the bytes evenly, to about 1/4 of a part


def part_shard_bytes(plan: list[tuple[str, torch.dtype, tuple]], max_shard_bytes: int, parts: int) -> int:
    """The shard size of a merge in ``parts`` parts: ``max_shard_bytes``, or less so that there are about
    :data:`SHARDS_PER_PART` shards a part (parts of whole shards then read and write about equal bytes)."""
    total = sum(math.prod(shape) * torch.empty(0, dtype=dtype).element_size() for _, dtype, shape in plan)
    return max(1, min(max_shard_bytes, math.ceil(total / (parts * SHARDS_PER_PART))))


def part_shards(plan: list[tuple[str, torch.dtype, tuple]], max_shard_bytes: int, part: tuple[int, int],
                ) -> tuple[int, list[int]]:
    """``(shard size, the shards part i of n writes)``: consecutive shards of about equal bytes."""
    i, n = part
    if not 0 <= i < n:
        raise MergeError(f"part {i} of {n}: parts are numbered 0 to {n - 1}")
    size = part_shard_bytes(plan, max_shard_bytes, n)
    shards = plan_shards(plan, size)
    numbers = [str(k) for k in range(len(shards))]
    mine = split_keys(numbers, [sum(e[3] for e in shard) for shard in shards], n)[i]
    return size, [int(k) for k in mine]


def write_part_record(directory: Path, part: tuple[int, int], shard_bytes: int, report: Mapping[str, Any]) -> None:
    """``part.json``: which part this is, its shard size, the files it wrote and what it took."""
    (directory / PART_FILE).write_text(json.dumps({
        "part": part[0], "parts": part[1], "shard_bytes": shard_bytes, "files": report["output_files"],
        "method": report["method"], "params": report["params"], "weights": dict(zip(report["experts"],
                                                                                     report["weights"], strict=True)),
        "tensors": report["tensors"], "bytes_read": report["bytes_read"], "bytes_written": report["bytes_written"],
        "seconds": report["seconds"]}, indent=2))


def read_parts(part_dirs: list[Path]) -> list[dict[str, Any]]:
    """Every part's record, checked: parts 0 to n − 1, each once, all cut the same way."""
    records = []
    for d in part_dirs:
        f = Path(d) / PART_FILE
        if not f.is_file():
            raise MergeError(f"{d}: no {PART_FILE}; it is not (or not yet) a finished part of a split merge")
        records.append({**json.loads(f.read_text()), "dir": str(d)})
    n = len(part_dirs)
    if sorted(r["part"] for r in records) != list(range(n)) or {r["parts"] for r in records} != {n}:
        raise MergeError(f"the parts {[(r['part'], r['parts']) for r in records]} are not parts 0 to {n - 1} of one "
                         f"merge in {n}; give each part's directory once")
    for what in ("shard_bytes", "method", "params", "weights"):
        if len({json.dumps(r[what], sort_keys=True) for r in records}) != 1:
            raise MergeError(f"the parts differ in {what}: they are parts of different merges")
    return sorted(records, key=lambda r: r["part"])


def assemble_parts(base: str | Path, experts: Mapping[str, str | Path], part_dirs: list[Path], out_dir: str | Path,
                   *, out_dtype: torch.dtype | None = None, heads_from: str | Path | None = None,
                   provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Put the parts of a split merge together at ``out_dir`` (moving their shards): the index, config and
    tokenizer, heads and provenance written once every part is in and its shards hold the planned tensors.

    Returns a summary: ``tensors``, ``bytes_read``, ``bytes_written``, ``files``, and ``parts`` (each part's record).
    """
    start = time.perf_counter()
    records = read_parts(part_dirs)
    base = Path(base)
    ref = TensorReader(base)
    try:
        keys = ref.keys()
        plan = output_plan(keys, ref, out_dtype)
    finally:
        ref.close()
    shards = plan_shards(plan, records[0]["shard_bytes"])
    files = shard_files(len(shards))
    where: dict[str, Path] = {}
    for r in records:
        for name in r["files"]:
            if name in where:
                raise MergeError(f"shard {name} was written by two parts; the parts are of different merges")
            where[name] = Path(r["dir"]) / name
    missing = [f for f in files if f not in where]
    if missing or len(where) != len(files):
        raise MergeError(f"the parts hold {sorted(where)}, the merge has shards {files}: missing {missing}")
    from safetensors import safe_open

    for i, name in enumerate(files):  # each shard holds its planned tensors (its header; the data is not read)
        with safe_open(str(where[name]), "pt") as f:
            if sorted(f.keys()) != sorted(e[0] for e in shards[i]):
                raise MergeError(f"{where[name]} does not hold the tensors planned for shard {name}")
    paths = {n: Path(experts[n]) for n in sorted(experts)}
    with atomic_output_dir(out_dir) as tmp:
        for name in files:
            shutil.move(str(where[name]), tmp / name)
        if len(files) > 1:
            write_index(tmp, shards, files)
        _write_config_and_tokenizer(base, tmp, out_dtype)
        heads = _copy_heads(_plan_heads(paths), paths, heads_from, tmp)
        summary = {"method": records[0]["method"], "tensors": sum(r["tensors"] for r in records), "bytes_read": sum(r["bytes_read"] for r in records),
                   "bytes_written": sum(r["bytes_written"] for r in records), "files": files, "heads": heads,
                   "parts": [{k: v for k, v in r.items() if k != "dir"} for r in records],
                   "assemble_seconds": time.perf_counter() - start}
        first = records[0]
        write_provenance(tmp, {
            "kind": "merged", "method": first["method"], "params": first["params"], "weights": first["weights"],
            "base": str(base), "experts": {n: str(p) for n, p in paths.items()}, **(provenance or {}),
            "split": {"parts": len(records), "shard_bytes": first["shard_bytes"], "records": summary["parts"]}})
    return summary
