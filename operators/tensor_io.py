"""Lazy, tensor-by-tensor reading and sharded writing of safetensors checkpoints.

Only safetensors are ever read: no pickle, so an untrusted checkpoint cannot run code.
The layout is Hugging Face's: either one ``model.safetensors`` or shards
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: says which file and what would fix it."""


class TensorReader:
    """Open a (possibly sharded) safetensors checkpoint and read tensors one at a time.

    Headers are read up front (cheap); tensor data is read lazily from memory-mapped files.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._weight_map = self._read_weight_map()
        self._handles: dict[str, object] = {}
        self._meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for fname in sorted(set(self._weight_map.values())):
            handle = self._open(fname)
            for key in handle.keys():
                if self._weight_map.get(key) == fname:
                    sl = handle.get_slice(key)
                    self._meta[key] = (_dtype_of(sl.get_dtype(), self.directory / fname), tuple(sl.get_shape()))
        self._keys = sorted(self._meta)
        missing = sorted(set(self._weight_map) - set(self._meta))
        if missing:
            raise CheckpointError(
                f"{self.directory}: the index lists {len(missing)} tensors that are not in their shards "
                f"(first: {missing[0]!r}); the checkpoint is incomplete. Re-create or re-download it."
            )

    def _read_weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a valid safetensors index ({exc}).") from None
            for fname in set(wm.values()):
                if not (self.directory / fname).is_file():
                    raise CheckpointError(
                        f"{self.directory / fname}: shard listed in {INDEX_FILE} is missing; "
                        "the checkpoint is incomplete."
                    )
            return dict(wm)
        if single.is_file():
            with self._safe(single) as h:
                return {k: SINGLE_FILE for k in h.keys()}
        if any(self.directory.glob("*.bin")) or any(self.directory.glob("*.pt")):
            raise CheckpointError(
                f"{self.directory}: only pickle weights (*.bin/*.pt) found. mergeflow loads safetensors "
                "only (pickle can run arbitrary code). Convert with "
                "`model.save_pretrained(dir, safe_serialization=True)` from a trusted environment."
            )
        raise CheckpointError(
            f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}; is this a Hugging Face checkpoint directory?"
        )

    def _safe(self, path: Path):
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(
                f"{path}: cannot read safetensors file ({exc}); the file is corrupt or truncated."
            ) from None

    def _open(self, fname: str):
        if fname not in self._handles:
            self._handles[fname] = self._safe(self.directory / fname).__enter__()
        return self._handles[fname]

    def keys(self) -> list[str]:
        return self._keys

    def __contains__(self, key: str) -> bool:
        return key in self._meta

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key][0]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][1]

    def nbytes(self, key: str) -> int:
        dtype, shape = self._meta[key]
        n = 1
        for s in shape:
            n *= s
        return n * torch.empty((), dtype=dtype).element_size()

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._open(self._weight_map[key]).get_tensor(key)
        except KeyError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"{self.directory / self._weight_map[key]}: cannot read tensor {key!r} ({exc}); "
                "the shard is corrupt or truncated."
            ) from None

    def close(self) -> None:
        for h in self._handles.values():
            try:
                h.__exit__(None, None, None)  # type: ignore[attr-defined]
            except Exception:
                pass
        self._handles.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _dtype_of(name: str, path: Path) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise CheckpointError(f"{path}: unsupported tensor dtype {name!r}") from None


class ShardedWriter:
    """Write tensors in order into shards of at most ``max_shard_bytes``, then an index.

    Holds at most one shard's worth of tensors in memory. ``close()`` writes the index (or renames a
    lone shard to ``model.safetensors``), so a directory with no index is visibly unfinished.
    """

    def __init__(self, directory: str | Path, max_shard_bytes: int = 2 * 1024**3, metadata: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []
        self._total_bytes = 0
        self.bytes_written = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[key] = tensor.contiguous()
        self._buffer_bytes += nbytes
        self._total_bytes += nbytes

    def _flush(self) -> None:
        if not self._buffer:
            return
        n = len(self._shards)
        tmp_name = f"shard-{n:05d}.tmp.safetensors"
        save_file(self._buffer, str(self.directory / tmp_name), metadata=self.metadata)
        self.bytes_written += os.path.getsize(self.directory / tmp_name)
        self._shards.append(list(self._buffer))
        # flush the tensors as soon as they are on disk: no need for this memory any more
        self._buffer = {}
        self._buffer_bytes = 0

    def close(self) -> list[str]:
        """Finish writing; returns the file names written."""
        self._flush()
        total = len(self._shards)
        if total == 0:
            raise ValueError("ShardedWriter.close(): no tensors were written")
        if total == 1:
            os.replace(self.directory / "shard-00000.tmp.safetensors", self.directory / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map: dict[str, str] = {}
        names = []
        for i, keys in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(self.directory / f"shard-{i:05d}.tmp.safetensors", self.directory / final)
            names.append(final)
            weight_map.update({k: final for k in keys})
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return [*names, INDEX_FILE]


def iter_tensors(directory: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` pairs of a checkpoint, one tensor in memory at a time."""
    with TensorReader(directory) as r:
        for k in r.keys():
            yield k, r.get(k)


def load_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """Read a whole (small) checkpoint into memory. For tests and heads; merges stream instead."""
    return dict(iter_tensors(directory))
