"""Task data: read a table (Parquet, JSON Lines, CSV or a packaged dataset), check it, split it.

Paths may be local or any ``pyarrow.fs`` URI (``file://``, ``s3://``, ``gs://``, ``hdfs://``).
Every problem is reported with the dataset, the column or value, and what would fix it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from operators.packaged_data import PACKAGED_PREFIX, load_packaged

_EXT_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


class DataError(ValueError):
    """Task data that cannot be used, with the fix."""


class DatasetLike(Protocol):
    source: str | None
    prompt_column: str | None
    answer_column: str | None
    template: object | None
    train: str | None
    eval: str | None
    format: str | None
    text_column: str
    label_column: str
    eval_fraction: float
    split_seed: int
    max_train_examples: int | None
    max_eval_examples: int | None


@dataclass(frozen=True)
class Split:
    """One split of one task.

    Classification: ``texts`` and integer label ids ``labels``. Causal LM: ``texts`` are the texts
    to model (the responses when ``prompts`` are given; the loss covers only them), ``labels`` is
    empty, and ``answers`` (optional) are the references for exact-match evaluation.
    """

    texts: list[str]
    labels: list[int]
    prompts: list[str] | None = None
    answers: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, idx) -> Split:
        """The rows at ``idx``, in that order."""
        def pick(xs: list[str] | None) -> list[str] | None:
            return None if xs is None else [xs[i] for i in idx]

        return Split([self.texts[i] for i in idx], [self.labels[i] for i in idx] if self.labels else [],
                     pick(self.prompts), pick(self.answers))


@dataclass(frozen=True)
class TaskData:
    """A task's train and eval splits, label names, and a fingerprint of the data for lineage."""

    name: str
    label_names: list[str]
    train: Split
    eval: Split
    source: str
    digest: str
    task_type: str = "classification"

    @property
    def is_lm(self) -> bool:
        return self.task_type == "causal_lm"

    def targets(self, split: Split) -> list[str]:
        """What a model is asked to produce for each row: label names, or the response texts."""
        if self.is_lm:
            return list(split.answers if split.answers is not None else split.texts)
        return [self.label_names[i] for i in split.labels]

    def inputs(self, split: Split) -> list[str]:
        """What a model is given for each row: the texts (classification), or the prompts (causal LM)."""
        if self.is_lm and split.prompts is not None:
            return list(split.prompts)
        return list(split.texts)


def infer_format(path: str, explicit: str | None) -> str:
    if explicit:
        return explicit
    suffix = Path(path.split("?")[0]).suffix.lower()
    try:
        return _EXT_FORMATS[suffix]
    except KeyError:
        raise DataError(
            f"{path}: cannot tell the file format from the extension {suffix!r}; set dataset.format to "
            "one of parquet, jsonl, csv"
        ) from None


def read_table(path: str, fmt: str | None = None) -> pa.Table:
    """Read one table from a local path, a ``pyarrow.fs`` URI, or ``packaged:NAME``."""
    if path.startswith(PACKAGED_PREFIX):
        try:
            return load_packaged(path[len(PACKAGED_PREFIX):])
        except ValueError as exc:
            raise DataError(str(exc)) from None
    fmt = infer_format(path, fmt)
    try:
        if "://" in path:
            fs, inner = pafs.FileSystem.from_uri(path)
        else:
            fs, inner = pafs.LocalFileSystem(), str(Path(path).resolve())
        info = fs.get_file_info(inner)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: cannot open ({exc})") from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{path}: no such file. Check dataset paths in the spec (relative paths are from the working directory).")
    try:
        if fmt == "parquet":
            return pq.read_table(inner, filesystem=fs)
        with fs.open_input_stream(inner) as stream:
            if fmt == "csv":
                return pacsv.read_csv(stream)
            return pajson.read_json(stream)
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path}: not a valid {fmt} file ({exc}); set dataset.format if the extension misleads") from None


def _column(table: pa.Table, name: str, what: str, where: str) -> list:
    if name not in table.column_names:
        raise DataError(
            f"{where}: no {what} column {name!r}; the columns are {table.column_names}. "
            f"Set dataset.{what}_column to one of them."
        )
    return table.column(name).to_pylist()


def _to_ids(values: list, label_names: list[str], where: str, column: str) -> list[int]:
    index = {n: i for i, n in enumerate(label_names)}
    ids = []
    for row, v in enumerate(values):
        if v is None:
            raise DataError(f"{where}: row {row} has no label (null in column {column!r}); drop or fill it")
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, (int, np.integer)) and str(v) not in index:
            if 0 <= int(v) < len(label_names):
                ids.append(int(v))
                continue
        key = str(v)
        if key not in index:
            raise DataError(
                f"{where}: row {row} has label {v!r}, which is not among the declared labels {label_names}. "
                "Add it to the task's labels, or fix the data."
            )
        ids.append(index[key])
    return ids


def _to_split(table: pa.Table, ds: DatasetLike, label_names: list[str], where: str) -> Split:
    texts = _column(table, ds.text_column, "text", where)
    labels = _column(table, ds.label_column, "label", where)
    for row, t in enumerate(texts):
        if t is None:
            raise DataError(f"{where}: row {row} has no text (null in column {ds.text_column!r}); drop or fill it")
    return Split([str(t) for t in texts], _to_ids(labels, label_names, where, ds.label_column))


def table_split(table: pa.Table, ds: DatasetLike, label_names: list[str], where: str) -> Split:
    """Every row of a classification table as one split (columns from ``ds``; labels checked)."""
    return _to_split(table, ds, label_names, where)


