"""The checkpoint store: where experts and merged models live, on any ``pyarrow.fs`` filesystem.

- A root is a local folder (default ``mergeflow-store``) or a URI (``s3://bucket/prefix``,
  ``gs://...``, ``hdfs://...``, ``file:///...``); the code path is the same ``pyarrow.fs`` API.
- A checkpoint becomes visible only when complete. Locally it is copied to a hidden partial
  directory and renamed into place (atomic). On object stores, where a directory rename is not
  atomic, a ``_COMPLETE`` marker is written last. Readers trust a checkpoint only if its marker is
  there, on every filesystem.
- Keys are content addresses: an expert's key hashes what determines its weights (start model,
  task, data and fine-tuning settings), so re-running a workflow, or trying another merge method on
  the same experts, reuses them instead of training again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

COMPLETE_MARKER = "_COMPLETE"


class StoreError(RuntimeError):
    """A store operation that failed, with the URI and what to do."""


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
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
            try:
                if move:
                    shutil.move(str(local_dir), partial)
                else:
                    shutil.copytree(local_dir, partial)
                (partial / COMPLETE_MARKER).write_text("")
                if target.exists():  # an incomplete leftover from a crashed run: replace it
                    shutil.rmtree(target)
                os.rename(partial, target)
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
            return path
        # object stores: copy every file, then the marker last
        if self.exists(path):
            self.fs.delete_dir(path)
        self.fs.create_dir(path, recursive=True)
        pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        with self.fs.open_output_stream(f"{path}/{COMPLETE_MARKER}") as f:
            f.write(b"")
        if move:
            shutil.rmtree(local_dir, ignore_errors=True)
        return path

    def staging_dir(self) -> Path:
        """A fresh local directory to write a checkpoint into before publishing it.

        For a local store it sits on the same filesystem as the root, so publishing is a rename.
        """
        if self.is_local:
            base = Path(self._root) / ".staging"
            base.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(dir=base))
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self.cache_dir, prefix="staging-"))

    # --- reading ------------------------------------------------------------------------------
    def materialize(self, path: str) -> Path:
        """A local directory holding the complete checkpoint at ``path`` (downloaded if remote)."""
        if not self.is_complete(path):
            raise StoreError(
                f"{self.uri(path)}: no complete checkpoint there (no {COMPLETE_MARKER} marker). It was never "
                "written or its writer crashed; re-run the workflow to re-create it."
            )
        if self.is_local:
            return Path(path)
        dest = self.cache_dir / "checkpoints" / hashlib.sha256(self.uri(path).encode()).hexdigest()[:16]
        if (dest / COMPLETE_MARKER).is_file():
            return dest
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.cache_dir, prefix="download-"))
        try:
            pafs.copy_files(path, str(tmp), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                shutil.rmtree(dest)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest
