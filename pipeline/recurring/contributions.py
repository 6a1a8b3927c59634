"""Contributions: what contributors drop for the next recurring round, found, checked and prepared.

A contribution is a folder under ``recurring.contributions`` (a local folder or any ``pyarrow.fs``
URI) named by its id, with a ``manifest.yaml`` written last (a folder without one is an upload
still in progress and is ignored)::

    <contributions>/2026-11-26-alice-sentiment/
        manifest.yaml      task: sentiment
                           data: train.jsonl        # a file in this folder, a URI, or packaged:NAME
                           contributor: alice       # optional, recorded
        train.jsonl

or, instead of ``data``, ``checkpoint: expert/``: a finished expert (a mergeflow expert checkpoint
with ``heads/<task>/``, full or a peft LoRA adapter trained from the workflow's base model).

``mergeflow contribute`` writes one (checked first). A contribution is identified by its id and
a digest of its content, so a fixed contribution (same id, new bytes) counts as new. Rows whose
text is in the gate's eval split of the task are dropped before training (counted and recorded):
the gate is never trained on.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from operators.data import PACKAGED_PREFIX, DataError, read_table, table_split
from pipeline.spec import DatasetSpec, TaskSpec, Workflow
from pipeline.store import file_manifest

MANIFEST = "manifest.yaml"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_MANIFEST_KEYS = {"task", "data", "checkpoint", "format", "contributor", "note"}


class ContributionError(ValueError):
    """A contribution that cannot be used: one line naming the contribution, the field and the fix."""


@dataclass(frozen=True)
class Contribution:
    """One contribution as found in the contributions folder (checked or not)."""

    id: str
    uri: str  # the contribution's folder
    task: str = ""
    kind: str = ""  # "data" | "checkpoint"
    source: str = ""  # the data table's path/URI, or the checkpoint folder's
    contributor: str = ""
    digest: str = ""
    rows: int = 0  # training rows after removing the gate's eval texts (data)
    dropped_eval_rows: int = 0
    problem: str = ""  # why it cannot be used ("" when it can)
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problem

    @property
    def identity(self) -> str:
        """What marks a contribution consumed: its id and its content's digest."""
        return f"{self.id}@{self.digest}"

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "uri": self.uri, "task": self.task, "kind": self.kind, "source": self.source,
                "contributor": self.contributor, "digest": self.digest, "rows": self.rows,
                "dropped_eval_rows": self.dropped_eval_rows, "problem": self.problem}

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> Contribution:
        return cls(**{k: rec[k] for k in ("id", "uri", "task", "kind", "source", "contributor", "digest", "rows",
                                          "dropped_eval_rows", "problem", "manifest") if k in rec})


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def _join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def find(wf: Workflow) -> list[Contribution]:
    """Every complete contribution folder (one with a manifest), in id order, checked.

    A contribution that cannot be used comes back with ``problem`` set; it never hides the others.
    """
    root = wf.recurring.contributions
    fs, inner = _fs(root)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type != pafs.FileType.Directory:
        raise ContributionError(f"recurring.contributions: {root} is a file, not a folder; point it at a folder")
    found = []
    for entry in sorted(fs.get_file_info(pafs.FileSelector(inner, recursive=False)), key=lambda i: i.base_name):
        if entry.type != pafs.FileType.Directory or entry.base_name.startswith("."):
            continue
        if fs.get_file_info(f"{entry.path}/{MANIFEST}").type != pafs.FileType.File:
            continue  # still being written: its manifest comes last
        found.append(check(wf, entry.base_name, _join(root, entry.base_name)))
    return found


