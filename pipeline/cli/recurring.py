"""Recurring rounds: ``mergeflow contribute``, ``round``, ``schedule`` and ``history`` (the work is in
``pipeline.recurring``).

    mergeflow contribute SPEC SOURCE --task T    add a contribution (data table or expert), checked first
    mergeflow round SPEC                         run the next round now (idempotent)
    mergeflow schedule SPEC                      run rounds on the spec's schedule (embedded scheduler)
    mergeflow schedule SPEC --emit kubernetes    write manifests for a cluster scheduler instead
    mergeflow history SPEC                       every round: contributions, gate verdict, champion
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from pipeline.cli.common import EXIT_BAD_INPUT, EXIT_FAILED, fail, load_spec, new_console, timed_reporter
from pipeline.cli.group import main
from pipeline.redact import redact_uri


def _recurring_spec(spec: str, tracking_uri: str | None, store: str | None):
    """The workflow in ``spec``; one without a ``recurring:`` section exits 2."""
    wf = load_spec(spec, tracking_uri, store)
    if wf.recurring is None:
        fail(f"{spec}: has no recurring: section (contributions, gate, schedule); see "
             "workflows/recurring-quickstart.yaml", EXIT_BAD_INPUT)
    return wf


@main.command()
@click.argument("spec", type=click.Path())
@click.argument("source")
@click.option("--task", required=True, help="The task the contribution is for (a task of SPEC).")
@click.option("--id", "cid", default=None, help="The contribution's id (default: UTC time stamp and task).")
@click.option("--contributor", default="", help="Who contributed it (recorded).")
def contribute(spec: str, source: str, task: str, cid: str | None, contributor: str) -> None:
    """Add SOURCE (a data table, packaged:NAME, or an expert's checkpoint folder) to SPEC's contributions.

    Checked as a round will check it (task, columns, labels, checkpoint) before anything is written;
    the manifest is written last, so a round never sees half a contribution.
    """
    from pipeline.recurring.contributions import ContributionError
    from pipeline.recurring.contributions import contribute as add

    wf = _recurring_spec(spec, None, None)
    try:
        c = add(wf, source, task, cid, contributor)
    except ContributionError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    what = f"{c.rows} training rows" + (f" ({c.dropped_eval_rows} in the gate's eval split dropped)"
                                         if c.dropped_eval_rows else "") if c.kind == "data" else "an expert"
    click.echo(f"contributed {c.id!r} for task {c.task!r}: {what}, at {c.uri}")


@main.command("round")
@click.argument("spec", type=click.Path())
@click.option("--address", default=None, help="Ray cluster (as for run); omit for a private local cluster.")
@click.option("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all).")
@click.option("--tracking-uri", default=None, help="Override tracking.uri.")
@click.option("--store", default=None, help="Override store.root.")
@click.option("--scheduled-for", default=None, hidden=True)
def round_(spec: str, address: str | None, num_cpus: int | None, tracking_uri: str | None, store: str | None,
           scheduled_for: str | None) -> None:
    """Run the next recurring round of SPEC now: fine-tune new contributions from the champion, fuse,
    gate, promote or reject. Nothing new: records "nothing to do" and exits 0. Safe to run twice."""
    from operators.data import DataError
    from operators.tensor_io import CheckpointError
    from pipeline.driver import PreflightError
    from pipeline.recurring.contributions import ContributionError
    from pipeline.recurring.round import run_round

    wf = _recurring_spec(spec, tracking_uri, store)
    out = new_console()
    report = timed_reporter(out)
    try:
        outcome = run_round(wf, address=address, num_cpus=num_cpus, report=report, scheduled_for=scheduled_for)
    except (PreflightError, DataError, CheckpointError, ContributionError) as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        fail("interrupted; the next `mergeflow round` finishes this round from the store", EXIT_FAILED)
    except Exception as exc:
        fail(f"round failed: {type(exc).__name__}: {exc}", EXIT_FAILED)
    if outcome.status == "failed":
        fail(f"round {outcome.round}: {outcome.reason}", EXIT_FAILED)
    if outcome.verdict is not None:
        v = outcome.verdict
        out.print(f"\nround {outcome.round}: {outcome.status.upper()}  ({v.reason})")
        out.print("| task | champion | challenger | change |\n|---|---|---|---|")
        for t in v.champion:
            out.print(f"| {t} | {v.champion[t]:.3f} | {v.challenger[t]:.3f} | {v.deltas[t]:+.3f} |")
        out.print(f"| mean | {v.champion_mean:.3f} | {v.challenger_mean:.3f} | {v.mean_gain:+.3f} |")
        out.print(f"registry: {wf.registered_model_name} v{outcome.version}; champion "
                  f"{'v' + outcome.champion_after if outcome.champion_after else 'none (the base model)'}")


def _emit_kubernetes(wf, spec: str, out_dir: str | None, image: str, address: str | None,
                     namespace: str | None) -> None:
    """``schedule --emit kubernetes``: write (or print) the manifests that run SPEC's rounds on a cluster."""
    from pipeline.recurring.emit import interval_to_cron, render_kubernetes

    s = wf.recurring.schedule
    try:
        cron = s.cron or interval_to_cron(s.interval_seconds)
    except ValueError as exc:
        fail(f"recurring.schedule.interval: {exc}", EXIT_BAD_INPUT)
    try:
        files = render_kubernetes(name=wf.name, spec_path=spec, cron=cron, timezone=s.timezone, image=image,
                                  namespace=namespace, **({"ray_address": address} if address else {}))
    except ValueError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    for fname, text in files.items():
        if out_dir:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / fname).write_text(text)
            click.echo(f"wrote {Path(out_dir) / fname}")
        else:
            click.echo(f"# --- {fname}\n{text}")


