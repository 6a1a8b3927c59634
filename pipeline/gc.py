"""Giving the store's space back: ``mergeflow gc SPEC`` removes the checkpoints of a workflow's old rounds
that nothing needs any more, and never one a registry version points at.

The store keeps every expert and merged model a workflow made (content-addressed, so a re-run or another
merge reuses them). Over many ATM rounds, or runs, that grows past what anyone needs. What is kept:

- every checkpoint a registry version on the workflow's tracking server points at (its
  ``mergeflow.store_uri`` tag, or a source outside MLflow; any registered model, ``compare``'s variants
  included): a version never points at nothing (delete the version in MLflow first to release it);
- every checkpoint of the last ``keep_rounds`` rounds that have a merged model, and of any round after
  them (what the next run resumes from);
- and what each kept checkpoint needs, followed through provenance: the experts a merged model was
  merged from, and the checkpoint a LoRA adapter loads onto (its ``adapter_base``);
- everything outside ``round-*`` (records, baselines, recurring contributions).

Everything else under the workflow's ``round-*`` folders is removed, marker first (a reader never
trusts what is left if the removal is interrupted), together with staging left by killed writers
(:meth:`CheckpointStore.remove_leftovers`). It runs holding the workflow's run lease, so no run of
that workflow writes meanwhile; ``dry_run`` says what would go and removes nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

from pipeline.attempts import Lease, WorkflowBusy, describe_holder
from pipeline.driver import RUN_LEASE, RUN_LEASE_TTL_S
from pipeline.lineage import Lineage
from pipeline.redact import redact_text
from pipeline.spec import Workflow
from pipeline.store import COMPLETE_MARKER, CheckpointStore

ROUND_DIR = re.compile(r"^round-(\d+)$")


@dataclass
class Checkpoint:
    path: str  # in the store's filesystem
    uri: str
    round: int
    bytes: int
    why_kept: str | None = None


@dataclass
class GcResult:
    """What ``gc`` kept, removed (or, dry, would remove), and the space involved."""

    kept: list[Checkpoint] = field(default_factory=list)
    removed: list[Checkpoint] = field(default_factory=list)
    leftovers: int = 0
    leftover_bytes: int = 0
    missing: list[str] = field(default_factory=list)  # versions pointing at checkpoints this store lacks
    dry_run: bool = True

    @property
    def removed_bytes(self) -> int:
        return sum(c.bytes for c in self.removed) + self.leftover_bytes


def _size(store: CheckpointStore, path: str) -> int:
    infos = store.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File)


def _checkpoints(store: CheckpointStore, workflow: str) -> list[Checkpoint]:
    """Every checkpoint folder under the workflow's ``round-*/<kind>/`` (complete or not), oldest round first."""
    out = []
    for rnd in store.list_names(store.path(workflow)):
        m = ROUND_DIR.match(rnd)
        if m is None:
            continue
        for kind in store.list_names(store.path(workflow, rnd)):
            for name in store.list_names(store.path(workflow, rnd, kind)):
                path = store.path(workflow, rnd, kind, name)
                if name.startswith(".") or store.fs.get_file_info(path).type != pafs.FileType.Directory:
                    continue  # staging and partial copies: remove_leftovers' business
                out.append(Checkpoint(path, store.uri(path), int(m.group(1)), _size(store, path)))
    return sorted(out, key=lambda c: (c.round, c.path))


def _provenance(store: CheckpointStore, path: str) -> dict:
    try:
        with store.fs.open_input_stream(f"{path}/mergeflow.json") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return {}


def _needed_by(prov: dict) -> list[str]:
    """The URIs a checkpoint needs kept beside it: the experts it was merged from (a merged model) and the
    checkpoint a LoRA adapter loads onto (``adapter_base``, its own or its parents')."""
    out = []
    for ab in (prov.get("adapter_base"),):
        if isinstance(ab, dict) and ab.get("kind") != "base" and ab.get("uri"):
            out.append(ab["uri"])
        elif isinstance(ab, str) and ab:
            out.append(ab)
    if prov.get("kind") == "merged":
        for parent in prov.get("parents") or []:
            if parent.get("kind") == "expert" and parent.get("uri"):
                out.append(parent["uri"])
            ab = parent.get("adapter_base") or {}
            if ab.get("kind") not in (None, "base") and ab.get("uri"):
                out.append(ab["uri"])
    return out


class GcRefused(ValueError):
    """gc cannot tell what the registry needs: it removes nothing (one line, with the fix)."""


