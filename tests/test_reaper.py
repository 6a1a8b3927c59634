"""Nothing outlives its driver: a local Ray cluster goes with the driver that started it, SIGKILL included,
and only that cluster's processes are touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.helpers import tiny_workflow_dict


def test_the_watchdog_reaps_the_sessions_processes_and_their_children_only(tmp_path):
    from pipeline.reaper import reap, snapshot

    session = str(tmp_path / "session_2026_fake")
    # a process of the "cluster" (its command line names the session) with a child of its own, and a
    # subprocess of the driver that is not Ray's (a notebook user's): only the first two are Ray's
    ray_like = subprocess.Popen([sys.executable, "-c", "import subprocess,sys,time; subprocess.Popen([sys.executable,"
                                 "'-c','import time; time.sleep(60)']); time.sleep(60)", f"--session-dir={session}"])
    mine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.time() + 20
        while len(psutil.Process(ray_like.pid).children()) < 1:
            assert time.time() < deadline
            time.sleep(0.05)
        grandchild = psutil.Process(ray_like.pid).children()[0].pid
        found = snapshot(os.getpid(), session, me=-1)
        assert set(found) == {ray_like.pid, grandchild}
        assert sorted(reap(found)) == sorted([ray_like.pid, grandchild])
        ray_like.wait(timeout=10)
        assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
        assert mine.poll() is None, "a process that is not the cluster's is left alone"
    finally:
        for p in (ray_like, mine):
            p.kill()
            p.wait()


@pytest.mark.e2e
def test_a_local_cluster_goes_with_a_driver_killed_by_sigkill(tiny_base, tmp_path):
    """A real ``mergeflow run`` on its own local Ray, killed with SIGKILL once the cluster is up and an expert
    is training: 10 s later no process of that cluster is left (Ray's agents used to outlive it)."""
    spec = tiny_workflow_dict(tmp_path, tiny_base)
    spec["finetune"]["max_steps"] = 400  # long enough to be killed mid-expert
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(spec))
    log = (tmp_path / "driver.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mergeflow"), "run", str(tmp_path / "wf.yaml"),
                             "--num-cpus", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    cluster: dict[int, float] = {}
    try:
        deadline = time.time() + 240
        while not any("finetune" in " ".join(_cmd(p)) for p in _descendants(proc.pid)):
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.time() < deadline, "no expert started within 240 s"
            time.sleep(0.2)
        time.sleep(1.5)  # the watchdog's next look (every second) has seen every process
        cluster = {p.pid: p.create_time() for p in _descendants(proc.pid) if "reaper" not in " ".join(_cmd(p))}
        names = " ".join(" ".join(_cmd(psutil.Process(pid))) for pid in cluster)
        assert "raylet" in names and "gcs_server" in names and "ray::DashboardAgent" in names, names[:2000]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 10
    while (alive := _alive(cluster)) and time.time() < deadline:
        time.sleep(0.25)
    assert not alive, f"still alive 10 s after the driver's SIGKILL: {alive}"


@pytest.mark.e2e
def test_a_driver_that_starts_a_local_cluster_first_reaps_what_a_dead_one_left():
    """The watchdog died with its driver (both SIGKILLed, as an OOM kill of the two would): Ray's agents of
    that cluster outlive them. The next driver to start a local cluster stops exactly those first."""
    from pipeline.reaper import leftovers

    up = "from pipeline.runtime import RayRuntime\nimport time\nwith RayRuntime(num_cpus=1):\n    {}"
    driver = subprocess.Popen([sys.executable, "-c", up.format("print('up', flush=True); time.sleep(600)")],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert driver.stdout.readline().strip() == "up"
        deadline = time.time() + 60
        while not {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= {_cmd(p)[0] for p in _descendants(driver.pid)
                                                                     if _cmd(p)}:
            assert time.time() < deadline, "the cluster's agents did not start within 60 s"
            time.sleep(0.2)
        watchdog = [p for p in _descendants(driver.pid) if "pipeline.reaper" in _cmd(p)]
        assert len(watchdog) == 1
        for p in [*watchdog, psutil.Process(driver.pid)]:
            p.kill()
    finally:
        driver.kill()
        driver.wait()
    deadline = time.time() + 20
    while not (left := leftovers()) and time.time() < deadline:  # the core goes with its driver; agents stay
        time.sleep(0.5)
    names = [" ".join(_cmd(psutil.Process(pid)))[:60] for pid in left if psutil.pid_exists(pid)]
    assert any(n.startswith("ray::DashboardAgent") or n.startswith("ray::RuntimeEnvAgent") for n in names), names

    second = subprocess.run([sys.executable, "-c", up.format("pass")], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "left by a dead local Ray cluster" in second.stderr, second.stderr[-3000:]
    assert not _alive(left), "the dead cluster's processes are still alive after the next driver started"


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _cmd(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _alive(known: dict[int, float]) -> list[str]:
    out = []
    for pid, started in known.items():
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - started) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{pid} {' '.join(p.cmdline())[:80]}")
        except psutil.Error:
            pass
    return out