@main.command()
@click.argument("spec", type=click.Path())
@click.option("--emit", type=click.Choice(["kubernetes"]), default=None,
              help="Write manifests for a cluster scheduler instead of running one here.")
@click.option("--out", "out_dir", default=None, type=click.Path(),
              help="--emit: folder for the manifests (default: print them).")
@click.option("--image", default="mergeflow:latest", show_default=True, help="--emit: the container image.")
@click.option("--address", default=None,
              help="Ray cluster for every round (here: as for run; --emit: the job server, "
                   "http://HEAD:8265).")
@click.option("--namespace", default=None, help="--emit: Kubernetes namespace.")
@click.option("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster of every round.")
@click.option("--db", default="mergeflow-schedule.db", show_default=True,
              help="SQLite file holding the schedule (its next firing survives restarts).")
@click.option("--max-firings", type=int, default=None, help="Stop after this many firings (smoke tests).")
def schedule(spec: str, emit: str | None, out_dir: str | None, image: str, address: str | None,
             namespace: str | None, num_cpus: int | None, db: str, max_firings: int | None) -> None:
    """Run SPEC's rounds on its recurring.schedule, in the foreground (Ctrl-C stops between rounds);
    or, with --emit kubernetes, write a CronJob (and a KubeRay RayCronJob) that does it on a cluster."""
    wf = _recurring_spec(spec, None, None)
    if wf.recurring.schedule is None:
        fail(f"{spec}: recurring.schedule is not set; add e.g. schedule: {{cron: '0 2 * * *', timezone: UTC}} "
             "or {interval: 6h}", EXIT_BAD_INPUT)
    if emit:
        _emit_kubernetes(wf, spec, out_dir, image, address, namespace)
        return
    from pipeline.recurring.scheduler import serve

    extra = [*(["--address", address] if address else []), *(["--num-cpus", str(num_cpus)] if num_cpus else [])]
    started = time.perf_counter()

    def report(msg: str) -> None:
        click.echo(f"[schedule {time.strftime('%H:%M:%S')}] {msg}")

    n = serve(wf, spec, db=db, extra_args=extra, report=report, max_firings=max_firings)
    report(f"stopped after {n} firing(s) in {time.perf_counter() - started:.0f}s")


@main.command()
@click.argument("spec", type=click.Path())
@click.option("--tracking-uri", default=None, help="Override tracking.uri.")
@click.option("--plot", "plot_path", default=None, type=click.Path(),
              help="Also write the champion's gate score over rounds to this PNG.")
def history(spec: str, tracking_uri: str | None, plot_path: str | None) -> None:
    """Every firing of SPEC's recurring rounds: what came in, the gate's verdict and why, the champion."""
    from pipeline.recurring.history import history as rows_of
    from pipeline.recurring.history import plot, table

    wf = _recurring_spec(spec, tracking_uri, None)
    rows = rows_of(wf)
    if not rows:
        click.echo(f"no rounds of {wf.name!r} yet in {redact_uri(wf.tracking.uri)}; run: mergeflow round {spec}")
        return
    click.echo(table(rows), nl=False)
    if plot_path:
        click.echo(f"wrote {plot(rows, plot_path, title=f'{wf.name}: champion gate score')}")