def registered_store_uris(wf: Workflow) -> dict[str, list[str]]:
    """Store URI -> the versions (``name vN``) of every registered model on the workflow's tracking server
    that point at it: ``compare``'s variants register under names of their own.

    Raises:
        GcRefused: the tracking store is not the one the workflow ran against (no database there, or no
            experiment of the workflow in it): its registry would pin nothing, and gc would remove all.
    """
    uri = wf.tracking.uri
    where = f"tracking.uri {redact_text(uri)!r}"
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise GcRefused(f"{where}: no MLflow database there, so gc cannot tell which checkpoints registry versions "
                        "point at; run gc where the workflow's tracking.uri resolves (a relative sqlite path is "
                        "relative to the current folder), or pass --tracking-uri")
    lineage = Lineage(uri, "", retry_seconds=wf.tracking.retry_seconds)
    if not lineage.experiment_exists(wf.experiment_name):
        raise GcRefused(f"{where}: no experiment {wf.experiment_name!r} there: not the tracking server this workflow "
                        "ran against, whose registry says what must stay; pass its --tracking-uri")
    return lineage.store_uris_of_versions()


def _round_key(uri: str, workflow: str) -> str | None:
    """``round-NNN/<kind>/<name>`` of a checkpoint URI of ``workflow`` (however the store's root is written or
    mounted), or None for one elsewhere."""
    m = re.search(rf"(?:^|/){re.escape(workflow)}/(round-\d+/[^/]+/[^/]+)/?$", uri)
    return m.group(1) if m else None


def plan(wf: Workflow, store: CheckpointStore, pinned: dict[str, list[str]], keep_rounds: int) -> GcResult:
    """Decide what stays: ``pinned`` maps a store URI to the registry versions pointing at it."""
    found = _checkpoints(store, wf.name)
    by_key = {_round_key(c.uri, wf.name): c for c in found}
    # the last keep_rounds rounds that have a merged model (what the next run resumes from), and every round
    # after them (a run killed before it merged)
    merged_rounds = sorted({c.round for c in found if "/merged/" in c.uri})
    cutoff = merged_rounds[-min(keep_rounds, len(merged_rounds))] if keep_rounds and merged_rounds else None
    if keep_rounds and cutoff is None and found:
        cutoff = min(c.round for c in found)
    result = GcResult()
    queue = []
    for uri, versions in pinned.items():
        key = _round_key(redact_text(uri), wf.name)
        if key is None:
            continue
        if key in by_key:
            queue.append((key, f"registered as {', '.join(sorted(versions))}"))
        else:
            result.missing.append(f"{', '.join(sorted(versions))} point(s) at {redact_text(uri)}, not in this store")
    for c in found:
        if cutoff is not None and c.round >= cutoff:
            queue.append((_round_key(c.uri, wf.name), f"round {c.round}: among the last {keep_rounds} merged round(s) "
                                                       "or after them"))
    while queue:  # every checkpoint kept, then what it needs, through provenance
        key, why = queue.pop(0)
        c = by_key.get(key)
        if c is None or c.why_kept is not None:
            continue
        c.why_kept = why
        queue += [(_round_key(redact_text(u), wf.name), f"needed by {c.uri.rsplit('/', 1)[-1]} ({why})")
                  for u in _needed_by(_provenance(store, c.path))]
    for c in found:
        (result.kept if c.why_kept else result.removed).append(c)
    return result


def collect(wf: Workflow, *, keep_rounds: int = 1, dry_run: bool = True,
            report: Callable[[str], None] = print) -> GcResult:
    """Remove (or, ``dry_run``, list) the checkpoints of ``wf``'s store that nothing needs; see the module.

    Raises:
        WorkflowBusy: a run of the workflow holds the store's run lease (it may be writing).
    """
    if keep_rounds < 0:
        raise ValueError(f"--keep-rounds: {keep_rounds} is negative; give 0 or more rounds to keep")
    store = CheckpointStore(wf.store.root)
    lease = Lease(store, store.path(wf.name, RUN_LEASE), RUN_LEASE_TTL_S, heartbeat=True)
    holder = lease.acquire(report, f"gc of workflow {wf.name!r}")
    if holder is not None:
        raise WorkflowBusy(f"workflow {wf.name!r} is running on store {redact_text(wf.store.root)!r} "
                           f"({describe_holder(holder)}); gc waits until no run of it writes: run it afterwards",
                           holder)
    try:
        result = plan(wf, store, registered_store_uris(wf), keep_rounds)
        result.dry_run = dry_run
        if not dry_run:
            for c in result.removed:
                if store.fs.get_file_info(f"{c.path}/{COMPLETE_MARKER}").type == pafs.FileType.File:
                    store.discard(c.path)
                else:  # never completed (an object store's interrupted copy): nobody trusts it
                    store.fs.delete_dir(c.path)
            removed, size = store.remove_leftovers(wf.name)
            result.leftovers, result.leftover_bytes = len(removed), size
    finally:
        lease.release()
    return result