def _read_manifest(uri: str) -> dict[str, Any]:
    fs, inner = _fs(uri)
    with fs.open_input_stream(f"{inner}/{MANIFEST}") as f:
        raw = f.read()
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ContributionError(f"{MANIFEST} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ContributionError(f"{MANIFEST} must be a mapping with task: and data: (or checkpoint:)")
    unknown = sorted(set(data) - _MANIFEST_KEYS)
    if unknown:
        raise ContributionError(f"{MANIFEST}: unknown field {unknown[0]!r}; fields: {', '.join(sorted(_MANIFEST_KEYS))}")
    if ("data" in data) == ("checkpoint" in data):
        raise ContributionError(f"{MANIFEST}: give data: (a table) or checkpoint: (an expert), exactly one")
    return data


def _resolve(folder_uri: str, ref: str) -> str:
    """A manifest's reference: ``packaged:``, a URI, an absolute path, or a path inside the folder."""
    if ref.startswith(PACKAGED_PREFIX) or "://" in ref or ref.startswith("/"):
        return ref
    return _join(folder_uri, ref)


def check(wf: Workflow, cid: str, uri: str) -> Contribution:
    """Read and check one contribution; returns it with ``problem`` set when it cannot be used."""
    base = Contribution(cid, uri)
    if not _ID_RE.match(cid):
        return _bad(base, f"the folder name {cid!r} is not a contribution id (letters, digits, '_', '-', '.'); "
                          "rename it")
    try:
        m = _read_manifest(uri)
    except (ContributionError, OSError) as exc:
        return _bad(base, str(exc))
    task_names = [t.name for t in wf.tasks]
    task = str(m.get("task", ""))
    base = Contribution(cid, uri, task=task, contributor=str(m.get("contributor", "")), manifest=m)
    if task not in task_names:
        return _bad(base, f"{MANIFEST}: task {task!r} is not a task of workflow {wf.name!r} "
                          f"({', '.join(task_names)}); declare it in the spec's tasks or fix the manifest")
    spec = wf.task(task)
    try:
        if "data" in m:
            return _check_data(wf, spec, base, _resolve(uri, str(m["data"])), m.get("format"))
        return _check_checkpoint(wf, spec, base, _resolve(uri, str(m["checkpoint"])))
    except (ContributionError, DataError, OSError, pa.ArrowInvalid) as exc:
        return _bad(base, str(exc).splitlines()[0])


def _bad(c: Contribution, problem: str) -> Contribution:
    return Contribution(**{**c.__dict__, "problem": problem})


def training_rows(wf: Workflow, spec: TaskSpec, source: str, fmt: str | None = None,
                  ) -> tuple[list[str], list[int], int]:
    """A data contribution's training rows: every row whose text is not in the gate's eval split,
    capped at the task's ``dataset.max_train_examples`` (seeded). Returns (texts, label ids, dropped).

    Raises:
        DataError: a missing column, a row without text or label, a label outside the task's labels.
    """
    from pipeline.context import task_data

    gate_eval = set(task_data(spec).eval.texts)
    split = table_split(read_table(source, fmt), spec.dataset, spec.label_names, f"{source} (task {spec.name!r})")
    kept = [(t, y) for t, y in zip(split.texts, split.labels, strict=True) if t not in gate_eval]
    dropped = len(split) - len(kept)
    cap = spec.dataset.max_train_examples
    if cap is not None and len(kept) > cap:
        idx = np.sort(np.random.default_rng(spec.dataset.split_seed).permutation(len(kept))[:cap])
        kept = [kept[i] for i in idx]
    return [t for t, _ in kept], [y for _, y in kept], dropped


def _check_data(wf: Workflow, spec: TaskSpec, c: Contribution, source: str, fmt: str | None) -> Contribution:
    texts, labels, dropped = training_rows(wf, spec, source, fmt)
    if len(texts) < 2:
        raise ContributionError(f"{source}: {len(texts)} usable training rows after dropping {dropped} that are in "
                                f"the gate's eval split of {spec.name!r}; contribute at least 2 new rows")
    h = hashlib.sha256(json.dumps(c.manifest, sort_keys=True, default=str).encode())
    for t, y in zip(texts, labels, strict=True):
        h.update(t.encode() + b"\x1f%d\x1e" % y)
    return Contribution(**{**c.__dict__, "kind": "data", "source": source, "digest": h.hexdigest()[:16],
                           "rows": len(texts), "dropped_eval_rows": dropped})


def _check_checkpoint(wf: Workflow, spec: TaskSpec, c: Contribution, source: str) -> Contribution:
    from operators.checkpoint import resolve_model_path
    from operators.checkpoint_files import ADAPTER_CONFIG, head_names
    from operators.tensor_io import TensorReader

    local = _local_copy(source)
    try:
        if spec.name not in head_names(local):
            raise ContributionError(f"{source}: has no head for task {spec.name!r} (heads/{spec.name}/ with "
                                    "head.safetensors); contribute a mergeflow expert of that task")
        base = resolve_model_path(wf.base_model)
        try:
            with TensorReader(base) as ref:
                base_shapes = {k: ref.shape(k) for k in ref.keys()}
            if (local / ADAPTER_CONFIG).is_file():
                from operators.lora import map_modules, read_adapter

                adapter = read_adapter(local)
                map_modules(adapter, base_shapes, "the workflow's base model")
            else:
                with TensorReader(local) as r:
                    shapes = {k: r.shape(k) for k in r.keys()}
                wrong = sorted(k for k in base_shapes if k in shapes and shapes[k] != base_shapes[k])
                missing = sorted(set(base_shapes) - set(shapes))
                if wrong or missing:
                    k = (wrong or missing)[0]
                    raise ContributionError(f"{source}: does not fit the workflow's base model ({k}: "
                                            + (f"shape {list(shapes[k])} vs {list(base_shapes[k])}" if wrong else
                                               "missing") + "); contribute an expert of that base")
        except ContributionError:
            raise
        except Exception as exc:  # untrusted files: any failure to read them is a reason to skip, in one line
            raise ContributionError(f"{source}: not a usable checkpoint ({str(exc).splitlines()[0]})") from None
        h = hashlib.sha256(json.dumps(c.manifest, sort_keys=True, default=str).encode())
        h.update(json.dumps(file_manifest(local), sort_keys=True).encode())
    finally:
        if local != Path(source):
            shutil.rmtree(local, ignore_errors=True)
    return Contribution(**{**c.__dict__, "kind": "checkpoint", "source": source, "digest": h.hexdigest()[:16]})


def _local_copy(source: str) -> Path:
    """A local folder with the checkpoint's files (the folder itself when it is local)."""
    fs, inner = _fs(source)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        raise ContributionError(f"{source}: no such folder; checkpoint: must name the expert's folder")
    if isinstance(fs, pafs.LocalFileSystem):
        return Path(inner)
    tmp = Path(tempfile.mkdtemp(prefix="mergeflow-contribution-"))
    pafs.copy_files(inner, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return tmp


def prepare_expert_task(wf: Workflow, c: Contribution, store) -> TaskSpec:
    """The task an expert of data contribution ``c`` trains on: its training rows and the gate's eval
    split, written once to the store (durable, checksummed) and named there, so every worker reads
    the same rows and the expert's content key follows them."""
    spec = wf.task(c.task)
    path = contribution_data_path(wf, store, c.id, c.digest)
    if not store.is_complete(path):
        texts, labels, _ = training_rows(wf, spec, c.source, c.manifest.get("format"))
        _publish_task_data(store, path, spec, texts, [spec.label_names[y] for y in labels])
    return _stored_task(store, path, spec)


def contribution_data_path(wf: Workflow, store, cid: str, digest: str) -> str:
    return store.path(wf.name, "recurring", "data", f"{cid}-{digest}")


def prepare_replay_task(wf: Workflow, store, task: str, identities: list[str]) -> TaskSpec:
    """The task a replay expert trains on: every row of the task's data contributions that earlier
    promoted rounds accepted (``identities``: ``id@digest``, in order; a text seen twice counts once).

    ColD Fusion's contributors take part in round after round, each on its own data; here a task's
    accepted data is its contributor, so a round that brings data for one task does not make the
    fused model forget the others.
    """
    spec = wf.task(task)
    key = hashlib.sha256("\n".join(identities).encode()).hexdigest()[:16]
    path = store.path(wf.name, "recurring", "data", f"replay-{task}-{key}")
    if not store.is_complete(path):
        seen: dict[str, str] = {}
        for ident in identities:
            cid, digest = ident.split("@", 1)
            src = store.materialize(contribution_data_path(wf, store, cid, digest)) / "train.parquet"
            table = pq.read_table(src).to_pydict()
            for t, y in zip(table["text"], table["label"], strict=True):
                seen.setdefault(t, y)
        _publish_task_data(store, path, spec, list(seen), list(seen.values()))
    return _stored_task(store, path, spec)


def _publish_task_data(store, path: str, spec: TaskSpec, texts: list[str], labels: list[str]) -> None:
    from pipeline.context import task_data

    gate = task_data(spec).eval
    staging = store.staging_dir()
    try:
        d = staging / "data"
        d.mkdir()
        names = spec.label_names
        pq.write_table(pa.table({"text": texts, "label": labels}), d / "train.parquet")
        pq.write_table(pa.table({"text": gate.texts, "label": [names[y] for y in gate.labels]}), d / "eval.parquet")
        store.publish(d, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _stored_task(store, path: str, spec: TaskSpec) -> TaskSpec:
    uri = store.uri(path)
    ds = DatasetSpec(train=f"{uri}/train.parquet", eval=f"{uri}/eval.parquet", format="parquet",
                     text_column="text", label_column="label")
    return spec.model_copy(update={"dataset": ds})


def import_checkpoint(wf: Workflow, c: Contribution, store) -> str:
    """Copy checkpoint contribution ``c`` into the store once (checksummed); returns its store path."""
    path = store.path(wf.name, "recurring", "imported", f"{c.id}-{c.digest}")
    if not store.is_complete(path):
        local = _local_copy(c.source)
        staging = store.staging_dir()
        try:
            shutil.copytree(local, staging / "ckpt")
            store.publish(staging / "ckpt", path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if local != Path(c.source):
                shutil.rmtree(local, ignore_errors=True)
    return path


def contribute(wf: Workflow, source: str, task: str, cid: str | None = None, contributor: str = "") -> Contribution:
    """Add a contribution to the workflow's contributions folder, checked first.

    ``source``: a data table (local path, URI or ``packaged:NAME``) or an expert's checkpoint folder.
    A data file or checkpoint is copied into the contribution's folder; ``packaged:`` is named. The
    manifest is written last, so a round never sees half a contribution.

    Raises:
        ContributionError: naming what is wrong, before anything is written.
    """
    root = wf.recurring.contributions
    fs, inner = _fs(root)
    packaged = source.startswith(PACKAGED_PREFIX)
    if not packaged:
        sfs, sinner = _fs(source)
        kind = sfs.get_file_info(sinner).type
        if kind == pafs.FileType.NotFound:
            raise ContributionError(f"{source}: no such file or folder")
    is_dir = not packaged and kind == pafs.FileType.Directory
    cid = cid or f"{_stamp()}-{task}"
    if not _ID_RE.match(cid):
        raise ContributionError(f"--id: {cid!r} is not a contribution id (letters, digits, '_', '-', '.')")
    target = f"{inner}/{cid}"
    if fs.get_file_info(target).type != pafs.FileType.NotFound:
        raise ContributionError(f"--id: a contribution {cid!r} is already in {root}; choose another id")
    manifest: dict[str, Any] = {"task": task}
    if contributor:
        manifest["contributor"] = contributor
    if packaged:
        manifest["data"] = source
    elif is_dir:
        manifest["checkpoint"] = "checkpoint"
    else:
        name = Path(sinner).name
        manifest["data"] = name
        if "." not in name:
            raise ContributionError(f"{source}: give the file an extension (.jsonl, .csv or .parquet)")
    # check it exactly as a round will, from a scratch folder, before writing anything
    with tempfile.TemporaryDirectory(prefix="mergeflow-contribute-") as tmp:
        scratch = Path(tmp) / cid
        scratch.mkdir()
        if not packaged:  # a file or a whole folder (copy_files takes either)
            dest = scratch / ("checkpoint" if is_dir else Path(sinner).name)
            pafs.copy_files(sinner, str(dest), source_filesystem=sfs, destination_filesystem=pafs.LocalFileSystem())
        (scratch / MANIFEST).write_text(yaml.safe_dump(manifest, sort_keys=False))
        checked = check(wf, cid, str(scratch))
        if not checked.ok:
            raise ContributionError(f"contribution {cid!r}: {checked.problem}")
        # data files first, the manifest last
        fs.create_dir(target, recursive=True)
        for p in sorted(scratch.rglob("*")):
            rel = p.relative_to(scratch).as_posix()
            if p.is_dir() or rel == MANIFEST:
                continue
            fs.create_dir(f"{target}/{Path(rel).parent.as_posix()}".rstrip("/."), recursive=True)
            pafs.copy_files(str(p), f"{target}/{rel}", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        with fs.open_output_stream(f"{target}/{MANIFEST}") as f:
            f.write((scratch / MANIFEST).read_bytes())
    return Contribution(**{**checked.__dict__, "uri": _join(root, cid)})


def _stamp() -> str:
    import time

    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())
