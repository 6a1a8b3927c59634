"""The ``mergeflow`` command line.

    mergeflow validate SPEC                  check a spec (and its data and base model) without running
    mergeflow run SPEC [--address ADDR]      run a workflow; prints progress and an accuracy table
    mergeflow status [RUN_ID]                recent workflow runs, or one run's tree and artifacts
    mergeflow resume RUN_ID                  finish a stopped or killed workflow from its run (spec from MLflow)
    mergeflow export CKPT TASK OUT           write a stand-alone HF checkpoint for one task
    mergeflow merge CONFIG OUT               merge checkpoints (mergeflow or mergekit YAML config)
    mergeflow compare SPEC [--seeds 0,1,2]   strategies × merges at the same budget: table and plot
    mergeflow ui SPEC [--port 5000]          the MLflow UI on SPEC's tracking store, with links to the last run
    mergeflow submit SPEC --address URL      run SPEC as a Ray job on a cluster; prints the job id
    mergeflow jobs --address URL             the cluster's mergeflow jobs: status, workflow
    mergeflow logs JOB [--follow]            a job's driver output (as it comes, with --follow)
    mergeflow stop JOB                       stop a job; its runs end KILLED
    mergeflow contribute SPEC SOURCE --task T  add a contribution for the next recurring round
    mergeflow round SPEC                     run the next recurring round now (idempotent)
    mergeflow schedule SPEC [--emit kubernetes]  rounds on the spec's schedule, or cluster manifests
    mergeflow history SPEC                   every recurring round: contributions, gate verdict, champion

Exit codes: 0 success; 1 the workflow failed while running; 2 bad input (spec, data, model).
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import click

from pipeline.lineage import DEFAULT_UI_URL, ui_links  # stdlib only at import time: MLflow loads lazily

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_BUSY = 3  # the workflow is already running on that store (another driver holds its lease)


def _console():
    from rich.console import Console

    # piped or logged output gets a wide console: rich would squeeze tables to 80 columns
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def _timed_reporter(console):
    """Progress lines with the seconds since the command started (``run``, ``resume``, ``round``)."""
    start = time.perf_counter()

    def report(msg: str) -> None:
        console.print(f"[dim]{time.perf_counter() - start:7.1f}s[/dim] {msg}")

    return report


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {_one_line(message)}", err=True)
    sys.exit(code)


def _one_line(message: str) -> str:
    """Fold a YAML parser's multi-line report (context, snippet, caret) into one line; a list of
    problems (lines starting with '  - ') keeps its lines."""
    message = re.sub(r'\n\s+in "[^"]*", line (\d+), column (\d+):(?:\n(?!\s*\^)[^\n]*)?\n\s*\^',
                     r" at line \1, column \2", message.rstrip())
    return re.sub(r"\n(?!  - )\s*", "; ", message)


def _load(spec: str, tracking_uri: str | None, store: str | None):
    from pipeline.spec import SpecError, load_workflow

    try:
        return load_workflow(spec, {"tracking.uri": tracking_uri, "store.root": store})
    except SpecError as exc:
        # one problem, one line; several: a header and one line each
        _fail(f"{exc.source}: {exc.problems[0]}" if len(exc.problems) == 1 else str(exc), EXIT_BAD_INPUT)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mergeflow")
def main() -> None:
    """mergeflow: distributed fine-tune-then-merge workflows on Ray, with MLflow lineage."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@main.command()
@click.argument("spec", type=click.Path())
@click.option("--tracking-uri", default=None, help="Override tracking.uri (e.g. sqlite:///mlflow.db, http://host:5000).")
@click.option("--store", default=None, help="Override store.root (a folder or a pyarrow.fs URI).")
@click.option("--no-data", is_flag=True, help="Check the spec only; do not read the data or the base model.")
def validate(spec: str, tracking_uri: str | None, store: str | None, no_data: bool) -> None:
    """Check SPEC: every spec rule, then (unless --no-data) the base model and every task's data."""
    from pipeline.driver import PreflightError, preflight

    wf = _load(spec, tracking_uri, store)
    if not no_data:
        try:
            preflight(wf, report=lambda m: click.echo(f"  {m}"))
        except PreflightError as exc:
            _fail(str(exc), EXIT_BAD_INPUT)
    if wf.recurring is not None:
        sched = wf.recurring.schedule
        when = "no schedule" if sched is None else (f"cron '{sched.cron}' {sched.timezone}" if sched.cron
                                                    else f"every {sched.interval_seconds}s")
        click.echo(f"ok: {spec} is a valid recurring workflow '{wf.name}' with {len(wf.tasks)} tasks (contributions: "
                   f"{wf.recurring.contributions}; fuse: {wf.recurring.merge.method}; {when}; spec hash {wf.spec_hash()})")
        return
    merge = wf.merge.method if wf.strategy == "oneshot" else f"{wf.rounds.merge.method} over {wf.rounds.count} rounds"
    click.echo(f"ok: {spec} is a valid {wf.strategy} workflow '{wf.name}' with {len(wf.tasks)} tasks "
               f"(merge: {merge}; spec hash {wf.spec_hash()})")


