"""Workflows as Ray jobs on a cluster: ``mergeflow submit``, ``jobs``, ``logs`` and ``stop`` (the work is
in ``pipeline.jobs``; the job's own entry point is ``pipeline.cli.job_entry``)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from pipeline.cli.common import EXIT_BAD_INPUT, EXIT_FAILED, fail, load_spec, one_line
from pipeline.cli.group import main
from pipeline.lineage import DEFAULT_UI_URL, ui_links  # stdlib only at import time: MLflow loads lazily
from pipeline.redact import redact_uri

_ADDRESS = click.option("--address", envvar="RAY_API_SERVER_ADDRESS", default="http://127.0.0.1:8265", show_default=True,
                        help="The cluster's job server (Ray dashboard), http://HEAD:8265; or $RAY_API_SERVER_ADDRESS.")


_JOBS_TRACKING = click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
                              help="The MLflow tracking server the jobs log to (default $MLFLOW_TRACKING_URI): "
                                   "links each job to its MLflow run.")
_JOBS_UI = click.option("--ui-url", default=None, help="Where the MLflow UI is served (default: the tracking "
                                                      "server when it is http(s), else " + DEFAULT_UI_URL + ").")


def _job_links(tracking_uri: str | None, ui_url: str | None, job_ids: list[str]) -> dict[str, str]:
    """Job id → the MLflow UI link of the run its driver started (none where unknown or unreachable)."""
    from pipeline.lineage import runs_of_jobs

    if not tracking_uri or not job_ids:
        return {}
    ui = ui_url or (tracking_uri if tracking_uri.startswith(("http://", "https://")) else DEFAULT_UI_URL)
    try:
        found = runs_of_jobs(tracking_uri, job_ids)
    except Exception as exc:  # the jobs still list: say why the links are missing
        click.echo(redact_uri(f"(no MLflow links: {tracking_uri} did not answer: {str(exc).splitlines()[0][:200]})"),
                   err=True)
        return {}
    return {job: ui_links(ui, exp, run_id=run)["workflow run"] for job, (exp, run) in found.items()}


def _jobs_call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; a :class:`pipeline.jobs.JobError` exits 2 with its message."""
    from pipeline.jobs import JobError

    try:
        return fn(*args, **kwargs)
    except JobError as exc:
        fail(str(exc), EXIT_BAD_INPUT)


def _log_chunks(jobs, address: str, job: str, follow: bool):
    """A job's output in chunks (``jobs``: the :mod:`pipeline.jobs` module); a JobError exits 2."""
    from pipeline.jobs import JobError

    try:
        yield from jobs.logs(address, job, follow=follow)
    except JobError as exc:
        fail(str(exc), EXIT_BAD_INPUT)


@main.command()
@click.argument("spec", type=click.Path())
@_ADDRESS
@click.option("--exclude", "excludes", multiple=True, help="Another pattern to leave out of the upload (repeatable).")
@click.option("--entrypoint-num-cpus", type=float, default=0.0, show_default=True,
              help="CPUs reserved for the job's driver (it only schedules steps).")
@click.option("--verb", type=click.Choice(["run", "round"]), default="run", show_default=True,
              help="What the job runs: the workflow, or its next recurring round (mergeflow round).")
@click.option("--wait", is_flag=True, help="Follow the job's output until it ends; exit 1 unless it SUCCEEDED "
                                           "(what a Kubernetes CronJob needs for concurrencyPolicy: Forbid).")
@_JOBS_UI
def submit(spec: str, address: str, excludes: tuple[str, ...], entrypoint_num_cpus: float, verb: str,
           wait: bool, ui_url: str | None) -> None:
    """Run SPEC as a Ray job on a cluster; prints the job id and returns (or, with --wait, follows it).

    The project and the spec are uploaded (without stores, environments, .git, MLflow files and
    data); MLFLOW_TRACKING_URI and MLflow/AWS credentials set here are passed as job environment
    variables, never recorded.
    """
    from pipeline import jobs

    wf = load_spec(spec, None, None)
    job_id = _jobs_call(jobs.submit, wf, Path(spec).read_text(), address, excludes=list(excludes),
                        entrypoint_num_cpus=entrypoint_num_cpus, verb=verb)
    click.echo(f"submitted {wf.name!r} ({verb}) as job {job_id} to {address}")
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or wf.tracking.uri  # what the job's driver logs to
    if wait:
        for chunk in _log_chunks(jobs, address, job_id, True):
            click.echo(chunk, nl=False)
        state = _jobs_call(jobs.status, address, job_id)
        click.echo(f"job {job_id} ended: {state}")
        link = _job_links(tracking, ui_url, [job_id]).get(job_id)
        if link:
            click.echo(f"MLflow run: {link}")
        if state != "SUCCEEDED":
            sys.exit(EXIT_FAILED)
        return
    click.echo(f"follow: mergeflow logs {job_id} --follow --address {address}")
    click.echo(f"stop:   mergeflow stop {job_id} --address {address}")
    click.echo(f"MLflow: its run is tagged mergeflow.job_id={job_id} in experiment {wf.experiment_name!r} at "
               f"{redact_uri(tracking)}; `mergeflow jobs --tracking-uri {redact_uri(tracking)}` links it once the "
               "driver starts")


@main.command("jobs")
@_ADDRESS
@_JOBS_TRACKING
@_JOBS_UI
def jobs_(address: str, tracking_uri: str | None, ui_url: str | None) -> None:
    """The cluster's mergeflow jobs, newest first: id, status, workflow, start time, Ray's message, and
    the MLflow run's link (with --tracking-uri or $MLFLOW_TRACKING_URI)."""
    from pipeline import jobs

    records = _jobs_call(jobs.list_jobs, address)
    if not records:
        click.echo(f"no mergeflow jobs on {address}")
    links = _job_links(tracking_uri, ui_url, [r.job_id for r in records])
    for r in records:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.start_time)) if r.start_time else "-"
        link = f"  {links[r.job_id]}" if r.job_id in links else ""
        click.echo(f"{r.job_id}  {r.status:<9}  {r.workflow}  started {started}  {one_line(r.message)}{link}")


@main.command()
@click.argument("job")
@_ADDRESS
@click.option("--follow", "-f", is_flag=True, help="Keep printing as the job writes, until it ends.")
def logs(job: str, address: str, follow: bool) -> None:
    """Print JOB's driver output (its progress lines)."""
    from pipeline import jobs

    for chunk in _log_chunks(jobs, address, job, follow):
        click.echo(chunk, nl=False)
    if follow:
        click.echo(f"job {job} ended: {_jobs_call(jobs.status, address, job)}")


@main.command()
@click.argument("job")
@_ADDRESS
@click.option("--wait", "wait_s", type=float, default=60.0, show_default=True, help="Seconds to wait for it to end.")
def stop(job: str, address: str, wait_s: float) -> None:
    """Stop JOB (its MLflow runs end KILLED; finished steps stay in the store for the next run)."""
    from pipeline import jobs

    state = _jobs_call(jobs.stop, address, job, wait_s)
    click.echo(f"job {job}: {state}")
