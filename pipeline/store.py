"""The checkpoint store: where experts and merged models live, on any ``pyarrow.fs`` filesystem.

- A root is a local folder (default ``mergeflow-store``) or a URI (``s3://bucket/prefix``,
  ``gs://...``, ``hdfs://...``, ``file:///...``); the code path is the same ``pyarrow.fs`` API.
- A checkpoint becomes visible only when complete. Locally it is copied to a hidden partial
  directory and renamed into place (atomic). On object stores, where a directory rename is not
  atomic, a ``_COMPLETE`` marker is written last. Readers trust a checkpoint only if its marker is
  there, on every filesystem.
- The marker holds a manifest: each file's size and sha256, taken (streamed) from the staged copy
  before it became visible. Reusing or reading a checkpoint checks its files against it, so bytes
  flipped or cut off on disk are caught before the checkpoint is merged (:class:`CorruptCheckpoint`).
  A checkpoint is hashed once per process (about a second per GB on one core) and again only if a
  file's size or modification time changes; an empty marker (written before manifests existed)
  cannot be checked and is trusted as before.
- Keys are content addresses: an expert's key hashes what determines its weights (start model,
  task, data and fine-tuning settings), so re-running a workflow, or trying another merge method on
  the same experts, reuses them instead of training again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

COMPLETE_MARKER = "_COMPLETE"
_CHUNK = 1 << 20
# Checkpoints this process has hashed (or written) and found whole, with their files' sizes and
# modification times then: each is hashed once per process unless a file is rewritten meanwhile.
_VERIFIED: dict[str, tuple] = {}


class StoreError(RuntimeError):
    """A store operation that failed, with the URI and what to do."""


class CorruptCheckpoint(StoreError):
    """A published checkpoint whose files no longer match the checksums taken when it was published."""

    def __init__(self, uri: str, problems: list[str]):
        self.uri = uri
        self.problems = problems
        self.reason = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        super().__init__(f"{uri}: checkpoint is corrupt ({self.reason}); it was changed after it was published. "
                         "Delete it (or re-run the workflow, which rebuilds it) instead of using it.")


class StoreFull(StoreError):
    """The store's filesystem ran out of space (or quota) while a checkpoint was written."""


# what a full disk looks like from Python (errno), pyarrow and safetensors' Rust writer (text only)
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_FULL_TEXTS = ("No space left on device", "StorageFull", "Disk quota exceeded", "File too large")