@main.command()
@click.argument("spec", type=click.Path())
@click.option("--address", default=None,
              help="Ray cluster: omit for a private local cluster, 'auto' or HOST:PORT for a running one, "
                   "'in-process' to run without Ray (debugging).")
@click.option("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all).")
@click.option("--tracking-uri", default=None, help="Override tracking.uri.")
@click.option("--store", default=None, help="Override store.root.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON at the end.")
@click.option("--ui-url", default=DEFAULT_UI_URL, show_default=True,
              help="Where the MLflow UI is served (mergeflow ui SPEC); the links printed at the end point there.")
def run(spec: str, address: str | None, num_cpus: int | None, tracking_uri: str | None, store: str | None,
        as_json: bool, ui_url: str) -> None:
    """Run the workflow in SPEC and print per-task accuracy of base, experts and merged model."""
    wf = _load(spec, tracking_uri, store)
    if wf.recurring is not None:
        _fail(f"{spec}: is a recurring workflow (it has a recurring: section); run its next round with "
              f"`mergeflow round {spec}` or its schedule with `mergeflow schedule {spec}`", EXIT_BAD_INPUT)
    _run_and_print(wf, Path(spec).read_text(), address, num_cpus, as_json, ui_url)


def _run_and_print(wf, spec_text: str | None, address: str | None, num_cpus: int | None, as_json: bool,
                   ui_url: str) -> None:
    """Run ``wf`` with progress lines, then print its table and links (``run`` and ``resume``)."""
    from operators.data import DataError
    from operators.merge.engine import MergeError
    from operators.tensor_io import CheckpointError
    from pipeline.attempts import WorkflowBusy
    from pipeline.driver import PreflightError, result_json, run_workflow

    console = _console()
    report = _timed_reporter(console)
    try:
        result = run_workflow(wf, address=address, num_cpus=num_cpus, spec_text=spec_text, report=report)
    except PreflightError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    except WorkflowBusy as exc:
        _fail(str(exc), EXIT_BUSY)
    except (DataError, CheckpointError, MergeError) as exc:
        _fail(f"{type(exc).__name__}: {exc}", EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        _fail("interrupted; finished steps are kept in the store and are reused by the next run", EXIT_FAILED)
    except Exception as exc:  # a step failed on the cluster
        _fail(f"workflow failed: {type(exc).__name__}: {exc}", EXIT_FAILED)
    print_summary(console, result, ui_url)
    if as_json:
        click.echo(result_json(result))


@main.command()
@click.argument("spec", type=click.Path())
@click.option("--strategies", default="oneshot,atm,cold_fusion", show_default=True)
@click.option("--merges", default="task_arithmetic,ties", show_default=True,
              help="Merge methods for one-shot ('mean' is the uniform average).")
@click.option("--round-merges", default="mean", show_default=True,
              help="Merge methods for ATM and ColD Fusion ('mean': the authors' default).")
@click.option("--out", "out_dir", default="compare", show_default=True, type=click.Path(),
              help="Folder for compare.md, compare.json and compare.png.")
@click.option("--seeds", default=None, metavar="S1,S2,...",
              help="Run every variant once per fine-tuning seed (e.g. 0,1,2; data splits keep their seeds) and "
                   "report mean ± sample std over seeds. Default: once, with the spec's own seed.")
@click.option("--address", default=None, help="Ray address (as for run).")
@click.option("--num-cpus", type=int, default=None)
@click.option("--tracking-uri", default=None)
@click.option("--store", default=None)
def compare(spec: str, strategies: str, merges: str, round_merges: str, out_dir: str, seeds: str | None,
            address: str | None, num_cpus: int | None, tracking_uri: str | None, store: str | None) -> None:
    """Run SPEC's tasks under several strategies and merges at the same fine-tuning budget; compare them.

    With --seeds, every variant runs once per seed, as child runs of the one comparison run tagged
    mergeflow.seed. With two or more seeds, the table, compare.md and compare.json give the mean ±
    sample standard deviation over seeds and each seed's numbers, and the plot the mean curve with
    the min–max band over seeds and the 95% bootstrap interval of the seed-averaged final mean.
    """
    from operators.merge import MERGE_METHODS
    from pipeline.compare import (
        MEAN,
        parse_seeds,
        run_comparison,
        seeded_workflow,
        seeds_heading,
        seeds_markdown,
        table_markdown,
    )
    from pipeline.driver import PreflightError
    from pipeline.spec import IMPLEMENTED_STRATEGIES

    wf = _load(spec, tracking_uri, store)
    strats = [s.strip() for s in strategies.split(",") if s.strip()]
    bad = [s for s in strats if s not in IMPLEMENTED_STRATEGIES]
    if bad or not strats:
        _fail(f"--strategies: {bad or strategies!r} not known; use {', '.join(IMPLEMENTED_STRATEGIES)}", EXIT_BAD_INPUT)
    ms = [m.strip() for m in merges.split(",") if m.strip()]
    rms = [m.strip() for m in round_merges.split(",") if m.strip()]
    for opt, names in (("--merges", ms), ("--round-merges", rms)):
        unknown = [m for m in names if m != MEAN and m not in MERGE_METHODS]
        if unknown or not names:
            _fail(f"{opt}: {unknown or names!r} not known; use mean or one of {', '.join(sorted(MERGE_METHODS))}",
                  EXIT_BAD_INPUT)
    seed_list = None
    if seeds is not None:
        try:
            seed_list = parse_seeds(seeds)
            for s in seed_list:
                seeded_workflow(wf, s)
        except ValueError as exc:
            _fail(f"--seeds: {exc}", EXIT_BAD_INPUT)
    console = _console()
    start = time.perf_counter()

    def report(msg: str) -> None:
        console.print(f"[dim]{time.perf_counter() - start:7.1f}s[/dim] {msg}")

    try:
        result = run_comparison(wf, strats, ms, rms, Path(out_dir), seeds=seed_list, address=address,
                                num_cpus=num_cpus, report=report)
    except PreflightError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        _fail("interrupted; finished steps are kept in the store and are reused by the next run", EXIT_FAILED)
    except Exception as exc:
        _fail(f"comparison failed: {type(exc).__name__}: {exc}", EXIT_FAILED)
    if result.seed_tables:  # several seeds: mean ± std, then each seed's mean accuracy
        console.print(seeds_heading(result) + table_markdown(result.table, result.std))
        console.print(seeds_markdown(result))
    else:
        console.print(table_markdown(result.table))
    for label, points in result.curves.items():
        spread = result.curve_range.get(label)
        console.print(f"{label}: " + ", ".join(f"budget {b:.2f} → {acc:.3f}" + (
            f" ({spread[k][0]:.3f}–{spread[k][1]:.3f})" if spread else "") for k, (b, acc) in enumerate(points)))
    console.print(f"wrote {', '.join(str(f) for f in result.files)}; MLflow run {result.run_id}")


def print_summary(console, result, ui_url: str = DEFAULT_UI_URL) -> None:
    from rich.table import Table

    from pipeline.driver import COLUMNS

    summary = result.summary()
    cols = [c for c in COLUMNS if c in summary["mean"]]
    table = Table(title=f"{result.workflow}: accuracy on held-out data",
                  caption="base: linear probe of the base (classification) or the base as is (causal LM); "
                          "accuracy: each task's headline metric")
    table.add_column("task")
    for c in cols:
        table.add_column(COLUMNS[c], justify="right")
    for task, row in summary.items():
        style = "bold" if task == "mean" else None
        table.add_row(task, *[f"{row[c]:.3f}" for c in cols], style=style)
    console.print(table)
    final = result.final
    console.print(f"merged model: {final.merged.uri}")
    if final.registered_version:
        console.print(f"registered:   models:/{result.registered_model}/{final.registered_version}")
    console.print(f"MLflow run:   {result.run_id}")
    console.print(f"wall time:    {result.seconds:.1f}s")
    served = result.tracking_uri.lower().startswith(("http://", "https://"))
    if served and ui_url == DEFAULT_UI_URL:  # a tracking server serves its own UI: link there
        ui_url = result.tracking_uri.rstrip("/")
    links = ui_links(ui_url, result.experiment_id, run_id=result.run_id, model_id=final.merged.model_id,
                     registered_model=result.registered_model, version=result.alias_version or final.registered_version)
    _print_links(links, "MLflow UI links:" if served else (
        f"MLflow UI links (serve them with: mergeflow ui SPEC, or mlflow ui --backend-store-uri {result.tracking_uri}):"))


def _print_links(links: dict[str, str], header: str) -> None:
    click.echo(header)
    for label, url in links.items():
        click.echo(f"  {label + ':':<20}{url}")


def _tracking_client(tracking_uri: str):
    """An MLflow client on an existing tracking store and its experiments; a one-line error otherwise."""
    from mlflow import MlflowClient

    from pipeline.spec import check_tracking_uri

    try:
        check_tracking_uri(tracking_uri)
    except ValueError as exc:
        _fail(f"--tracking-uri: {exc}", EXIT_BAD_INPUT)
    db = Path(tracking_uri[len("sqlite:///"):]) if tracking_uri.startswith("sqlite:///") else None
    if db is not None and not db.is_file():
        _fail(f"no tracking database at {tracking_uri}; run a workflow first or pass --tracking-uri", EXIT_BAD_INPUT)
    if db is not None and db.read_bytes()[:16] != b"SQLite format 3\x00":
        _fail(f"{db} is not a SQLite database (--tracking-uri {tracking_uri}); pass the file mergeflow run wrote",
              EXIT_BAD_INPUT)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        exps = client.search_experiments()
    except Exception as exc:  # a server that does not answer, a database of another program, ...
        _fail(f"cannot read the tracking store {tracking_uri}: {type(exc).__name__}: {exc}", EXIT_BAD_INPUT)
    return client, exps


@main.command()
@click.argument("run_id")
@click.option("--tracking-uri", default="sqlite:///mlflow.db", show_default=True, help="Where the run is recorded.")
@click.option("--address", default=None, help="Ray cluster (as for run).")
@click.option("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON at the end.")
@click.option("--ui-url", default=DEFAULT_UI_URL, show_default=True, help="As for run.")
def resume(run_id: str, tracking_uri: str, address: str | None, num_cpus: int | None, as_json: bool,
           ui_url: str) -> None:
    """Finish the workflow that RUN_ID (its workflow run, or any run under it) belongs to.

    The spec comes from the run itself (its workflow.json), so nothing but the run id is needed; the
    steps already complete in the store are reused, the rest are run, and the registry gets no
    second version of a model it already has. A run whose driver is still alive here is refused.
    """
    import json as _json
    import socket
    import tempfile

    from pipeline.attempts import dead_because
    from pipeline.lineage import TAG_KIND, TAG_WORKFLOW_RUN
    from pipeline.spec import SpecError, parse_workflow

    client, _ = _tracking_client(tracking_uri)
    try:
        run = client.get_run(run_id)
    except Exception:
        _fail(f"no run {run_id!r} in {tracking_uri}; list the workflow runs with: mergeflow status --tracking-uri "
              f"{tracking_uri}", EXIT_BAD_INPUT)
    root = client.get_run(run.data.tags.get(TAG_WORKFLOW_RUN, run_id))
    if root.data.tags.get(TAG_KIND) != "workflow":
        _fail(f"run {run_id} is not part of a mergeflow workflow run (recurring rounds finish themselves: "
              "mergeflow round SPEC)", EXIT_BAD_INPUT)
    if root.info.status == "RUNNING" and dead_because(root.data.tags) is None and \
            root.data.tags.get("mergeflow.driver.host") == socket.gethostname():
        _fail(f"workflow run {root.info.run_id} is still running (pid {root.data.tags.get('mergeflow.driver.pid')}); "
              "wait for it or stop it first", EXIT_BAD_INPUT)
    with tempfile.TemporaryDirectory(prefix="mergeflow-resume-") as tmp:
        try:
            spec_json = Path(client.download_artifacts(root.info.run_id, "workflow.json", tmp)).read_text()
        except Exception as exc:
            _fail(f"run {root.info.run_id} has no workflow.json artifact to resume from ({type(exc).__name__}); "
                  "run its spec again with mergeflow run SPEC", EXIT_BAD_INPUT)
        try:
            spec_text = Path(client.download_artifacts(root.info.run_id, "workflow.yaml", tmp)).read_text()
        except Exception:
            spec_text = None
    try:
        wf = parse_workflow({**_json.loads(spec_json), "tracking": {**_json.loads(spec_json)["tracking"],
                                                                    "uri": tracking_uri}},
                            f"run {root.info.run_id}: workflow.json")
    except SpecError as exc:
        _fail(f"{exc.source}: {exc.problems[0]} (made by another mergeflow version?)", EXIT_BAD_INPUT)
    click.echo(f"resuming workflow {wf.name!r} (run {root.info.run_id}, {root.info.status}) from store {wf.store.root}")
    _run_and_print(wf, spec_text, address, num_cpus, as_json, ui_url)


@main.command()
@click.argument("run_id", required=False)
@click.option("--tracking-uri", default="sqlite:///mlflow.db", show_default=True)
@click.option("--experiment", default=None, help="Only this experiment.")
@click.option("--limit", default=10, show_default=True)
def status(run_id: str | None, tracking_uri: str, experiment: str | None, limit: int) -> None:
    """Without RUN_ID: recent workflow runs. With RUN_ID: its rounds, experts, merges and artifacts."""
    from rich.table import Table

    from pipeline.lineage import TAG_KIND, TAG_WORKFLOW_RUN

    client, exps = _tracking_client(tracking_uri)
    if experiment:
        exps = [e for e in exps if e.name == experiment]
    exp_ids = [e.experiment_id for e in exps]
    console = _console()
    if not run_id:
        runs = client.search_runs(exp_ids, f"tags.`{TAG_KIND}` = 'workflow'", max_results=limit,
                                  order_by=["attributes.start_time DESC"])
        table = Table(title=f"workflow runs ({tracking_uri})")
        for c in ("run id", "workflow", "status", "started", "mean merged acc", "mean normalized"):
            table.add_column(c)
        for r in runs:
            m = r.data.metrics
            table.add_row(r.info.run_id, r.info.run_name, r.info.status,
                          time.strftime("%Y-%m-%d %H:%M", time.localtime(r.info.start_time / 1000)),
                          f"{m['mean/merged_accuracy']:.3f}" if "mean/merged_accuracy" in m else "-",
                          f"{m['mean/normalized_accuracy']:.3f}" if "mean/normalized_accuracy" in m else "-")
        console.print(table)
        return
    try:
        parent = client.get_run(run_id)
    except Exception:
        _fail(f"no run {run_id!r} in {tracking_uri}; list the workflow runs with: mergeflow status --tracking-uri "
              f"{tracking_uri}", EXIT_BAD_INPUT)
    root = parent.data.tags.get(TAG_WORKFLOW_RUN, run_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`{TAG_WORKFLOW_RUN}` = '{root}'",
                              order_by=["attributes.start_time ASC"], max_results=1000)
    console.print(f"[bold]{parent.info.run_name}[/bold] run {root}: {client.get_run(root).info.status}")
    table = Table()
    for c in ("kind", "name", "round", "status", "key metrics", "checkpoint"):
        table.add_column(c)
    for r in runs:
        tags, m = r.data.tags, r.data.metrics
        key = {k: v for k, v in m.items() if k.endswith("accuracy") and "/" in k and not k.startswith("probe")}
        shown = ", ".join(f"{k}={v:.3f}" for k, v in sorted(key.items())[:3])
        table.add_row(tags.get(TAG_KIND, "?"), r.info.run_name, tags.get("mergeflow.round", ""), r.info.status,
                      shown, tags.get("mergeflow.store_uri", ""))
    console.print(table)


@main.command()
@click.argument("spec", type=click.Path())
@click.option("--port", type=int, default=5000, show_default=True, help="Port of the UI.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on: loopback by default (this machine only); 0.0.0.0 exposes it.")
@click.option("--tracking-uri", default=None, help="Override tracking.uri.")
def ui(spec: str, port: int, host: str, tracking_uri: str | None) -> None:
    """Start the MLflow UI on SPEC's tracking store; print links to its latest run, model and version."""
    import signal
    import socket
    import subprocess
    import urllib.request

    from pipeline.lineage import latest_workflow

    wf = _load(spec, tracking_uri, None)
    uri = wf.tracking.uri
    if uri.lower().startswith(("http://", "https://")):
        _fail(f"tracking.uri {uri} is an MLflow server already; open it in a browser (mergeflow ui serves a local "
              "store such as sqlite:///mlflow.db)", EXIT_BAD_INPUT)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        _fail(f"no tracking database at {uri[len('sqlite:///'):]} (tracking.uri {uri}); run the workflow first: "
              f"mergeflow run {spec}", EXIT_BAD_INPUT)
    if not 0 < port < 65536:
        _fail(f"--port {port} is not a TCP port; use 1-65535, e.g. 5000", EXIT_BAD_INPUT)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            _fail(f"cannot listen on {host}:{port} ({exc.strerror}); pick another with --port or --host", EXIT_BAD_INPUT)
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
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{ui_url}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        if proc.poll() is not None:
            _fail(f"the MLflow UI exited with code {proc.returncode} before serving (its output is above)", EXIT_FAILED)
        latest = latest_workflow(uri, wf.experiment_name, wf.name, wf.registered_model_name, wf.tracking.alias)
        if latest is None:
            click.echo(f"no finished run of workflow {wf.name!r} in experiment {wf.experiment_name!r} yet")
        else:
            _print_links(ui_links(ui_url, latest["experiment_id"], run_id=latest["run_id"], model_id=latest["model_id"],
                                  registered_model=wf.registered_model_name, version=latest["version"]),
                         f"MLflow UI ready at {ui_url}:")
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

    from operators.checkpoint import (
        adapter_base_of,
        export_task_model,
        head_names,
        is_adapter_checkpoint,
        is_causal_lm_adapter,
        is_causal_lm_checkpoint,
        validate_base_checkpoint,
    )
    from operators.tensor_io import CheckpointError, TensorReader

    if "://" in checkpoint:  # a checkpoint in an object store: download it (checked against its manifest)
        from pipeline.store import StoreError, fetch_checkpoint

        try:
            checkpoint = str(fetch_checkpoint(checkpoint))
        except (StoreError, OSError) as exc:
            _fail(f"CHECKPOINT {checkpoint}: {exc}", EXIT_BAD_INPUT)
    src, dst = Path(checkpoint), Path(out)
    if not src.is_dir():
        _fail(f"CHECKPOINT {checkpoint}: {'is a file' if src.exists() else 'no such directory'}; give a merged or "
              "expert checkpoint directory (mergeflow status RUN_ID lists them)", EXIT_BAD_INPUT)
    adapter = is_adapter_checkpoint(src)
    causal = is_causal_lm_adapter(src) if adapter else is_causal_lm_checkpoint(src)
    if not causal and task not in head_names(checkpoint):
        _fail(f"{checkpoint} has no head for task {task!r}; heads: {', '.join(head_names(checkpoint)) or 'none'}",
              EXIT_BAD_INPUT)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        _fail(f"{out} exists and is not an empty folder; choose a new directory", EXIT_BAD_INPUT)
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
        _fail(f"{checkpoint}: {why}" if checkpoint not in str(exc) else str(exc), EXIT_BAD_INPUT)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    click.echo(f"wrote {dst}: load with AutoModelForSequenceClassification.from_pretrained({str(dst)!r})")


@main.command()
@click.argument("config", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--shard-size", default="2GB", show_default=True, help="Output shard size (e.g. 200MB, 5GB).")
@click.option("--threads", type=int, default=None, help="Torch threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary (time, peak memory, bytes) on stdout.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def merge(config: str, out: str, shard_size: str, threads: int | None, as_json: bool, quiet: bool) -> None:
    """Merge the checkpoints CONFIG names into OUT, streaming tensor by tensor.

    CONFIG is a mergeflow merge config (base, experts, method, params) or a mergekit YAML config
    (merge_method, base_model, models, parameters, dtype), read with mergekit's semantics.
    """
    import json
    import resource

    import torch
    from tqdm import tqdm

    from operators.merge.engine import MergeError, merge_checkpoints
    from operators.merge.merge_config import MergeConfigError, load_merge_config
    from operators.tensor_io import CheckpointError
    from pipeline.store import fetch_checkpoint

    if threads:
        torch.set_num_threads(threads)
    try:
        shard_bytes = _parse_size(shard_size)
        plan = load_merge_config(config, fetch=fetch_checkpoint)
    except (MergeConfigError, ValueError) as exc:
        _fail(f"{config}: {exc}", EXIT_BAD_INPUT)
    bar = None if quiet else tqdm(total=None, unit="tensor", desc=f"{plan.method}", file=sys.stderr, leave=False)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    start = time.perf_counter()
    try:
        report = merge_checkpoints(plan.base, plan.experts, plan.method, plan.params, out,
                                   max_shard_bytes=shard_bytes, progress=progress, out_dtype=plan.out_dtype,
                                   provenance={"config": str(Path(config).resolve()), "config_format": plan.source_format},
                                   adapter_bases=plan.adapter_bases or None, lora_mode=plan.lora_mode,
                                   adapter_rank=plan.adapter_rank, adapter_factorization=plan.adapter_factorization)
    except (MergeError, CheckpointError, ValueError) as exc:
        _fail(str(exc), EXIT_BAD_INPUT)
    finally:
        if bar is not None:
            bar.close()
    summary = {
        "output": str(Path(out).resolve()),
        "method": plan.method,
        "config_format": plan.source_format,
        "experts": report.experts,
        "tensors": report.tensors,
        "seconds": round(time.perf_counter() - start, 3),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "bytes_read": report.bytes_read,
        "bytes_written": report.bytes_written,
        "output_files": report.output_files,
        "notes": plan.notes,
        **({"lora_mode": report.lora_mode} if report.lora_mode else {}),
        **({"adapter_rank": report.adapter_rank, "adapter_error": report.adapter_error,
            "adapter_worst_module": report.adapter_worst_module,
            "adapter_worst_module_error": report.adapter_worst_module_error} if report.lora_mode == "adapter" else {}),
    }
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"merged {len(report.experts)} models with {plan.method} into {out}: {report.tensors} tensors, "
                   f"{report.bytes_written / 1e6:.0f} MB written in {summary['seconds']:.1f} s, "
                   f"peak RSS {summary['peak_rss_bytes'] / 1e6:.0f} MB")
        if report.lora_mode == "adapter":
            click.echo(f"adapter rank {report.adapter_rank}: relative error {report.adapter_error:.3g} "
                       f"(worst {report.adapter_worst_module}: {report.adapter_worst_module_error:.3g})")
        for note in plan.notes:
            click.echo(f"note: {note}")


# --- cluster jobs (pipeline.jobs does the work) ----------------------------------------------------
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
        click.echo(f"(no MLflow links: {tracking_uri} did not answer: {str(exc).splitlines()[0][:200]})", err=True)
        return {}
    return {job: ui_links(ui, exp, run_id=run)["workflow run"] for job, (exp, run) in found.items()}


def _jobs_call(fn, *args, **kwargs):
    from pipeline.jobs import JobError

    try:
        return fn(*args, **kwargs)
    except JobError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)


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

    wf = _load(spec, None, None)
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
               f"{tracking}; `mergeflow jobs --tracking-uri {tracking}` links it once the driver starts")


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
        click.echo(f"{r.job_id}  {r.status:<9}  {r.workflow}  started {started}  {_one_line(r.message)}{link}")


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


def _log_chunks(jobs, address: str, job: str, follow: bool):
    from pipeline.jobs import JobError

    try:
        yield from jobs.logs(address, job, follow=follow)
    except JobError as exc:
        _fail(str(exc), EXIT_BAD_INPUT)


@main.command()
@click.argument("job")
@_ADDRESS
@click.option("--wait", "wait_s", type=float, default=60.0, show_default=True, help="Seconds to wait for it to end.")
def stop(job: str, address: str, wait_s: float) -> None:
    """Stop JOB (its MLflow runs end KILLED; finished steps stay in the store for the next run)."""
    from pipeline import jobs

    state = _jobs_call(jobs.stop, address, job, wait_s)
    click.echo(f"job {job}: {state}")


def _parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num):]
    try:
        value = float(num) * units[unit]
    except (ValueError, KeyError):
        raise ValueError(f"--shard-size: {text!r} is not a size; use e.g. 200MB or 5GB") from None
    if value < 1:
        raise ValueError(f"--shard-size: {text!r} must be positive")
    return int(value)


from pipeline.recurring.cli import register as _register_recurring  # noqa: E402  (verbs in their own module)

_register_recurring(main, _load, _fail, _console, _timed_reporter)

if __name__ == "__main__":
    main()
