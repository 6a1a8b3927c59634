"""Attempts of a workflow whose driver died: found and closed, so nothing stays RUNNING forever.

A driver records where it runs on its workflow run (host name, process id, the process's start
time). When a workflow starts, earlier runs of the same workflow (same experiment, same name) that
are still RUNNING are looked at:

- same host, and no process with that id and start time exists (or it is a zombie): the driver
  died (SIGKILL, OOM killer, a lost node that came back). Every run of that attempt that is still
  RUNNING (workflow, round, expert, baseline, merge, evaluation) is ended KILLED with the tag
  ``mergeflow.killed_reason`` saying why, and its LoggedModels still PENDING are marked FAILED.
  The start time tells a reused process id from the original driver.
- same host and the process is alive: a concurrent run of the same spec; left alone.
- another host, or a run without a driver record: liveness cannot be checked from here (a process
  id means nothing across hosts), so it is left alone and reported; end it by hand in the MLflow
  UI or with ``mlflow runs`` if you know its driver is gone.

Work is never lost either way: the store holds every complete step, and the new attempt resumes
from it.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

from pipeline.lineage import Lineage

TAG_DRIVER_HOST = "mergeflow.driver.host"
TAG_DRIVER_PID = "mergeflow.driver.pid"
TAG_DRIVER_STARTED = "mergeflow.driver.started"
TAG_JOB_ID = "mergeflow.job_id"  # the Ray job that ran this driver (set by `mergeflow submit`)
ENV_JOB_ID = "MERGEFLOW_JOB_ID"
TAG_KILLED_REASON = "mergeflow.killed_reason"


def _process_start_time(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), ``None`` if there is none (or a zombie)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def driver_tags() -> dict[str, str]:
    """The tags that identify this driver process (recorded on its workflow run)."""
    pid = os.getpid()
    tags = {TAG_DRIVER_HOST: socket.gethostname(), TAG_DRIVER_PID: str(pid),
            TAG_DRIVER_STARTED: f"{_process_start_time(pid) or time.time():.3f}"}
    if os.environ.get(ENV_JOB_ID):  # a submitted job: `mergeflow jobs` finds the run by it
        tags[TAG_JOB_ID] = os.environ[ENV_JOB_ID]
    return tags


def dead_because(tags: dict[str, str]) -> str | None:
    """Why the driver named in ``tags`` is known to be gone; ``None`` when it is alive or unknowable."""
    host, pid, started = tags.get(TAG_DRIVER_HOST), tags.get(TAG_DRIVER_PID), tags.get(TAG_DRIVER_STARTED)
    if not (host and pid and started) or host != socket.gethostname():
        return None
    now_started = _process_start_time(int(pid))
    if now_started is None:
        return f"its driver (pid {pid} on {host}) is gone"
    if abs(now_started - float(started)) > 1.0:
        return f"its driver (pid {pid} on {host}) is gone; that pid now belongs to another process"
    return None


def close_dead_attempts(lineage: Lineage, workflow: str, new_run_id: str | None = None,
                        report: Callable[[str], None] = print) -> list[str]:
    """End the RUNNING runs of earlier attempts of ``workflow`` whose driver is gone.

    Args:
        lineage: The workflow's experiment.
        workflow: The workflow's name.
        new_run_id: The attempt doing this (named in the tag; ``None`` before it exists).
        report: Where progress lines go.

    Returns:
        The workflow run ids of the attempts closed.
    """
    closed = []
    for run_id, tags in lineage.running_workflow_runs(workflow):
        if run_id == new_run_id:
            continue
        reason = dead_because(tags)
        where = f"pid {tags.get(TAG_DRIVER_PID, '?')} on {tags.get(TAG_DRIVER_HOST, 'an unknown host')}"
        if reason is None:
            if tags.get(TAG_DRIVER_HOST) == socket.gethostname():
                report(f"workflow {workflow!r}: attempt {run_id} is still running ({where}); left alone")
            else:
                report(f"workflow {workflow!r}: attempt {run_id} is RUNNING ({where}); its driver cannot be checked "
                       "from this host, left as is (end it in the MLflow UI if it is gone)")
            continue
        why = f"{reason}; closed by the next attempt" + (f" ({new_run_id})" if new_run_id else "")
        ended, models = lineage.end_attempt(run_id, "KILLED", {TAG_KILLED_REASON: why})
        report(f"workflow {workflow!r}: earlier attempt {run_id} died ({reason}): {ended} runs still RUNNING marked "
               f"KILLED, {models} unfinished models FAILED; resuming from the store")
        closed.append(run_id)
    return closed


class WorkflowBusy(RuntimeError):
    """Another live driver holds the lease this call needs (a second run of the same workflow at once)."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


