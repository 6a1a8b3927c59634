"""Lazy, tensor-by-tensor reading and sharded writing of safetensors checkpoints.

Only safetensors are ever read: no pickle, so an untrusted checkpoint cannot run code.
The layout is Hugging Face's: either one ``model.safetensors`` or shards
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: says which file and what would fix it."""


class TensorReader:
    """Open a (possibly sharded) safetensors checkpoint and read tensors, or slices of them, one at a time.

    The safetensors headers (JSON) are parsed and checked up front: dtype, shape and byte range of
    every tensor, against the file's size, so a truncated or corrupt shard is refused before any
    merging starts. Tensor data is then read with ``pread`` into fresh buffers: nothing is
    memory-mapped, so reading a model does not grow the process's resident memory by the model's
    size (the pages stay in the OS page cache), and slices of a tensor can be read on their own.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._weight_map = self._read_weight_map()
        self._fds: dict[str, int] = {}
        self._meta: dict[str, tuple[torch.dtype, tuple[int, ...], str, int]] = {}  # dtype, shape, file, offset
        for fname in sorted(set(self._weight_map.values())):
            for key, (dtype, shape, offset) in _read_header(self.directory / fname).items():
                if self._weight_map.get(key) == fname:
                    self._meta[key] = (dtype, shape, fname, offset)
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
            return {k: SINGLE_FILE for k in _read_header(single)}
        if any(self.directory.glob("*.bin")) or any(self.directory.glob("*.pt")):
            raise CheckpointError(
                f"{self.directory}: only pickle weights (*.bin/*.pt) found. mergeflow loads safetensors "
                "only (pickle can run arbitrary code). Convert with "
                "`model.save_pretrained(dir, safe_serialization=True)` from a trusted environment."
            )
        raise CheckpointError(
            f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE}; is this a Hugging Face checkpoint directory?"
        )

    def _fd(self, fname: str) -> int:
        if fname not in self._fds:
            self._fds[fname] = os.open(self.directory / fname, os.O_RDONLY)
        return self._fds[fname]

    def keys(self) -> list[str]:
        return self._keys

    def __contains__(self, key: str) -> bool:
        return key in self._meta

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key][0]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][1]

    def numel(self, key: str) -> int:
        return math.prod(self._meta[key][1])

    def nbytes(self, key: str) -> int:
        return self.numel(key) * _itemsize(self._meta[key][0])

    def get(self, key: str) -> torch.Tensor:
        """The whole tensor (a fresh, writable buffer)."""
        dtype, shape, _, _ = self._meta[key]
        return self.get_flat(key, 0, self.numel(key)).reshape(shape)

    def get_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements ``start:stop`` of the flattened tensor, read from disk on their own."""
        dtype, _, fname, offset = self._meta[key]
        out = torch.empty(stop - start, dtype=dtype)
        size = _itemsize(dtype)
        if out.numel():
            _pread_into(self._fd(fname), offset + start * size, out, self.directory / fname, key)
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


MAX_HEADER_BYTES = 100 * 1024**2


def _read_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
    """Parse and check a safetensors header: key → (dtype, shape, absolute byte offset of the data)."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: cannot read safetensors file ({why}); the file is corrupt or truncated.")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise bad(f"header length {n} does not fit in the file's {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_start, data_size = 8 + n, size - 8 - n
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _dtype_of(info["dtype"], path)
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"entry {key!r} lacks dtype, shape or data_offsets") from None
        if not 0 <= begin <= end <= data_size:
            raise bad(f"tensor {key!r} lies at bytes {begin}-{end}, past the {data_size} data bytes")
        if end - begin != math.prod(shape) * _itemsize(dtype):
            raise bad(f"tensor {key!r}: {end - begin} bytes for shape {list(shape)} of {dtype}")
        out[key] = (dtype, shape, data_start + begin)
    return out


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _pread_into(fd: int, offset: int, out: torch.Tensor, path: Path, key: str) -> None:
    view = memoryview(out.view(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise CheckpointError(f"{path}: cannot read tensor {key!r} (file ended early); the shard is corrupt or truncated.")
        done += got


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


_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class ShardedWriter:
    """Write a checkpoint whose tensors (names, dtypes, shapes) are known in advance, streaming.

    The shard layout is planned up front (tensors in the given order; a new shard starts when the
    next tensor would pass ``max_shard_bytes``), so each shard's safetensors header is written first
    and tensor data is appended as it is produced, in pieces if need be: nothing is buffered, so
    memory does not grow with the shard size. Shards are named ``model-0000i-of-0000n.safetensors``
    with an index (or ``model.safetensors`` when there is one), like ``save_pretrained``.
    """

    def __init__(self, directory: str | Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int = 2 * 1024**3, metadata: dict[str, str] | None = None,
                 only: list[int] | None = None):
        if not plan:
            raise ValueError("ShardedWriter: no tensors to write")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._shards = plan_shards(plan, max_shard_bytes)
        self.files = shard_files(len(self._shards))
        # ``only``: the shards this writer writes, of the whole plan (one part of a merge split over workers)
        self.only = sorted(only) if only is not None else list(range(len(self._shards)))
        self._order = [(i, entry) for i in self.only for entry in self._shards[i]]
        self._pos = 0  # index into _order of the tensor being written
        self._written = 0  # bytes of that tensor written so far
        self._file = None
        self._shard = -1
        self.bytes_written = 0

    def _open_shard(self, i: int) -> None:
        if self._file is not None:
            self._file.close()
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for key, dtype, shape, nbytes in self._shards[i]:
            header[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._file = open(self.directory / self.files[i], "wb")
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self.bytes_written += 8 + len(raw)
        self._shard = i

    def write(self, key: str, piece: torch.Tensor) -> None:
        """Append ``piece`` (the next elements, in row-major order) to tensor ``key``."""
        if self._pos >= len(self._order):
            raise ValueError(f"ShardedWriter: {key!r} written after every planned tensor was complete")
        shard, (expected, dtype, _, nbytes) = self._order[self._pos]
        if key != expected:
            raise ValueError(f"ShardedWriter: got {key!r}, expected {expected!r} (tensors are written in plan order)")
        if piece.dtype != dtype:
            raise ValueError(f"ShardedWriter: {key!r} is planned as {dtype}, got {piece.dtype}")
        if shard != self._shard:
            self._open_shard(shard)
        data = piece.detach().contiguous().view(-1).view(torch.uint8).numpy()
        if self._written + len(data) > nbytes:
            raise ValueError(f"ShardedWriter: more data for {key!r} than its planned {nbytes} bytes")
        self._file.write(memoryview(data))
        self._written += len(data)
        self.bytes_written += len(data)
        if self._written == nbytes:
            self._pos += 1
            self._written = 0

    def keys(self) -> list[str]:
        """The tensors this writer writes, in the order it takes them."""
        return [entry[0] for _, entry in self._order]

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor."""
        self.write(key, tensor)

    def close(self) -> list[str]:
        """Finish writing (every planned tensor must be complete); returns the file names written."""
        while self._pos < len(self._order) and self._order[self._pos][1][3] == 0:
            self.write(self._order[self._pos][1][0], torch.empty(0, dtype=self._order[self._pos][1][1]))
        if self._pos < len(self._order):
            raise ValueError(f"ShardedWriter.close(): {self._order[self._pos][1][0]!r} and later tensors were not written")
        if self._file is not None:
            self._file.close()
            self._file = None
        mine = [self.files[i] for i in self.only]
        if len(self.only) < len(self._shards):  # a part: the index is written once every part is in
            for i in self.only:  # (a shard whose tensors are all empty was never opened: write its header)
                if not (self.directory / self.files[i]).exists():
                    self._open_shard(i)
                    self._file.close()
                    self._file = None
            return mine
        if len(self.files) == 1:
            return list(self.files)
        write_index(self.directory, self._shards, self.files)
        return [*self.files, INDEX_FILE]


def plan_shards(plan: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int,
                ) -> list[list[tuple[str, torch.dtype, tuple[int, ...], int]]]:
    """The shards of a checkpoint: tensors in order, a new shard when the next would pass ``max_shard_bytes``."""
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]] = [[]]
    size = 0
    for key, dtype, shape in plan:
        nbytes = math.prod(shape) * _itemsize(dtype)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, dtype, tuple(shape), nbytes))
        size += nbytes
    return shards


def shard_files(n: int) -> list[str]:
    """The file names of ``n`` shards, as ``save_pretrained`` names them."""
    return [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_index(directory: Path, shards: list[list[tuple[str, torch.dtype, tuple[int, ...], int]]],
                files: list[str]) -> None:
    """``model.safetensors.index.json`` of a sharded checkpoint."""
    weight_map = {key: files[i] for i, shard in enumerate(shards) for key, *_ in shard}
    total = sum(nbytes for shard in shards for *_, nbytes in shard)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))


def iter_tensors(directory: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` pairs of a checkpoint, one tensor in memory at a time."""
    with TensorReader(directory) as r:
        for k in r.keys():
            yield k, r.get(k)


def load_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """Read a whole (small) checkpoint into memory. For tests and heads; merges stream instead."""
    return dict(iter_tensors(directory))
