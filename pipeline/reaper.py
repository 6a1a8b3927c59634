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

Where the watchdog died with its driver (an OOM kill of both, a container's ``kill -9 -1``), the next
local cluster a driver starts first reaps what is left of dead ones (:func:`leftovers`): this user's
Ray processes of a session whose core (GCS server and raylet) is gone and whose parent is not of that
session. A session whose core still runs is never touched, whoever started it. Their session
directories stay: they hold the dead run's logs (``logs/``), Ray's own post-mortem.

    python -m pipeline.reaper DRIVER_PID SESSION_DIR     (started by :func:`watch`, not by hand)
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time

# a local cluster's session directory, as Ray's processes name it in their arguments and open log files
SESSION_RE = re.compile(r"(/[^\s=:]*/session_\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\d+_\d+)")
CORE = ("gcs_server", "raylet")  # while either runs, the session is alive
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


def _session_of(proc, cmdline: list[str]) -> str | None:
    """The session's name (``session_…``, unique per cluster): by name, not path, since a worker's open files
    give resolved paths (``/private/tmp/ray/…``) where the core's arguments give ``/tmp/ray/…``."""
    for part in cmdline:
        if m := SESSION_RE.search(part):
            return os.path.basename(m.group(1))
    if cmdline and cmdline[0].startswith("ray::"):  # an agent or worker renames itself: its log files say
        for f in proc.open_files():
            if m := SESSION_RE.search(f.path):
                return os.path.basename(m.group(1))
    return None


def _ray_dirs() -> tuple[str, ...]:
    """Where the installed Ray lives (its scripts and binaries), found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("ray")
    places = list(spec.submodule_search_locations or []) if spec is not None else []
    return tuple(os.path.realpath(p) + os.sep for p in places)


def _is_rays(cmdline: list[str], ray_dirs: tuple[str, ...]) -> bool:
    """A process Ray started: a worker or agent (``ray::…``), or a program or script of the Ray package
    (not, say, ``tail -f`` of a session's log)."""
    if not cmdline:
        return False
    if cmdline[0].startswith("ray::"):
        return True
    program = [cmdline[0], *(cmdline[1:3] if os.path.basename(cmdline[0]).startswith("python") else [])]
    return any(os.path.realpath(c).startswith(ray_dirs) for c in program if c.startswith(os.sep)) if ray_dirs else False


def leftovers() -> dict[int, float]:
    """This user's Ray processes left by dead local clusters (pid -> start time): a session none of whose
    core processes runs; of it, the processes whose parent is not of that session (its children follow
    in :func:`reap`). The watchdogs of this module are not counted: they reap on their own."""
    import psutil

    me = psutil.Process()
    user = me.username()
    by_session: dict[str, dict[int, psutil.Process]] = {}
    alive: set[str] = set()
    ray_dirs = _ray_dirs()
    for p in psutil.process_iter():
        try:
            if p.pid == me.pid or p.username() != user:
                continue
            cmdline = p.cmdline()
            if not _is_rays(cmdline, ray_dirs) or "pipeline.reaper" in cmdline:
                continue
            session = _session_of(p, cmdline)
            if session is None:
                continue
            if os.path.basename(cmdline[0]) in CORE:
                alive.add(session)
            by_session.setdefault(session, {})[p.pid] = p
        except psutil.Error:
            continue
    found: dict[int, float] = {}
    for session, procs in by_session.items():
        if session in alive:
            continue
        for p in procs.values():
            try:
                if p.ppid() not in procs:
                    found[p.pid] = p.create_time()
            except psutil.Error:
                pass
    return found


def reap_leftovers() -> list[int]:
    """Reap :func:`leftovers` (before a driver starts a local cluster); returns the pids signalled."""
    found = leftovers()
    return reap(found) if found else []


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