def describe_holder(holder: dict) -> str:
    """``pid P on HOST since T (MLflow run R)``: who holds a lease, for messages."""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    run = f", MLflow run {holder['run_id']}" if holder.get("run_id") else ""
    return f"pid {holder.get(TAG_DRIVER_PID, '?')} on {holder.get(TAG_DRIVER_HOST, '?')} since {since}{run}"


class Lease:
    """An exclusive claim on a store path by one live driver (two drivers of one workflow never overlap).

    The record names the driver (host, pid, start time) and when the claim expires. Another driver
    may take it over only when the holder is known to be gone: a process that no longer exists on
    this host, or a claim past its expiry (a holder on another host, whose process cannot be checked
    from here). With ``heartbeat``, a daemon thread pushes the expiry forward while this process
    lives, so a long workflow keeps its claim and a dead one's lapses within ``ttl_s``.
    Creation is exclusive on a local store (``O_EXCL``); see ``CheckpointStore.try_lease`` for
    object stores.
    """

    def __init__(self, store, path: str, ttl_s: float, heartbeat: bool = False):
        self.store, self.path, self.ttl_s, self.heartbeat = store, path, float(ttl_s), heartbeat
        self._mine: dict | None = None
        self._stop = None
        self._lock = threading.Lock()  # the heartbeat and update() both rewrite the record

    def acquire(self, report: Callable[[str], None], what: str, **fields: str) -> dict | None:
        """Take the lease; ``None`` when taken, else the live holder's record. ``fields`` are added
        to the record (e.g. the MLflow run, once known)."""
        me = {**driver_tags(), **fields, "since": time.time(), "expires": time.time() + self.ttl_s}
        for _ in range(2):
            holder = self.store.try_lease(self.path, me)
            if holder is None:
                self._mine = me
                if self.heartbeat:
                    self._start_heartbeat()
                return None
            why = dead_because(holder)
            if why is None and holder.get("expires", 0) < time.time():
                why = f"its lease expired at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['expires']))}"
            if why is None:
                return holder
            report(f"{what}: the lease was held by a driver that is gone ({why}); taking over")
            self.store.break_lease(self.path)
        return self.store.read_record(self.path)

    def update(self, **fields: str) -> None:
        """Add fields to the record this process holds (e.g. its MLflow run id once it exists)."""
        with self._lock:
            if self._mine is not None and self.store.read_record(self.path) == self._mine:
                self._mine = {**self._mine, **fields}
                self.store.write_record(self.path, self._mine)

    def _start_heartbeat(self) -> None:
        stop = self._stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.ttl_s / 4):
                try:
                    with self._lock:
                        if self._mine is None or self.store.read_record(self.path) != self._mine:
                            return  # released, or taken over (presumed dead): never write over the new holder
                        self._mine = {**self._mine, "expires": time.time() + self.ttl_s}
                        self.store.write_record(self.path, self._mine)
                except Exception:  # a store hiccup: the next beat tries again, well before the expiry
                    continue

        threading.Thread(target=beat, name="mergeflow-lease-heartbeat", daemon=True).start()

    def release(self) -> None:
        """Give the lease up (only if this process still holds it)."""
        if self._stop is not None:
            self._stop.set()
        with self._lock:
            if self._mine is not None and self.store.read_record(self.path) == self._mine:
                self.store.break_lease(self.path)
            self._mine = None
