"""How the statistics of data-driven merges are stored, and read back verified (what a method reads).

A statistics directory holds ``<kind>.safetensors`` (tensors named like the body's parameters) and
``<kind>.json``: the kind, the number of examples and seed, the SHA-256 of the tensor file and of the
expert's weights it was computed on, and each tensor's shape. :func:`open_statistics` refuses a
directory whose file does not match its checksum, or that was computed on another expert (a
different weights hash), so a merge never silently uses stale statistics.

They are computed by :mod:`operators.learn.statistics` (``gram`` for RegMean, ``fisher`` for Fisher
merging); a method asks for them with ``register(..., statistics=KIND)``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

StatisticsKind = Literal["gram", "fisher"]
KINDS: tuple[str, ...] = ("gram", "fisher")
# which statistics each data-driven merge method reads
DEFAULT_EXAMPLES = 256  # FusionBench's default for both Fisher merging and RegMean


class StatisticsError(ValueError):
    """Statistics that are missing, corrupt, or computed on another model."""


def weights_sha256(ckpt: str | Path) -> str:
    """SHA-256 over a checkpoint's safetensors files (sorted by name): identifies its weights."""
    h = hashlib.sha256()
    files = sorted(Path(ckpt).glob("*.safetensors"))
    if not files:
        raise StatisticsError(f"{ckpt}: no *.safetensors weights to fingerprint; is this a full checkpoint?")
    for f in files:
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class StatisticsRecord:
    """What :func:`compute_statistics` wrote (also in ``<kind>.json``)."""

    kind: str
    task: str
    examples: int
    seed: int
    seconds: float
    expert_sha256: str
    file_sha256: str
    l2_norm: float
    shapes: dict[str, list[int]]

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "task": self.task, "examples": self.examples, "seed": self.seed,
                "seconds": self.seconds, "expert_sha256": self.expert_sha256, "file_sha256": self.file_sha256,
                "l2_norm": self.l2_norm, "shapes": self.shapes}




def write_statistics(out_dir: str | Path, kind: str, task: str, stats: dict[str, torch.Tensor], *, examples: int,
                     seed: int, seconds: float, expert: str | Path) -> StatisticsRecord:
    """Write ``stats`` (float32, by tensor name) and their record into ``out_dir``; returns the record."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.float().contiguous().cpu() for k, v in sorted(stats.items())}
    save_file(tensors, str(out / f"{kind}.safetensors"), metadata={"kind": kind, "task": task})
    l2 = float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors.values())))
    record = StatisticsRecord(kind=kind, task=task, examples=examples, seed=seed, seconds=seconds,
                              expert_sha256=weights_sha256(expert),
                              file_sha256=file_sha256(out / f"{kind}.safetensors"), l2_norm=l2,
                              shapes={k: list(v.shape) for k, v in tensors.items()})
    (out / f"{kind}.json").write_text(json.dumps(record.as_dict(), indent=2, sort_keys=True) + "\n")
    return record


class Statistics:
    """One expert's stored statistics, verified, read tensor by tensor."""

    def __init__(self, directory: Path, record: dict[str, Any]):
        self.directory = directory
        self.record = record
        self.kind: str = record["kind"]
        self._file = safe_open(str(directory / f"{self.kind}.safetensors"), framework="pt")
        self._keys = set(self._file.keys())

    def get(self, key: str) -> torch.Tensor | None:
        """The statistic of tensor ``key`` (None when there is none, e.g. no Gram for a bias)."""
        return self._file.get_tensor(key).float() if key in self._keys else None

    def shape(self, key: str) -> list[int] | None:
        return self.record["shapes"].get(key)

    @property
    def l2_norm(self) -> float:
        return float(self.record["l2_norm"])


def open_statistics(directory: str | Path, kind: str, *, expert: str | Path | None = None,
                    expert_sha256: str | None = None, who: str = "") -> Statistics:
    """Open and verify a statistics directory.

    Args:
        directory: Where :func:`compute_statistics` wrote them.
        kind: The kind the caller needs (``gram`` or ``fisher``).
        expert: The expert checkpoint they must belong to (its weights are hashed and compared).
        expert_sha256: Instead of ``expert``, its known weights hash.
        who: The expert's name, for error messages.

    Raises:
        StatisticsError: missing files, a checksum mismatch, another kind, or another expert.
    """
    d = Path(directory)
    label = f"expert {who!r}: " if who else ""
    meta_path, tensor_path = d / f"{kind}.json", d / f"{kind}.safetensors"
    if not meta_path.is_file() or not tensor_path.is_file():
        raise StatisticsError(f"{label}no {kind} statistics in {d} ({meta_path.name} and {tensor_path.name} "
                              "expected); compute them with operators.learn.statistics.compute_statistics or run the "
                              "workflow, which computes them beside each expert")
    record = json.loads(meta_path.read_text())
    if record.get("kind") != kind:
        raise StatisticsError(f"{label}{d} holds {record.get('kind')!r} statistics, the merge needs {kind!r}")
    actual = file_sha256(tensor_path)
    if actual != record.get("file_sha256"):
        raise StatisticsError(f"{label}{tensor_path}: checksum {actual[:12]}… does not match the recorded "
                              f"{str(record.get('file_sha256'))[:12]}…; the file is corrupt: delete {d} to recompute")
    want = expert_sha256 or (weights_sha256(expert) if expert is not None else None)
    if want is not None and record.get("expert_sha256") != want:
        raise StatisticsError(f"{label}{d} was computed on other weights (hash {str(record.get('expert_sha256'))[:12]}…, "
                              f"expert has {want[:12]}…); recompute the statistics for this expert")
    return Statistics(d, record)




__all__ = ["DEFAULT_EXAMPLES", "KINDS", "Statistics", "StatisticsError", "StatisticsKind", "StatisticsRecord",
           "file_sha256", "open_statistics", "weights_sha256", "write_statistics"]
