"""Inspecting what workflows made: ``mergeflow status``, ``ui`` and ``export`` (MLflow is read through
``pipeline.lineage``; checkpoints through ``operators.checkpoint``)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from pipeline.cli.common import EXIT_BAD_INPUT, EXIT_FAILED, fail, load_spec, new_console, print_links
from pipeline.cli.group import main
from pipeline.lineage import ui_links  # stdlib only at import time: MLflow loads lazily
from pipeline.redact import redact_uri


@main.command()
@click.argument("run_id", required=False)
@click.option("--tracking-uri", default="sqlite:///mlflow.db", show_default=True)
@click.option("--experiment", default=None, help="Only this experiment.")
@click.option("--limit", default=10, show_default=True)
def status(run_id: str | None, tracking_uri: str, experiment: str | None, limit: int) -> None:
    """Without RUN_ID: recent workflow runs. With RUN_ID: its rounds, experts, merges and artifacts."""
    from rich.table import Table

    from pipeline.lineage import TAG_KIND, TrackingStoreError, runs_under, workflow_runs

    console = new_console()
    if not run_id:
        try:
            runs = workflow_runs(tracking_uri, experiment, limit)
        except TrackingStoreError as exc:
            fail(str(exc), EXIT_BAD_INPUT)
        table = Table(title=f"workflow runs ({redact_uri(tracking_uri)})")
        for c in ("run id", "workflow", "status", "started", "mean merged acc", "mean normalized"):
            table.add_column(c)
        for r in runs:
            m = r.metrics
            table.add_row(r.run_id, r.run_name, r.status,
                          time.strftime("%Y-%m-%d %H:%M", time.localtime(r.start_time / 1000)),
                          f"{m['mean/merged_accuracy']:.3f}" if "mean/merged_accuracy" in m else "-",
                          f"{m['mean/normalized_accuracy']:.3f}" if "mean/normalized_accuracy" in m else "-")
        console.print(table)
        return
    try:
        tree = runs_under(tracking_uri, run_id)
    except TrackingStoreError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    console.print(f"[bold]{tree.name}[/bold] run {tree.root_id}: {tree.root_status}")
    table = Table()
    for c in ("kind", "name", "round", "status", "key metrics", "checkpoint"):
        table.add_column(c)
    for r in tree.runs:
        tags, m = r.tags, r.metrics
        key = {k: v for k, v in m.items() if k.endswith("accuracy") and "/" in k and not k.startswith("probe")}
        shown = ", ".join(f"{k}={v:.3f}" for k, v in sorted(key.items())[:3])
        table.add_row(tags.get(TAG_KIND, "?"), r.run_name, tags.get("mergeflow.round", ""), r.status,
                      shown, tags.get("mergeflow.store_uri", ""))
    console.print(table)


def _check_ui_target(spec: str, uri: str, host: str, port: int) -> None:
    """Refuse (exit 2) a tracking store ``mergeflow ui`` cannot serve, or a host and port it cannot listen on."""
    import socket

    if uri.lower().startswith(("http://", "https://")):
        fail(f"tracking.uri {uri} is an MLflow server already; open it in a browser (mergeflow ui serves a local "
             "store such as sqlite:///mlflow.db)", EXIT_BAD_INPUT)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        fail(f"no tracking database at {uri[len('sqlite:///'):]} (tracking.uri {uri}); run the workflow first: "
             f"mergeflow run {spec}", EXIT_BAD_INPUT)
    if not 0 < port < 65536:
        fail(f"--port {port} is not a TCP port; use 1-65535, e.g. 5000", EXIT_BAD_INPUT)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            fail(f"cannot listen on {host}:{port} ({exc.strerror}); pick another with --port or --host", EXIT_BAD_INPUT)


def _announce_ui(proc, ui_url: str, wf) -> None:
    """Wait (up to 3 minutes) for the UI to answer, then print links to the workflow's latest run."""
    import urllib.request

    from pipeline.lineage import latest_workflow

    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{ui_url}/health", timeout=2):
                break
        except OSError:
            time.sleep(0.5)
    if proc.poll() is not None:
        fail(f"the MLflow UI exited with code {proc.returncode} before serving (its output is above)", EXIT_FAILED)
    latest = latest_workflow(wf.tracking.uri, wf.experiment_name, wf.name, wf.registered_model_name,
                             wf.tracking.alias)
    if latest is None:
        click.echo(f"no finished run of workflow {wf.name!r} in experiment {wf.experiment_name!r} yet")
    else:
        print_links(ui_links(ui_url, latest["experiment_id"], run_id=latest["run_id"], model_id=latest["model_id"],
                             registered_model=wf.registered_model_name, version=latest["version"]),
                    f"MLflow UI ready at {ui_url}:")


