"""Nothing outlives its driver: a watchdog that stops the local Ray cluster a driver started once the
driver is gone, however it went (SIGKILL, OOM killer, a closed terminal).

Ray's own processes do not all follow a dead driver: after ``kill -9`` of a driver that started a local
cluster, its ``ray::DashboardAgent`` and ``ray::RuntimeEnvAgent`` (children of the raylet) were still
alive 30 s later. :func:`watch` starts this module as a small process of its own session, holding the
read end of a pipe whose write end only the driver holds. Every second it notes the driver's
descendants that belong to that cluster (a process whose command line names the cluster's session
directory, or a descendant of one: the raylet's workers and agents); when the pipe reaches end of file
(the driver exited, or died), it gives them SIGTERM, then SIGKILL to any still alive 5 s later. Only
processes of that session are touched: a user's own subprocesses of a notebook driver are not. A driver
that shuts Ray down itself says ``q`` first, and the watchdog then only reaps what shutdown left.

    python -m pipeline.reaper DRIVER_PID SESSION_DIR     (started by :func:`watch`, not by hand)
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

POLL_S = 1.0
GRACE_S = 5.0


def watch(session_dir: str) -> subprocess.Popen:
    """Start the watchdog for this process's local cluster at ``session_dir``; :func:`release` it at shutdown."""
    return subprocess.Popen([sys.executable, "-m", "pipeline.reaper", str(os.getpid()), session_dir],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


def release(proc: subprocess.Popen) -> None:
    """The driver shut Ray down itself: the watchdog reaps any leftover and exits."""
    try:
        proc.stdin.write(b"q")
        proc.stdin.close()
    except OSError:
        pass


def _belongs(proc, session_dir: str, ray_pids: set[int]) -> bool:
    try:
        return proc.ppid() in ray_pids or any(session_dir in part for part in proc.cmdline())
    except Exception:  # gone, or not ours to read
        return False


def snapshot(driver_pid: int, session_dir: str, me: int) -> dict[int, float]:
    """The cluster's processes among the driver's descendants: pid -> start time (against pid reuse)."""
    import psutil

    try:
        children = psutil.Process(driver_pid).children(recursive=True)
    except psutil.Error:
        return {}
    found: dict[int, float] = {}
    # parents come before their children in psutil's walk; two passes catch any order
    for _ in range(2):
        for p in children:
            if p.pid != me and p.pid not in found and _belongs(p, session_dir, set(found)):
                try:
                    found[p.pid] = p.create_time()
                except psutil.Error:
                    pass
    return found


def reap(known: dict[int, float]) -> list[int]:
    """SIGTERM the still-running processes of ``known`` (and their children), SIGKILL what remains after
    the grace period; returns the pids signalled."""
    import psutil

    by_pid: dict[int, psutil.Process] = {}
    for pid, started in known.items():
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - started) < 1e-3:
                by_pid |= {c.pid: c for c in [p, *p.children(recursive=True)]}
        except psutil.Error:
            pass
    procs = list(by_pid.values())
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=GRACE_S)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    return [p.pid for p in procs]


def main(argv: list[str]) -> None:
    driver_pid, session_dir = int(argv[0]), argv[1]
    me, fd = os.getpid(), sys.stdin.fileno()
    known: dict[int, float] = {}
    while True:
        ready, _, _ = select.select([fd], [], [], POLL_S)
        if ready:
            os.read(fd, 1)  # b"q" (a clean shutdown) or b"" (the driver is gone): either way, reap
            break
        known.update(snapshot(driver_pid, session_dir, me))
    time.sleep(0.5 if known else 0)  # a clean shutdown's processes are on their way out
    reap(known)


if __name__ == "__main__":
    main(sys.argv[1:])
