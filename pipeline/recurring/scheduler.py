"""``mergeflow schedule``: the embedded scheduler (one machine), APScheduler 3 behind one function.

- The job lives in a SQLite job store (``--db``), so the schedule's next firing survives a restart:
  a restarted scheduler neither loses a firing (one missed while it was down runs once on start,
  if within ``schedule.misfire_grace``) nor doubles one (coalescing).
- ``max_instances=1`` and a one-thread executor: two rounds never overlap. A firing due while a
  round still runs is skipped (logged), not queued behind it.
- Each firing runs ``mergeflow round SPEC`` in a child process (its own session): a crash or an
  out-of-memory round ends that firing, not the scheduler, and Ctrl-C in the terminal reaches the
  scheduler only. The first Ctrl-C (or SIGTERM) lets the running round finish and then stops; a
  second stops the round too (its runs end KILLED, the next firing finishes it).
- Rounds themselves are idempotent (``pipeline.recurring.round``): the scheduler adds no state of
  its own that a round depends on.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.spec import Workflow

JOB_PREFIX = "mergeflow-round-"
_state: dict[str, object] = {"child": None, "firings": 0, "started": 0, "limit": None}
_lock = threading.Lock()


def fire(spec_path: str, extra_args: list[str]) -> int:
    """One firing: ``mergeflow round SPEC`` in a child process; returns its exit code.

    Module-level and argument-only, so APScheduler can keep a reference to it in its job store.
    """
    with _lock:  # --max-firings: a firing that comes due once the last allowed one has started does nothing
        limit = _state["limit"]
        if limit is not None and int(_state["started"]) >= int(limit):
            return 0
        _state["started"] = int(_state["started"]) + 1
    cmd = [sys.executable, "-m", "pipeline.cli", "round", spec_path, *extra_args,
           "--scheduled-for", time.strftime("%Y-%m-%dT%H:%M:%S%z")]
    started = time.perf_counter()
    print(f"[schedule] firing: {' '.join(cmd[2:4])} {spec_path}", flush=True)
    proc = subprocess.Popen(cmd, start_new_session=True)
    with _lock:
        _state["child"] = proc
    try:
        rc = proc.wait()
    finally:
        with _lock:
            _state["child"] = None
            _state["firings"] = int(_state["firings"]) + 1
    print(f"[schedule] round exited {rc} after {time.perf_counter() - started:.1f}s", flush=True)
    return rc


def trigger_for(wf: Workflow):
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    s = wf.recurring.schedule
    if s.cron is not None:
        return CronTrigger.from_crontab(s.cron, timezone=s.timezone)
    return IntervalTrigger(seconds=s.interval_seconds, timezone=s.timezone)


def _scheduler(wf: Workflow, db: str, report: Callable[[str], None]):
    """A paused-at-start APScheduler on the SQLite job store ``db``: one round at a time, missed firings
    coalesced, each firing skipped or missed said out loud."""
    from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    s = wf.recurring.schedule
    Path(db).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    scheduler = BackgroundScheduler(
        jobstores={"default": SQLAlchemyJobStore(url=f"sqlite:///{Path(db).expanduser().resolve()}")},
        executors={"default": ThreadPoolExecutor(1)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": s.misfire_grace_seconds},
        timezone=s.timezone)

    def on_event(event) -> None:
        if event.code == EVENT_JOB_MAX_INSTANCES:
            report("a firing came due while the last round still runs: skipped (rounds never overlap)")
        elif event.code == EVENT_JOB_MISSED:
            report(f"a firing due at {event.scheduled_run_time} was missed by more than the misfire grace: skipped")

    scheduler.add_listener(on_event, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)
    return scheduler


def _schedule_job(scheduler, job_id: str, wf: Workflow, spec_path: str, extra_args: list[str], db: str,
                  report: Callable[[str], None]) -> None:
    """The stored job, kept when its trigger and arguments are unchanged (its next firing survives restarts)."""
    trigger = trigger_for(wf)
    args = [str(Path(spec_path).resolve()), list(extra_args)]
    job = scheduler.get_job(job_id)
    existed = job is not None
    if job is not None and str(job.trigger) == str(trigger) and list(job.args) == args:
        report(f"schedule of {wf.name!r} resumed from {db}: {trigger}; next firing {job.next_run_time}")
    else:
        scheduler.add_job(fire, trigger, id=job_id, name=f"mergeflow round {wf.name}", args=args,
                          replace_existing=True)
        report(f"schedule of {wf.name!r} {'changed' if existed else 'created'} in {db}: {trigger}")


def serve(wf: Workflow, spec_path: str, *, db: str, extra_args: list[str], report: Callable[[str], None] = print,
          max_firings: int | None = None) -> int:
    """Run rounds on ``wf``'s schedule until Ctrl-C/SIGTERM (or ``max_firings``); returns the firings run."""
    if wf.recurring is None or wf.recurring.schedule is None:
        raise ValueError(f"{spec_path}: recurring.schedule is not set; add e.g. recurring: {{schedule: "
                         "{cron: '0 2 * * *', timezone: UTC}}")
    scheduler = _scheduler(wf, db, report)
    _state.update(firings=0, started=0, limit=max_firings)
    scheduler.start(paused=True)  # loads the stored job (and its next firing) before anything changes it
    job_id = JOB_PREFIX + wf.name
    _schedule_job(scheduler, job_id, wf, spec_path, extra_args, db, report)

    stopping = threading.Event()
    presses = {"n": 0}

    def on_signal(signum, _frame) -> None:
        presses["n"] += 1
        if presses["n"] == 1:
            report("stopping: no new firings; the running round (if any) finishes first (Ctrl-C again to stop it now)")
            stopping.set()
        else:
            with _lock:
                child = _state["child"]
            if child is not None:
                report("stopping the running round now: its runs end KILLED and the next firing finishes it")
                child.terminate()

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    scheduler.resume()
    report(f"next firing {scheduler.get_job(job_id).next_run_time}; Ctrl-C stops after the running round")
    try:
        while not stopping.is_set():
            if max_firings is not None and int(_state["firings"]) >= max_firings:
                report(f"{max_firings} firing(s) done (--max-firings); stopping")
                break
            stopping.wait(0.2)
        scheduler.pause()
        scheduler.shutdown(wait=True)  # waits for a running round to end
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return int(_state["firings"])