def _to_lm_split(table: pa.Table, ds: DatasetLike, where: str) -> Split:
    """A causal-LM split: texts (responses), optional prompts and answers, from columns or a template."""
    def strings(name: str, what: str) -> list[str]:
        values = _column(table, name, what, where)
        for row, v in enumerate(values):
            if v is None:
                raise DataError(f"{where}: row {row} has no {what} (null in column {name!r}); drop or fill it")
        return [str(v) for v in values]

    template = getattr(ds, "template", None)
    if template is not None:
        missing = [c for c in template.columns() if c not in table.column_names]
        if missing:
            raise DataError(f"{where}: dataset.template uses column {missing[0]!r}, which the table lacks; the "
                            f"columns are {table.column_names}")
        rows = table.select(template.columns()).to_pylist()
        prompts = [template.prompt.format(**r) for r in rows]
        texts = [template.response.format(**r) for r in rows]
    else:
        texts = strings(ds.text_column, "text")
        prompts = strings(ds.prompt_column, "prompt") if ds.prompt_column else None
    answers = strings(ds.answer_column, "answer") if ds.answer_column else None
    return Split(texts, [], prompts, answers)


def _cap(split: Split, limit: int | None, seed: int) -> Split:
    if limit is None or len(split) <= limit:
        return split
    idx = np.random.default_rng(seed).permutation(len(split))[:limit]
    idx.sort()
    return split.take(idx)


def load_task_data(task_name: str, ds: DatasetLike, label_names: list[str],
                   task_type: str = "classification") -> TaskData:
    """Read, check and split one task's data.

    Args:
        task_name: The task's name (for messages).
        ds: The task's dataset settings (``DatasetSpec``).
        label_names: The declared labels; ids are positions in this list (empty for causal LM).
        task_type: ``classification`` or ``causal_lm``.

    Returns:
        The task's train and eval splits.

    Raises:
        DataError: missing file or column, empty split, or a label outside ``label_names``.
    """
    def to_split(table: pa.Table, where: str) -> Split:
        if task_type == "causal_lm":
            return _to_lm_split(table, ds, where)
        return _to_split(table, ds, label_names, where)

    if ds.source:
        where = f"tasks.{task_name}.dataset ({ds.source})"
        full = to_split(read_table(ds.source, ds.format), where)
        if len(full) < 2:
            raise DataError(f"{where}: has {len(full)} rows; need at least 2 to make a train and an eval split")
        perm = np.random.default_rng(ds.split_seed).permutation(len(full))
        n_eval = max(1, int(round(len(full) * ds.eval_fraction)))
        eval_idx, train_idx = np.sort(perm[:n_eval]), np.sort(perm[n_eval:])
        train, evals = full.take(train_idx), full.take(eval_idx)
        source = ds.source
    else:
        assert ds.train and ds.eval  # the spec guarantees it
        train = to_split(read_table(ds.train, ds.format), f"tasks.{task_name}.dataset.train ({ds.train})")
        evals = to_split(read_table(ds.eval, ds.format), f"tasks.{task_name}.dataset.eval ({ds.eval})")
        source = f"{ds.train} | {ds.eval}"
        where = f"tasks.{task_name}.dataset"
    train = _cap(train, ds.max_train_examples, ds.split_seed)
    evals = _cap(evals, ds.max_eval_examples, ds.split_seed + 1)
    for split_name, split in (("train", train), ("eval", evals)):
        if len(split) == 0:
            raise DataError(f"{where}: the {split_name} split is empty; add rows or lower dataset.eval_fraction")
    h = hashlib.sha256()
    for split in (train, evals):
        if task_type == "causal_lm":  # (classification digests keep their old form: stored keys stay valid)
            for i, t in enumerate(split.texts):
                prompt = split.prompts[i] if split.prompts is not None else ""
                answer = split.answers[i] if split.answers is not None else ""
                h.update(b"\x1f".join(x.encode() for x in (prompt, t, answer)) + b"\x1e")
            continue
        for t, y in zip(split.texts, split.labels, strict=True):
            h.update(t.encode())
            h.update(b"\x1f%d\x1e" % y)
    return TaskData(task_name, list(label_names), train, evals, source, h.hexdigest()[:16], task_type)


def hold_out(data: TaskData, fraction: float, seed: int = 0) -> tuple[TaskData, TaskData]:
    """Split a validation slice off the training split (the eval split is untouched).

    Returns ``(fit, validation)``: ``fit`` trains on the rest of the training split,
    ``validation`` trains on the slice. Seeded, so the same rows are held out every time; each
    gets its own digest, so checkpoints trained on either are told apart in the store.
    """
    n = len(data.train)
    n_val = max(1, int(round(n * fraction)))
    if n_val >= n:
        raise DataError(f"tasks.{data.name}: validation_fraction {fraction} leaves no training rows "
                        f"({n} in the train split); lower it")
    perm = np.random.default_rng(seed).permutation(n)
    val_idx, fit_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])

    def take(idx) -> Split:
        return data.train.take(idx)

    tag = f"{fraction}/{seed}"
    fit = replace(data, train=take(fit_idx), digest=_sub_digest(data.digest, "fit", tag))
    val = replace(data, train=take(val_idx), digest=_sub_digest(data.digest, "validation", tag))
    return fit, val


def _sub_digest(digest: str, part: str, tag: str) -> str:
    return hashlib.sha256(f"{digest}/{part}/{tag}".encode()).hexdigest()[:16]