def out_of_space(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is a full disk or an exceeded quota."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if any(t in str(exc) for t in _FULL_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def store_full_error(what: str, uri: str, exc: BaseException) -> StoreFull:
    """The error to raise when writing ``what`` to ``uri`` ran out of space: what happened and what to do."""
    return StoreFull(f"the checkpoint store is full: writing {what} to {uri} failed ({exc}). Nothing of it was "
                     "published (its partial copy is removed) and every step already finished is kept: free space "
                     "on the store (or point store.root elsewhere) and run the workflow again; it resumes from them.")


def _sha256(stream) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def file_manifest(local_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Relative path → ``{"size", "sha256"}`` of every file under ``local_dir`` (streamed, not loaded)."""
    out = {}
    for p in sorted(Path(local_dir).rglob("*")):
        if p.is_file() and p.name != COMPLETE_MARKER:
            with p.open("rb") as f:
                out[p.relative_to(local_dir).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(f)}
    return out


def _marker_text(manifest: dict[str, dict[str, Any]]) -> str:
    return json.dumps({"manifest_version": 1, "files": manifest}, indent=1, sort_keys=True)


def _writer_tag() -> str:
    """``w~HOST~PID~START~``: who writes a staging or partial directory, so that the next run can tell one
    whose writer died (a SIGKILLed driver, a worker lost mid-write) from one still being written."""
    import psutil

    pid = os.getpid()
    return f"w~{_host()}~{pid}~{int(psutil.Process(pid).create_time() * 1000)}~"


def _host() -> str:
    """This host, and its PID namespace where there is one: containers that share a host name (host
    networking) but not their pids are told apart."""
    try:
        return f"{socket.gethostname()}.ns{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


def _orphaned(name: str) -> bool:
    """Whether the writer named in ``name`` (a :func:`_writer_tag`) is known to be gone: on this host, its
    pid is not running, or runs a process started at another time. Another host's writer is unknowable."""
    import psutil

    m = re.search(r"w~([^~]+)~(\d+)~(\d+)~", name)
    if m is None or m.group(1) != _host():
        return False
    try:
        proc = psutil.Process(int(m.group(2)))
        return proc.status() == psutil.STATUS_ZOMBIE or abs(proc.create_time() * 1000 - int(m.group(3))) > 1000
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _tree_bytes(path: Path) -> int:
    total = 0
    try:
        for f in path.rglob("*"):
            if f.is_file() and not f.is_symlink():
                total += f.stat().st_size
    except OSError:  # removed meanwhile (another run cleaning up the same staging): count what was seen
        pass
    return total


def content_key(*parts: Any) -> str:
    """A short, stable hash of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


class CheckpointStore:
    """Publish and fetch checkpoint directories under one root URI."""

    def __init__(self, root: str, cache_dir: str | Path | None = None):
        self.root_uri = root
        if "://" in root:
            self.fs, self._root = pafs.FileSystem.from_uri(root)
            self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        else:
            self.fs, self._root = pafs.LocalFileSystem(), str(Path(root).resolve())
            self.is_local = True
        self._root = self._root.rstrip("/")
        self.cache_dir = Path(cache_dir or os.environ.get("MERGEFLOW_CACHE", Path.home() / ".cache" / "mergeflow"))

    # --- addressing ---------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """The filesystem path (inside ``self.fs``) of a key under the root."""
        return "/".join([self._root, *[p.strip("/") for p in parts]])

    def uri(self, path: str) -> str:
        """A URI a user (or another process) can open: a local path, or scheme://path."""
        if self.is_local:
            return path
        scheme = self.root_uri.split("://", 1)[0]
        return f"{scheme}://{path}"

    # --- state --------------------------------------------------------------------------------
    def is_complete(self, path: str) -> bool:
        info = self.fs.get_file_info(f"{path}/{COMPLETE_MARKER}")
        return info.type == pafs.FileType.File

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    # --- writing ------------------------------------------------------------------------------
    def publish(self, local_dir: str | Path, path: str, *, move: bool = True) -> str:
        """Make ``local_dir`` the complete checkpoint at ``path``; returns ``path``.

        The checkpoint is invisible (no marker) until every file is in place. If a complete
        checkpoint is already at ``path`` (a concurrent or repeated step), it is kept and the new
        copy discarded: content-addressed keys mean both hold the same thing.
        """
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise StoreError(f"publish: {local_dir} is not a directory")
        if self.is_complete(path):
            if move:
                shutil.rmtree(local_dir, ignore_errors=True)
            return path
        if self.is_local:
            target = Path(path)
            partial = target.parent / f".{target.name}.partial-{_writer_tag()}{uuid.uuid4().hex[:8]}"
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                if move:
                    shutil.move(str(local_dir), partial)
                else:
                    shutil.copytree(local_dir, partial)
                (partial / COMPLETE_MARKER).write_text(_marker_text(file_manifest(partial)))
                if target.exists():  # an incomplete leftover from a crashed run: replace it
                    shutil.rmtree(target)
                os.rename(partial, target)
            except BaseException as exc:
                shutil.rmtree(partial, ignore_errors=True)
                if out_of_space(exc):
                    raise store_full_error("a checkpoint", self.uri(path), exc) from exc
                raise
            self._remember(path)  # hashed just now, from the bytes that were renamed into place
            return path
        # object stores: copy every file, then the marker (with the manifest) last
        manifest = file_manifest(local_dir)
        try:
            if self.exists(path):
                self.fs.delete_dir(path)
            self.fs.create_dir(path, recursive=True)
            pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
            with self.fs.open_output_stream(f"{path}/{COMPLETE_MARKER}") as f:
                f.write(_marker_text(manifest).encode())
        except OSError as exc:  # no marker was written: readers never see this copy
            if out_of_space(exc):
                raise store_full_error("a checkpoint", self.uri(path), exc) from exc
            raise
        if move:
            shutil.rmtree(local_dir, ignore_errors=True)
        self._remember(path)
        return path

    def discard(self, path: str) -> None:
        """Remove the checkpoint at ``path`` (a corrupt one): the marker goes first, so no reader
        trusts what is left if the removal is interrupted."""
        _VERIFIED.pop(self.uri(path), None)
        if self.is_complete(path):
            self.fs.delete_file(f"{path}/{COMPLETE_MARKER}")
        if self.is_local:
            target = Path(path)
            if target.exists():
                doomed = target.parent / f".{target.name}.discarded-{_writer_tag()}{uuid.uuid4().hex[:8]}"
                os.rename(target, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
        elif self.exists(path):
            self.fs.delete_dir(path)

    # --- integrity ----------------------------------------------------------------------------
    def verify(self, path: str) -> bool:
        """Check the complete checkpoint at ``path`` against its manifest (once per process).

        Returns:
            True when checked (now or earlier in this process), False for a checkpoint published
            without a manifest (nothing to check against).

        Raises:
            CorruptCheckpoint: a file is missing, has another size, or other bytes.
        """
        uri = self.uri(path)
        with self.fs.open_input_stream(f"{path}/{COMPLETE_MARKER}") as f:
            files = _read_manifest(f.read(), uri)
        if files is None:
            return False
        infos = self.fs.get_file_info([f"{path}/{rel}" for rel in sorted(files)])
        fingerprint = tuple((i.path, i.size, i.mtime_ns) for i in infos)
        if _VERIFIED.get(uri) == fingerprint:
            return True
        problems = []
        for (rel, want), info in zip(sorted(files.items()), infos, strict=True):
            if info.type != pafs.FileType.File:
                problems.append(f"{rel} is missing")
            elif info.size != want["size"]:
                problems.append(f"{rel} has {info.size} bytes, {want['size']} were published")
            else:
                with self.fs.open_input_stream(f"{path}/{rel}") as f:
                    if _sha256(f) != want["sha256"]:
                        problems.append(f"{rel} has other bytes than were published (sha256 differs)")
        if problems:
            raise CorruptCheckpoint(uri, problems)
        _VERIFIED[uri] = fingerprint
        return True

    def _remember(self, path: str) -> None:
        """Record a checkpoint this process has just hashed and published as whole."""
        with self.fs.open_input_stream(f"{path}/{COMPLETE_MARKER}") as f:
            files = _read_manifest(f.read(), self.uri(path)) or {}
        infos = self.fs.get_file_info([f"{path}/{rel}" for rel in sorted(files)])
        _VERIFIED[self.uri(path)] = tuple((i.path, i.size, i.mtime_ns) for i in infos)

    def staging_dir(self) -> Path:
        """A fresh local directory to write a checkpoint into before publishing it.

        For a local store it sits on the same filesystem as the root, so publishing is a rename.
        """
        if self.is_local:
            base = Path(self._root) / ".staging"
            base.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(dir=base, prefix=_writer_tag()))
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self.cache_dir, prefix=f"staging-{_writer_tag()}"))

    def remove_leftovers(self, under: str = "") -> tuple[list[Path], int]:
        """Remove what writers that died mid-write left on this host: staging directories, and partial or
        half-discarded copies beside checkpoints (under ``under``, a key prefix: the workflow's own).

        Each names its writer (host, pid, start time); only those of a writer known to be gone are
        removed, so a concurrent run's writes are never touched, nor another host's (unknowable from here).
        Every writer removes its own on failure; these are left by a process killed mid-write.

        Returns:
            The directories removed and their bytes.
        """
        candidates: list[Path] = []
        if self.is_local:
            staging = Path(self._root) / ".staging"
            if staging.is_dir():
                candidates += [d for d in staging.iterdir() if d.is_dir()]
            top = Path(self.path(under)) if under else Path(self._root)
            if top.is_dir():
                candidates += [d for d in top.rglob(".*") if d.is_dir() and (".partial-w~" in d.name or
                                                                          ".discarded-w~" in d.name)]
        if self.cache_dir.is_dir():
            candidates += [d for d in self.cache_dir.glob("staging-w~*") if d.is_dir()]
        removed, size = [], 0
        for d in candidates:
            if _orphaned(d.name):
                size += _tree_bytes(d)
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
        return removed, size

    # --- small records (JSON documents beside the checkpoints) ---------------------------------
    def write_record(self, path: str, obj: Any) -> None:
        """Write a small JSON document atomically: readers see the old one or the new one, never half.

        Locally a temporary file renamed into place; on object stores one PUT (atomic per object).
        """
        data = json.dumps(obj, indent=2, sort_keys=True).encode()
        if self.is_local:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, target)
            return
        parent = path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def read_record(self, path: str) -> Any | None:
        """The JSON document at ``path`` (``None`` when there is none)."""
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            raw = f.read()
        try:
            return json.loads(raw)
        except ValueError:
            raise StoreError(f"{self.uri(path)}: not a JSON document (was it edited by hand?); fix or remove it") from None

    def list_names(self, path: str) -> list[str]:
        """Names directly under ``path`` (files and folders), sorted; empty when it does not exist."""
        if self.fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
        return sorted(i.base_name for i in infos)

    def try_lease(self, path: str, holder: dict[str, Any]) -> dict[str, Any] | None:
        """Take the lease at ``path`` for ``holder``; returns ``None`` when taken, else the current holder.

        Locally the lease file is created with O_EXCL: of two processes racing, exactly one wins.
        On object stores (no create-if-absent through pyarrow) it is written when absent and read
        back; two writers within the same instant could both believe they hold it, so cluster
        schedulers add their own exclusion (a Kubernetes CronJob with ``concurrencyPolicy: Forbid``,
        a deterministic Ray job submission id).
        """
        data = json.dumps(holder, sort_keys=True).encode()
        if self.is_local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return self.read_record(path) or {"unreadable": True}
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return None
        current = self.read_record(path)
        if current is not None:
            return current
        self.write_record(path, holder)
        back = self.read_record(path)
        return None if back == holder else back

    def break_lease(self, path: str) -> None:
        """Remove the lease at ``path`` (its holder is gone, or is this process releasing it)."""
        if self.fs.get_file_info(path).type == pafs.FileType.File:
            self.fs.delete_file(path)

    # --- reading ------------------------------------------------------------------------------
    def materialize(self, path: str) -> Path:
        """A local directory holding the complete checkpoint at ``path`` (downloaded if remote)."""
        if not self.is_complete(path):
            raise StoreError(
                f"{self.uri(path)}: no complete checkpoint there (no {COMPLETE_MARKER} marker). It was never "
                "written or its writer crashed; re-run the workflow to re-create it."
            )
        if self.is_local:
            self.verify(path)
            return Path(path)
        dest = self.cache_dir / "checkpoints" / hashlib.sha256(self.uri(path).encode()).hexdigest()[:16]
        if (dest / COMPLETE_MARKER).is_file():
            try:
                CheckpointStore(str(dest)).verify(str(dest))
                return dest
            except CorruptCheckpoint:  # the cached copy was damaged: download it again
                shutil.rmtree(dest, ignore_errors=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.cache_dir, prefix="download-"))
        try:
            pafs.copy_files(path, str(tmp), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
            try:  # hash the downloaded copy: one read of the bytes, and what the caller will use
                CheckpointStore(str(tmp)).verify(str(tmp))
            except CorruptCheckpoint as exc:
                raise CorruptCheckpoint(self.uri(path), exc.problems) from None
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                shutil.rmtree(dest)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest


def _read_manifest(marker: bytes, uri: str) -> dict[str, dict[str, Any]] | None:
    """The files a marker lists (None for an empty marker, from before manifests)."""
    if not marker.strip():
        return None
    try:
        files = json.loads(marker)["files"]
        return {str(k): {"size": int(v["size"]), "sha256": str(v["sha256"])} for k, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CorruptCheckpoint(uri, [f"its {COMPLETE_MARKER} marker is not a readable manifest"]) from None


def fetch_checkpoint(uri: str) -> Path:
    """A local directory holding the complete checkpoint at ``uri`` (``s3://bucket/…/merged/…``, a local
    path, …), downloaded (streamed, file by file) into the cache and checked against its manifest.

    Raises:
        StoreError: no complete checkpoint there (no marker: never written, or still being written).
        CorruptCheckpoint: its files differ from what was published.
    """
    if "://" not in uri or uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    store = CheckpointStore(uri)
    return store.materialize(store.path())
