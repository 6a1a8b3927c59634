"""Where a merge's output goes: a hidden directory renamed into place when complete, a background
thread that writes the merged tensors to their shards while the next ones merge, and the output's
config (with its dtype)."""

from __future__ import annotations

import contextlib
import json
import queue
import shutil
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from operators.checkpoint_files import copy_tokenizer
from operators.errors import MergeError
from operators.tensor_io import ShardedWriter


def check_output_dir(out_dir: str | Path) -> Path:
    """``out_dir`` as a path, refused (``MergeError``) if it exists and is not empty: nothing is overwritten."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise MergeError(f"{out_dir}: output directory exists and is not empty; choose a new path or remove it")
    return out_dir


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary directory beside ``out_dir``; rename it to ``out_dir`` on success.

    Raises:
        MergeError: if ``out_dir`` already exists and is not empty (nothing is overwritten).
    """
    out_dir = check_output_dir(out_dir)
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


def _write_config_and_tokenizer(base: Path, tmp: Path, out_dtype: torch.dtype | None, vocab: Any = None) -> None:
    """The base's config (in ``out_dtype``) and tokenizer; with ``vocab`` (a :class:`~operators.merge.vocab.VocabPlan`),
    its tokenizer and its vocabulary size."""
    _write_config(base / "config.json", tmp / "config.json", out_dtype)
    if vocab is None:
        copy_tokenizer(base, tmp)
        return
    vocab.tokenizer.save_pretrained(tmp)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["vocab_size"] = vocab.size
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def output_plan(keys: list[str], ref: Any, out_dtype: torch.dtype | None) -> list[tuple[str, torch.dtype, tuple]]:
    """Every output tensor's name, dtype and shape (floating-point tensors in ``out_dtype``, if given)."""
    return [(k, (out_dtype or ref.dtype(k)) if ref.dtype(k).is_floating_point else ref.dtype(k), ref.shape(k))
            for k in keys]
