"""Running workflows: ``mergeflow validate``, ``run``, ``resume`` and ``compare`` (the work is in
``pipeline.driver`` and ``pipeline.compare``; MLflow is read through ``pipeline.lineage``)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from pipeline.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_BUSY,
    EXIT_FAILED,
    fail,
    load_spec,
    new_console,
    print_links,
    spec_error_message,
    timed_reporter,
)
from pipeline.cli.group import main
from pipeline.lineage import DEFAULT_UI_URL, ui_links  # stdlib only at import time: MLflow loads lazily
from pipeline.redact import redact_uri


@main.command()
@click.argument("spec", type=click.Path())
@click.option("--tracking-uri", default=None, help="Override tracking.uri (e.g. sqlite:///mlflow.db, http://host:5000).")
@click.option("--store", default=None, help="Override store.root (a folder or a pyarrow.fs URI).")
@click.option("--no-data", is_flag=True, help="Check the spec only; do not read the data or the base model.")
def validate(spec: str, tracking_uri: str | None, store: str | None, no_data: bool) -> None:
    """Check SPEC: every spec rule, then (unless --no-data) the base model and every task's data."""
    from pipeline.driver import PreflightError, preflight

    wf = load_spec(spec, tracking_uri, store)
    if not no_data:
        try:
            preflight(wf, report=lambda m: click.echo(f"  {m}"))
        except PreflightError as exc:
            fail(str(exc), EXIT_BAD_INPUT)
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
    wf = load_spec(spec, tracking_uri, store)
    if wf.recurring is not None:
        fail(f"{spec}: is a recurring workflow (it has a recurring: section); run its next round with "
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

    console = new_console()
    report = timed_reporter(console)
    try:
        result = run_workflow(wf, address=address, num_cpus=num_cpus, spec_text=spec_text, report=report)
    except PreflightError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    except WorkflowBusy as exc:
        fail(str(exc), EXIT_BUSY)
    except (DataError, CheckpointError, MergeError) as exc:
        fail(f"{type(exc).__name__}: {exc}", EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        fail("interrupted; finished steps are kept in the store and are reused by the next run", EXIT_FAILED)
    except Exception as exc:  # a step failed on the cluster
        fail(f"workflow failed: {type(exc).__name__}: {exc}", EXIT_FAILED)
    print_summary(console, result, ui_url)
    if as_json:
        click.echo(result_json(result))


def print_summary(console, result, ui_url: str = DEFAULT_UI_URL) -> None:
    """The accuracy table of a finished workflow, its merged model, run, wall time and MLflow UI links."""
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
    print_links(links, "MLflow UI links:" if served else (
        f"MLflow UI links (serve them with: mergeflow ui SPEC, or mlflow ui --backend-store-uri {redact_uri(result.tracking_uri)}):"))


@main.command()
@click.argument("run_id")
@click.option("--tracking-uri", default="sqlite:///mlflow.db", show_default=True, help="Where the run is recorded.")
@click.option("--address", default=None, help="Ray cluster (as for run).")
@click.option("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON at the end.")
@click.option("--ui-url", default=DEFAULT_UI_URL, show_default=True, help="As for run.")
@click.option("--store", default=None,
              help="The store root, when the run's own had a password or key (mergeflow never records one).")
def resume(run_id: str, tracking_uri: str, address: str | None, num_cpus: int | None, as_json: bool,
           ui_url: str, store: str | None) -> None:
    """Finish the workflow that RUN_ID (its workflow run, or any run under it) belongs to.

    The spec comes from the run itself (its workflow.json), so nothing but the run id is needed; the
    steps already complete in the store are reused, the rest are run, and the registry gets no
    second version of a model it already has. A run whose driver is still alive here is refused.
    A password or key in the run's store root or data URIs was not recorded: give the store with --store
    (or the credentials in the environment), or run the spec again (mergeflow run SPEC reuses every step).
    """
    import json as _json
    import socket

    from pipeline.attempts import dead_because
    from pipeline.lineage import TAG_REDACTED, TrackingStoreError, workflow_root_of, workflow_spec_of
    from pipeline.spec import SpecError, parse_workflow

    try:
        root = workflow_root_of(tracking_uri, run_id)
    except TrackingStoreError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    if root.status == "RUNNING" and dead_because(root.tags) is None and \
            root.tags.get("mergeflow.driver.host") == socket.gethostname():
        fail(f"workflow run {root.run_id} is still running (pid {root.tags.get('mergeflow.driver.pid')}); "
             "wait for it or stop it first", EXIT_BAD_INPUT)
    try:
        spec_json, spec_text = workflow_spec_of(tracking_uri, root.run_id)
    except TrackingStoreError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    recorded = _json.loads(spec_json)
    recorded["tracking"] = {**recorded["tracking"], "uri": tracking_uri}
    if store:
        recorded["store"] = {**recorded["store"], "root": store}
    lost = [f for f in root.tags.get(TAG_REDACTED, "").split(",") if f and f != "tracking.uri"
            and not (store and f == "store.root")]
    if lost:
        fail(f"run {root.run_id}: its {', '.join(lost)} held a password or key, which mergeflow does not record; "
             + ("resume with --store STORE_URI (as given to mergeflow run), or " if "store.root" in lost else "")
             + "put the credentials in the environment and run the spec again (mergeflow run SPEC reuses every "
             "finished step)", EXIT_BAD_INPUT)
    try:
        wf = parse_workflow(recorded, f"run {root.run_id}: workflow.json")
    except SpecError as exc:
        fail(f"{exc.source}: {exc.problems[0]} (made by another mergeflow version?)", EXIT_BAD_INPUT)
    click.echo(f"resuming workflow {wf.name!r} (run {root.run_id}, {root.status}) from store {redact_uri(wf.store.root)}")
    _run_and_print(wf, spec_text, address, num_cpus, as_json, ui_url)


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
    from pipeline.spec import IMPLEMENTED_STRATEGIES, SpecError

    wf = load_spec(spec, tracking_uri, store)
    strats = [s.strip() for s in strategies.split(",") if s.strip()]
    bad = [s for s in strats if s not in IMPLEMENTED_STRATEGIES]
    if bad or not strats:
        fail(f"--strategies: {bad or strategies!r} not known; use {', '.join(IMPLEMENTED_STRATEGIES)}", EXIT_BAD_INPUT)
    ms = [m.strip() for m in merges.split(",") if m.strip()]
    rms = [m.strip() for m in round_merges.split(",") if m.strip()]
    for opt, names in (("--merges", ms), ("--round-merges", rms)):
        unknown = [m for m in names if m != MEAN and m not in MERGE_METHODS]
        if unknown or not names:
            fail(f"{opt}: {unknown or names!r} not known; use mean or one of {', '.join(sorted(MERGE_METHODS))}",
                 EXIT_BAD_INPUT)
    seed_list = None
    if seeds is not None:
        try:
            seed_list = parse_seeds(seeds)
            for s in seed_list:
                seeded_workflow(wf, s)
        except ValueError as exc:
            fail(f"--seeds: {exc}", EXIT_BAD_INPUT)
    console = new_console()
    start = time.perf_counter()

    def report(msg: str) -> None:
        console.print(f"[dim]{time.perf_counter() - start:7.1f}s[/dim] {msg}")

    try:
        result = run_comparison(wf, strats, ms, rms, Path(out_dir), seeds=seed_list, address=address,
                                num_cpus=num_cpus, report=report)
    except SpecError as exc:  # a variant the spec cannot run (every variant is checked before the first runs)
        fail(spec_error_message(exc), EXIT_BAD_INPUT)
    except PreflightError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        fail("interrupted; finished steps are kept in the store and are reused by the next run", EXIT_FAILED)
    except Exception as exc:
        fail(f"comparison failed: {type(exc).__name__}: {exc}", EXIT_FAILED)
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


@main.command()
@click.argument("spec", type=click.Path())
@click.option("--target", required=True, help="The new task (a causal-LM task of SPEC): its expert is not used.")
@click.option("--examples", type=click.IntRange(min=1), default=32, show_default=True,
              help="Labelled examples of the target (a seeded sample of its train split) the weights are fit on.")
@click.option("--out", required=True, type=click.Path(), help="Where the composed model is written.")
@click.option("--evaluations", type=click.IntRange(min=2), default=40, show_default=True,
              help="Candidates CMA-ES scores (LoraHub: 40).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--l1", type=click.FloatRange(min=0.0), default=0.05, show_default=True,
              help="α of the L1 penalty on the weights (LoraHub: 0.05).")
@click.option("--address", default=None, help="Ray cluster for the experts' fine-tunes (as for run).")
@click.option("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all).")
@click.option("--tracking-uri", default=None, help="Override tracking.uri.")
@click.option("--store", default=None, help="Override store.root.")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON at the end.")
def compose(spec: str, target: str, examples: int, out: str, evaluations: int, seed: int, l1: float,
            address: str | None, num_cpus: int | None, tracking_uri: str | None, store: str | None,
            as_json: bool) -> None:
    """Weigh SPEC's other experts for the task TARGET from a few of its examples (LoraHub), write the composed
    model to OUT, and score it on TARGET's held-out split against the uniform merge and the base."""
    import json

    from pipeline.compose import compose_target

    wf = load_spec(spec, tracking_uri, store)
    try:
        record = compose_target(wf, target, examples, out, evaluations=evaluations, seed=seed, l1=l1,
                                address=address, num_cpus=num_cpus)
    except ValueError as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    if as_json:
        click.echo(json.dumps(record, indent=2, default=str))
