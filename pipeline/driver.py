"""Run a workflow end to end: preflight checks, lineage, runtime, strategy, summary.

Order matters: everything that can be checked without a cluster (spec, base model, every task's
data) is checked first, so bad input costs seconds, not cluster time. The MLflow database is
created here, in the driver, before any worker logs.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from operators.checkpoint import resolve_model_path, validate_base_checkpoint
from operators.checkpoint_files import is_causal_lm_checkpoint
from operators.data import DataError
from operators.packaged_models import origin_of
from operators.tensor_io import CheckpointError, TensorReader
from pipeline.attempts import Lease, WorkflowBusy, close_dead_attempts, describe_holder, driver_tags
from pipeline.context import StepContext, base_ref, task_data
from pipeline.lineage import TAG_REDACTED, TAG_SPEC_HASH, Lineage
from pipeline.lineage_graph import GraphData, GraphRound, draw_lineage
from pipeline.redact import redact_uri, redacted_fields
from pipeline.runtime import make_runtime
from pipeline.spec import Workflow
from pipeline.steps import lm_eval_step
from pipeline.store import CheckpointStore
from pipeline.strategies import STRATEGY_RUNNERS
from pipeline.strategies.rounds import RoundResult, Rounds, ended_status
from pipeline.strategies.workers import prestart

# what every step imports first (torch, transformers, MLflow: seconds), imported by each worker as it starts
WORKER_PRELOAD = ("operators.evaluate", "operators.finetune", "pipeline.steps")
RUN_LEASE = "run-lease.json"  # <store>/<workflow>/run-lease.json: the driver running that workflow now
RUN_LEASE_TTL_S = 600.0  # a holder that stops renewing (every TTL/4) is presumed dead after this


class PreflightError(ValueError):
    """Input that would fail on the cluster, caught before it starts (one line per problem)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        if len(problems) == 1:
            super().__init__(f"{problems[0]} (preflight: nothing was run)")
        else:
            super().__init__("preflight found problems (nothing was run):\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class WorkflowResult:
    workflow: str
    run_id: str
    experiment_id: str
    tracking_uri: str
    rounds: list[RoundResult]
    seconds: float
    registered_model: str = ""
    alias_version: str | None = None  # the registry version the alias points at when the run ended
    lm_eval: dict[str, dict[str, Any]] | None = None  # evaluation.lm_eval: "merged"/"base" -> the harness' record

    @property
    def final(self) -> RoundResult:
        return self.rounds[-1]

    def summary(self) -> dict[str, dict[str, float]]:
        return self.final.summary()


def preflight(wf: Workflow, report: Callable[[str], None] = lambda _m: None) -> None:
    """Check the base model and every task's data; raise :class:`PreflightError` listing all problems."""
    problems: list[str] = []
    try:
        base_dir = resolve_model_path(wf.base_model)
        validate_base_checkpoint(base_dir)
        with TensorReader(base_dir):  # every shard's header against its size: a truncated file stops here
            pass
        if wf.tasks[0].type == "causal_lm" and not is_causal_lm_checkpoint(base_dir):
            problems.append(f"base_model: {wf.base_model} is not a causal LM (its config.json names no *ForCausalLM "
                            "architecture); causal_lm tasks need one, e.g. packaged:word-llama")
        problems += gpu_memory_problems(wf, base_dir, report)
    except CheckpointError as exc:
        problems.append(f"base_model: {exc}")
    for task in wf.tasks:
        try:
            data = task_data(task)
            what = (f"{len(data.label_names)} labels" if not data.is_lm else
                    "causal LM, " + ("prompt/response" if data.train.prompts is not None else "plain text")
                    + (", with answers" if data.train.answers is not None else ""))
            report(f"data {task.name}: {len(data.train)} train / {len(data.eval)} eval examples, "
                   f"{what} ({redact_uri(data.source)})")
        except DataError as exc:
            problems.append(str(exc))
    problems += local_target_problems(wf)
    if wf.evaluation.lm_eval is not None:
        problems += lm_eval_problems(wf)
    if problems:
        raise PreflightError(problems)


def gpu_memory_problems(wf: Workflow, base_dir: Path, report: Callable[[str], None]) -> list[str]:
    """With GPUs: each expert's estimated memory per worker (``operators.memory``), reported; a share of a GPU
    (``resources.num_gpus``) that cannot hold it is a problem, where the GPU's memory is known
    (``resources.gpu_memory_gb``, else this machine's first GPU)."""
    from operators.memory import CUDA_CONTEXT_BYTES, GIB, estimate_expert_memory

    r = wf.resources
    if r.num_gpus <= 0:
        return []
    device = r.gpu_memory_gb * GIB if r.gpu_memory_gb else _local_gpu_bytes()
    problems = []
    for task in wf.tasks:
        settings, workers = wf.finetune_for(task), wf.workers_for(task)
        est = estimate_expert_memory(base_dir, settings, outputs=None if task.type == "causal_lm" else
                                     len(task.labels or []) or task.num_labels or 2, workers=workers,
                                     strategy=r.strategy)
        need = est.total + CUDA_CONTEXT_BYTES
        parts = f"{est.describe()}, CUDA context {CUDA_CONTEXT_BYTES / GIB:.2f} GiB"
        report(f"memory {task.name}: about {need / GIB:.1f} GiB per worker ({parts})")
        if device and need > r.num_gpus * device:
            fit = int(device // need)
            fixes = ["lower finetune.batch_size or max_length"]
            fixes += [] if settings.gradient_checkpointing else ["set finetune.gradient_checkpointing"]
            fixes += [] if settings.mode == "lora" else ["fine-tune with mode: lora"]
            fixes += [] if workers > 1 and r.strategy == "fsdp" or task.type != "causal_lm" else [
                "shard it over several workers (workers_per_expert with strategy: fsdp)"]
            problems.append(
                f"resources.num_gpus: {r.num_gpus:g} gives each expert {r.num_gpus * device / GIB:.1f} GiB of a "
                f"{device / GIB:.0f} GiB GPU, but expert {task.name!r} needs about {need / GIB:.1f} GiB per worker "
                f"({parts}); raise num_gpus to {min(1.0, need / device):.2f} or more"
                + (f" ({fit} such expert{'s fit' if fit > 1 else ' fits'} one GPU)" if fit else "")
                + ", or " + ", or ".join(fixes))
    return problems


def _local_gpu_bytes() -> float | None:
    """The memory of this machine's first GPU (None without one)."""
    try:
        import torch

        return float(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None
    except Exception:
        return None


def lm_eval_problems(wf: Workflow) -> list[str]:
    """evaluation.lm_eval: the harness installed, its include_path a folder, every task one it knows."""
    from operators.harness import LmEvalUnavailable, unknown_tasks

    spec = wf.evaluation.lm_eval
    try:
        missing = unknown_tasks(spec.tasks, spec.include_path)
    except LmEvalUnavailable as exc:
        return [str(exc)]
    if missing:
        where = f" nor in include_path {spec.include_path!r}" if spec.include_path else ""
        return [f"evaluation.lm_eval.tasks: {missing} are not tasks lm-eval knows{where}; see `lm-eval ls tasks`, "
                "or put your own task YAML files in a folder and name it in evaluation.lm_eval.include_path"]
    return []


def local_target_problems(wf: Workflow) -> list[str]:
    """Where the run would write, checked before anything is created: a SQLite tracking file and a
    local store root must be (or become) a file and a folder, under a folder."""
    problems = []
    uri = wf.tracking.uri
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).expanduser()
        if db.is_dir():
            problems.append(f"tracking.uri: {db} is a folder, not a database file (got {uri!r}); "
                            f"name a file, e.g. sqlite:///{db / 'mlflow.db'}")
        elif db.is_file() and db.stat().st_size and db.read_bytes()[:16] != b"SQLite format 3\x00":
            problems.append(f"tracking.uri: {db} exists and is not a SQLite database (got {uri!r}); "
                            "point at another file or move it away")
        elif _file_in_path(db.parent):
            problems.append(f"tracking.uri: {_file_in_path(db.parent)} is a file, so {db} cannot be created "
                            f"(got {uri!r}); choose another folder")
    root = wf.store.root
    if "://" not in root or root.startswith("file://"):
        folder = Path(root.removeprefix("file://")).expanduser()
        blocker = _file_in_path(folder)
        if blocker:
            problems.append(f"store.root: {blocker} is a file, not a folder (got {root!r}); choose a folder")
    return problems


def _file_in_path(folder: Path) -> Path | None:
    """The first existing non-folder on the way to ``folder`` (``None`` when it can be a folder)."""
    for p in [*reversed(folder.absolute().parents), folder.absolute()]:
        if p.exists() and not p.is_dir():
            return p
    return None


def run_workflow(
    wf: Workflow,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    spec_text: str | None = None,
    report: Callable[[str], None] = print,
    parent_run_id: str | None = None,
) -> WorkflowResult:
    """Run ``wf`` and return its rounds and summary.

    Args:
        wf: The validated workflow.
        address: ``None``/``"local"`` (a private local Ray), a cluster address, or ``"in-process"``.
        num_cpus: CPUs for a local Ray cluster.
        spec_text: The spec file's text, kept as an artifact of the workflow run.
        report: Where progress lines go.
        parent_run_id: Nest the workflow's run under this one (``mergeflow compare``).
    """
    start = time.perf_counter()
    if address == "in-process" and any(wf.workers_for(t) > 1 for t in wf.tasks):
        raise PreflightError(["resources.workers_per_expert (or a task's workers) above 1 trains those experts with Ray "
                              "Train, on a Ray cluster: run without --address in-process (a private local cluster), "
                              "or set it to 1 to debug in this process"])
    preflight(wf, report)
    store = CheckpointStore(wf.store.root)
    # one driver per workflow and store at a time, claimed before anything else (even a fresh MLflow
    # database is not safe to create twice at once): a second run would train the same experts again
    # and register a second version of the same merge
    lease = Lease(store, store.path(wf.name, RUN_LEASE), RUN_LEASE_TTL_S, heartbeat=True)
    holder = lease.acquire(report, f"workflow {wf.name!r}")
    if holder is not None:
        raise WorkflowBusy(
            f"workflow {wf.name!r} is already running on store {wf.store.root!r} ({describe_holder(holder)}). Two "
            "drivers at once would train the same experts twice and register the merge twice: wait for it to "
            "finish, or stop it (`mergeflow stop JOB`, or end that process); the next run reuses every step it "
            "finished.", holder)
    try:
        removed, size = store.remove_leftovers(wf.name)  # the space a writer killed mid-write left behind
        if removed:
            report(f"store: removed {len(removed)} staging or partial folder(s) ({size / 1e6:.1f} MB) that writers "
                   f"killed mid-write left behind")
        return _run_held(wf, lease, store, start, address, num_cpus, spec_text, report, parent_run_id)
    finally:
        lease.release()


def _run_held(wf: Workflow, lease: Lease, store: CheckpointStore, start: float, address: str | None,
              num_cpus: int | None, spec_text: str | None, report: Callable[[str], None],
              parent_run_id: str | None) -> WorkflowResult:
    """``run_workflow`` once its lease is held.

    Ray starts (seconds for a local cluster: its processes, then the workers' imports) while the driver
    opens its MLflow run in a thread (seconds too: the database, the spec's params): neither waits for
    the other. A runtime that fails to start is recorded on the workflow's run like any other failure.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="mergeflow-tracking") as tracking, contextlib.ExitStack() as stack:
        opening = tracking.submit(_open_workflow_run, wf, lease, spec_text, report, parent_run_id)
        try:
            runtime = stack.enter_context(make_runtime(address, num_cpus=num_cpus, preload=WORKER_PRELOAD))
            workers = prestart(runtime, wf)
            failed_to_start = None
        except BaseException as exc:  # (recorded once the run exists)
            failed_to_start = exc
        lineage, run_id = opening.result()
        ctx = StepContext(wf, wf.tracking.uri, lineage.experiment_id, run_id, wf.base_model)
        try:
            if failed_to_start is not None:
                raise failed_to_start
            rounds = Rounds(ctx, runtime, lineage, store, report, pool=workers)
            try:
                results = STRATEGY_RUNNERS[wf.strategy](rounds, base_ref(wf))
            finally:
                rounds.close()  # resident workers give their slots back
            harness = score_with_lm_eval(rounds, results[-1], run_id) if wf.evaluation.lm_eval else None
        except BaseException as exc:
            status = ended_status(exc)
            try:  # every run of this attempt still open ends with it: a stopped job leaves none RUNNING
                lineage.set_tags(run_id, {"mergeflow.error": f"{type(exc).__name__}: {exc}"[:4000]})
                lineage.end_attempt(run_id, status, {"mergeflow.ended_because": f"the workflow ended {status}: "
                                                     f"{type(exc).__name__}"})
            except Exception:  # the tracking server is gone too: at least try the workflow run; the next run of
                try:           # this workflow closes whatever stays RUNNING (its driver, this process, is gone)
                    lineage.end_run(run_id, status)
                except Exception:
                    report(f"workflow {wf.name!r}: could not close MLflow run {run_id} (the tracking server is away); "
                           "the next run of this workflow closes it")
            raise
    result = WorkflowResult(wf.name, run_id, lineage.experiment_id, wf.tracking.uri, results, time.perf_counter() - start,
                            wf.registered_model_name, lm_eval=harness)
    summary = result.summary()
    lineage.log_dict(run_id, {"summary": summary, "rounds": [_round_record(r) for r in results],
                              **({"lm_eval": harness} if harness else {})}, "results.json")
    lineage.log_text(run_id, summary_markdown(summary), "results.md")
    # the driver's own time in MLflow calls (runs, rounds, registry): bookkeeping on the rounds' critical path
    lineage.log_metrics(run_id, {"wall_seconds": result.seconds, "driver_mlflow_seconds": lineage.busy_seconds})
    result.alias_version = lineage.alias_version(wf.registered_model_name, wf.tracking.alias)
    _log_lineage_graph(lineage, run_id, wf, results, report)
    lineage.end_run(run_id)
    return result


def score_with_lm_eval(rounds: Rounds, final: RoundResult, run_id: str) -> dict[str, dict[str, Any]]:
    """``evaluation.lm_eval``: the final merged model (and the base) scored by lm-evaluation-harness, side by
    side. The merged model's scores go to its own run (``lm_eval/<task>/<metric>``); both go to the workflow's
    run as ``lm_eval/merged/...`` and ``lm_eval/base/...``."""
    wf = rounds.wf
    jobs = {}
    for which in wf.evaluation.lm_eval.models:
        model, run, prefix = ((final.merged, final.merged.run_id or final.run_id, "lm_eval") if which == "merged"
                              else (base_ref(wf), run_id, "lm_eval/base"))
        jobs[which] = rounds.runtime.submit(lm_eval_step, rounds.ctx, model, run, final.index, prefix,
                                            name=f"lm-eval-{which}", resources=rounds.eval_resources())
    records = {which: rounds.runtime.result(job) for which, job in jobs.items()}
    if "merged" in records and (final.merged.run_id or final.run_id) != run_id:
        rounds.lineage.log_metrics(run_id, {f"lm_eval/merged/{t}/{m}": v
                                            for t, ms in records["merged"]["scores"].items()
                                            for m, v in ms.items() if math.isfinite(v)})
    return records


def _open_workflow_run(wf: Workflow, lease: Lease, spec_text: str | None, report: Callable[[str], None],
                       parent_run_id: str | None) -> tuple[Lineage, str]:
    """The workflow's MLflow run, with its spec; the runs of a killed earlier driver closed."""
    lineage = Lineage.init(wf.tracking.uri, wf.experiment_name, wf.tracking.artifact_location,
                           wf.tracking.retry_seconds)
    run_id = lineage.start_run(wf.name, kind="workflow", parent=parent_run_id, tags={TAG_SPEC_HASH: wf.spec_hash(),
                                                              "mergeflow.strategy": wf.strategy,
                                                              "mergeflow.store_root": wf.store.root,
                                                              **_redacted_tag(wf),
                                                              **driver_tags()})
    report(f"workflow {wf.name!r}: MLflow run {run_id} in experiment {wf.experiment_name!r} "
           f"({redact_uri(wf.tracking.uri)})")
    lease.update(run_id=run_id)
    close_dead_attempts(lineage, wf.name, run_id, report)  # a killed driver's runs must not stay RUNNING
    lineage.log_params(run_id, wf.model_dump(mode="json", exclude={"tasks"}) | {
        "tasks": ",".join(t.name for t in wf.tasks), "spec_hash": wf.spec_hash()})
    origin = origin_of(resolve_model_path(wf.base_model))  # a packaged base: its package, file, conversion
    if origin:
        lineage.log_params(run_id, {"base_model_origin": origin})
    lineage.log_dict(run_id, wf.model_dump(mode="json"), "workflow.json")
    if spec_text:
        lineage.log_text(run_id, spec_text, "workflow.yaml")
    return lineage, run_id


def _redacted_tag(wf: Workflow) -> dict[str, str]:
    """The spec's fields that held a password or key: lineage records them masked (``pipeline.redact``), and
    ``mergeflow resume`` asks for them again."""
    lost = redacted_fields(wf.model_dump(mode="json"))
    return {TAG_REDACTED: ",".join(lost)} if lost else {}


def graph_data(wf: Workflow, results: list[RoundResult]) -> GraphData:
    """What the lineage graph shows of a finished workflow (see :mod:`pipeline.lineage_graph`)."""
    rounds = []
    for r in results:
        summary = r.summary()
        experts = {t: ev[t]["accuracy"] for t, ev in r.expert_evals.items() if t in ev}
        method = r.merge_method or (wf.merge.method if wf.strategy == "oneshot" else wf.rounds.merge.method)
        rounds.append(GraphRound(r.index, experts, method, summary["mean"]["merged"], r.registered_version))
    base_mean = next((r.summary()["mean"].get("base_probe") for r in results if r.baseline), None)
    return GraphData(wf.name, wf.strategy, wf.base_model, rounds, base_mean)


def _log_lineage_graph(lineage: Lineage, run_id: str, wf: Workflow, results: list[RoundResult],
                       report: Callable[[str], None]) -> None:
    """Draw the lineage graph and log it as ``lineage.png`` (a failed drawing never fails the run)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            png = draw_lineage(graph_data(wf, results), Path(tmp) / "lineage.png")
        except Exception as exc:  # a picture is not worth a failed workflow
            report(f"lineage graph not drawn: {type(exc).__name__}: {exc}")
            return
        lineage.log_artifact(run_id, png)


def _round_record(r: RoundResult) -> dict[str, Any]:
    return {
        "round": r.index, "run_id": r.run_id, "merged": r.merged.uri, "merged_model_id": r.merged.model_id,
        "registered_version": r.registered_version,
        "experts": {t: {"uri": e.uri, "model_id": e.model_id, "run_id": e.run_id, "reused": e.reused}
                    for t, e in r.experts.items()},
        "expert_evals": r.expert_evals, "merged_eval": r.merged_eval, "baseline": r.baseline,
    }


# "base": a linear probe of the base for classification tasks, the base as it is for causal-LM tasks
COLUMNS = {"base_probe": "base", "expert": "expert", "merged": "merged", "normalized": "normalized"}


def summary_markdown(summary: dict[str, dict[str, float]]) -> str:
    cols = [c for c in COLUMNS if c in next(iter(summary.values()))]
    lines = ["| task | " + " | ".join(COLUMNS[c] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for task, row in summary.items():
        lines.append(f"| {task} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def result_json(result: WorkflowResult) -> str:
    return json.dumps({"workflow": result.workflow, "run_id": result.run_id, "seconds": result.seconds,
                       "summary": result.summary(), "rounds": [_round_record(r) for r in result.rounds]}, indent=2)