@main.command()
@click.argument("spec", type=click.Path())
@click.option("--port", type=int, default=5000, show_default=True, help="Port of the UI.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on: loopback by default (this machine only); 0.0.0.0 exposes it.")
@click.option("--tracking-uri", default=None, help="Override tracking.uri.")
def ui(spec: str, port: int, host: str, tracking_uri: str | None) -> None:
    """Start the MLflow UI on SPEC's tracking store; print links to its latest run, model and version."""
    import signal
    import subprocess

    wf = load_spec(spec, tracking_uri, None)
    uri = wf.tracking.uri
    _check_ui_target(spec, uri, host, port)
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else (f"[{host}]" if ":" in host else host)
    ui_url = f"http://{shown_host}:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port),
           "--workers", "1"]
    click.echo(f"starting the MLflow UI on {ui_url} for {uri} (Ctrl-C stops it)")
    # its own process group: stopping mergeflow ui stops the server and its uvicorn workers with it
    # MLflow 3's server also starts a pool of job-runner processes (GenAI jobs), each loading mlflow: the
    # runs-and-models UI needs none of them (set MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true to keep them)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
                                                                              "false")}
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)
    # SIGTERM also goes through the finally below (the caller's handler is put back there)
    previous_sigterm = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        _announce_ui(proc, ui_url, wf)
        sys.stdout.flush()
        proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@main.command()
@click.argument("checkpoint", type=click.Path())
@click.argument("task")
@click.argument("out", type=click.Path())
def export(checkpoint: str, task: str, out: str) -> None:
    """Write CHECKPOINT's body with TASK's head (a causal LM: the model; TASK is then not used) as a plain
    Hugging Face checkpoint in OUT; a LoRA adapter is folded into the base its provenance names.
    CHECKPOINT may be a store URI (s3://bucket/…): it is downloaded and checked first."""
    import shutil

    from safetensors import SafetensorError

    from operators.checkpoint import adapter_base_of, export_task_model, validate_base_checkpoint
    from operators.checkpoint_files import (
        head_names,
        is_adapter_checkpoint,
        is_causal_lm_adapter,
        is_causal_lm_checkpoint,
    )
    from operators.tensor_io import CheckpointError, TensorReader

    if "://" in checkpoint:  # a checkpoint in an object store: download it (checked against its manifest)
        from pipeline.store import StoreError, fetch_checkpoint

        try:
            checkpoint = str(fetch_checkpoint(checkpoint))
        except (StoreError, OSError) as exc:
            fail(f"CHECKPOINT {checkpoint}: {exc}", EXIT_BAD_INPUT)
    src, dst = Path(checkpoint), Path(out)
    if not src.is_dir():
        fail(f"CHECKPOINT {checkpoint}: {'is a file' if src.exists() else 'no such directory'}; give a merged or "
             "expert checkpoint directory (mergeflow status RUN_ID lists them)", EXIT_BAD_INPUT)
    adapter = is_adapter_checkpoint(src)
    causal = is_causal_lm_adapter(src) if adapter else is_causal_lm_checkpoint(src)
    if not causal and task not in head_names(checkpoint):
        fail(f"{checkpoint} has no head for task {task!r}; heads: {', '.join(head_names(checkpoint)) or 'none'}",
             EXIT_BAD_INPUT)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        fail(f"{out} exists and is not an empty folder; choose a new directory", EXIT_BAD_INPUT)
    # written next to OUT and renamed into place: a failure leaves no half-written OUT
    staging = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    try:
        base = adapter_base_of(src) if adapter else None  # a LoRA adapter is folded into its base
        validate_base_checkpoint(base or src)
        with TensorReader(base or src):  # every shard's header against its size
            pass
        export_task_model(checkpoint, task, staging, adapter_base=base)
        if dst.exists():
            dst.rmdir()
        staging.rename(dst)
    except (CheckpointError, OSError, ValueError, SafetensorError) as exc:
        why = f"{exc} (heads/{task}/ or the body is corrupt or truncated)" if isinstance(exc, SafetensorError) else exc
        fail(f"{checkpoint}: {why}" if checkpoint not in str(exc) else str(exc), EXIT_BAD_INPUT)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    click.echo(f"wrote {dst}: load with AutoModelForSequenceClassification.from_pretrained({str(dst)!r})")
