"""The store lease that keeps two drivers of one workflow apart (``pipeline.attempts.Lease``), on a real
local store: exclusive, released only by its holder, taken over only from a driver known to be gone,
and kept alive by its heartbeat."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from pipeline.attempts import (
    TAG_DRIVER_HOST,
    TAG_DRIVER_PID,
    TAG_DRIVER_STARTED,
    Lease,
    describe_holder,
    driver_tags,
)
from pipeline.store import CheckpointStore


def _lease(tmp_path, ttl_s: float = 60.0, heartbeat: bool = False) -> Lease:
    store = CheckpointStore(str(tmp_path / "store"))
    return Lease(store, store.path("wf", "run-lease.json"), ttl_s, heartbeat=heartbeat)


def _write_holder(lease: Lease, **record) -> None:
    lease.store.write_record(lease.path, record)


def test_one_holder_at_a_time_and_only_the_holder_releases(tmp_path):
    first, second = _lease(tmp_path), _lease(tmp_path)
    lines: list[str] = []
    assert first.acquire(lines.append, "wf", run_id="r1") is None
    holder = second.acquire(lines.append, "wf")
    assert holder is not None and holder["run_id"] == "r1" and holder[TAG_DRIVER_PID] == str(os.getpid())
    assert f"pid {holder[TAG_DRIVER_PID]} on {socket.gethostname()}" in describe_holder(holder)
    assert "MLflow run r1" in describe_holder(holder)
    second.release()  # not its lease: nothing happens
    assert first.store.read_record(first.path)["run_id"] == "r1"
    first.update(run_id="r2")  # the holder adds what it learns later (its MLflow run)
    assert first.store.read_record(first.path)["run_id"] == "r2"
    first.release()
    assert first.store.read_record(first.path) is None
    assert second.acquire(lines.append, "wf") is None
    assert lines == []  # nobody was presumed dead


def test_a_dead_driver_on_this_host_is_taken_over(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that existed and is gone
    lease = _lease(tmp_path)
    _write_holder(lease, **{TAG_DRIVER_HOST: socket.gethostname(), TAG_DRIVER_PID: str(proc.pid),
                            TAG_DRIVER_STARTED: f"{time.time() - 5:.3f}"}, since=time.time() - 5,
                  expires=time.time() + 3600)
    lines: list[str] = []
    assert lease.acquire(lines.append, "workflow 'wf'") is None
    assert len(lines) == 1 and f"pid {proc.pid}" in lines[0] and "is gone" in lines[0] and "taking over" in lines[0]
    assert lease.store.read_record(lease.path)[TAG_DRIVER_PID] == driver_tags()[TAG_DRIVER_PID]


def test_another_hosts_driver_is_waited_for_until_its_lease_expires(tmp_path):
    lease = _lease(tmp_path)
    other = {TAG_DRIVER_HOST: "other-host", TAG_DRIVER_PID: "4242", TAG_DRIVER_STARTED: "1.000", "since": time.time()}
    _write_holder(lease, **other, expires=time.time() + 3600)
    lines: list[str] = []
    holder = lease.acquire(lines.append, "wf")
    assert holder is not None and holder[TAG_DRIVER_HOST] == "other-host" and lines == []
    _write_holder(lease, **other, expires=time.time() - 1)  # it stopped renewing: presumed dead
    assert lease.acquire(lines.append, "wf") is None
    assert "its lease expired at" in lines[0]


def test_the_heartbeat_keeps_a_live_holders_lease_and_stops_once_released(tmp_path):
    lease = _lease(tmp_path, ttl_s=0.4, heartbeat=True)
    assert lease.acquire(print, "wf") is None
    first = lease.store.read_record(lease.path)["expires"]
    time.sleep(1.0)  # several beats (every ttl/4)
    renewed = lease.store.read_record(lease.path)["expires"]
    assert renewed > first + 0.4
    assert _lease(tmp_path, ttl_s=0.4).acquire(print, "wf") is not None  # never expired meanwhile
    lease.release()
    assert lease.store.read_record(lease.path) is None
    time.sleep(0.3)
    assert lease.store.read_record(lease.path) is None  # no beat after the release writes it back


def test_the_heartbeat_never_writes_over_a_driver_that_took_over(tmp_path):
    lease = _lease(tmp_path, ttl_s=0.4, heartbeat=True)
    assert lease.acquire(print, "wf") is None
    newcomer = {TAG_DRIVER_HOST: "other-host", TAG_DRIVER_PID: "7", "since": time.time(), "expires": time.time() + 60}
    _write_holder(lease, **newcomer)  # as if this process had been presumed dead and its lease taken
    time.sleep(0.5)
    assert json.loads((tmp_path / "store" / "wf" / "run-lease.json").read_text()) == newcomer
    lease.release()  # not its lease any more: left alone
    assert lease.store.read_record(lease.path) == newcomer
