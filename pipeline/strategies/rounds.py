"""The building blocks every strategy loops over: fine-tune experts, merge, evaluate, register.

A strategy (one-shot, ATM, ColD Fusion) is a short loop over these calls. Each call submits steps
through the runtime (Ray or in-process), skips work whose checkpoint is already complete in the
store (so a stopped workflow resumes and a repeated run does not train twice), and creates the
MLflow runs its steps log into.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline.context import (
    ModelRef,
    StepContext,
    expert_key,
    expert_path,
    merged_key,
    merged_path,
    ref_from_store,
    task_data,
)
from pipeline.lineage import TAG_ROUND, TAG_STORE_URI, TAG_TASK, Lineage
from pipeline.runtime import Resources
from pipeline.spec import MergeSpec, TaskSpec, Workflow
from pipeline.store import CheckpointStore, CorruptCheckpoint
from pipeline.strategies.recipe import search_recipe
from pipeline.strategies.workers import make_workers, step_resources

Reporter = Callable[[str], None]


def ended_status(exc: BaseException) -> str:
    """How a run ends on ``exc``: KILLED when the process was told to stop (Ctrl-C, SIGTERM from
    ``mergeflow stop``, which Ray's driver turns into SystemExit), FAILED otherwise."""
    return "KILLED" if isinstance(exc, KeyboardInterrupt | SystemExit) else "FAILED"


@contextlib.contextmanager
def ending_on_failure(lineage: Lineage, *run_ids: str) -> Iterator[None]:
    """Runs a step logs into, ended KILLED or FAILED (:func:`ended_status`) when the step does not finish."""
    try:
        yield
    except BaseException as exc:
        for run_id in run_ids:
            lineage.end_run(run_id, ended_status(exc))
        raise


@dataclass
class RoundResult:
    """What one round produced and how it scored."""

    index: int
    run_id: str
    experts: dict[str, ModelRef]
    merged: ModelRef
    expert_evals: dict[str, dict[str, dict[str, float]]]  # expert -> task -> metrics
    merged_eval: dict[str, dict[str, float]]  # task -> metrics
    baseline: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> metrics
    registered_version: str | None = None
    merged_probe: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> linear probe of the merged body
    budget: float = 1.0  # cumulative fraction of each task's fine-tuning budget spent by this round's end
    reference: dict[str, float] = field(default_factory=dict)  # task -> expert accuracy used for normalising
    merge_method: str = ""  # when the round merged with another method than its strategy's usual one

    def summary(self) -> dict[str, dict[str, float]]:
        """Per task: base (linear probe), expert (own task), merged, normalised (merged / expert).

        The expert column is this round's expert of the task, or ``reference`` for tasks without one
        (ColD Fusion's non-contributors: their latest expert).
        """
        rows: dict[str, dict[str, float]] = {}
        for task, merged in self.merged_eval.items():
            if task in self.expert_evals:
                expert_acc = self.expert_evals[task][task]["accuracy"]
            else:
                expert_acc = self.reference[task]
            row = {"expert": expert_acc, "merged": merged["accuracy"],
                   "normalized": merged["accuracy"] / expert_acc if expert_acc > 0 else float("nan")}
            if task in self.baseline:
                row = {"base_probe": self.baseline[task]["accuracy"], **row}
            if task in self.merged_probe:
                row["merged_probe"] = self.merged_probe[task]["accuracy"]
            rows[task] = row
        keys = next(iter(rows.values())).keys() if rows else []
        rows["mean"] = {k: sum(r[k] for r in rows.values()) / len(rows) for k in keys}
        return rows


def own_scores(expert: ModelRef, task: str) -> dict[str, dict[str, float]] | None:
    """An expert's scores on its own task as its fine-tuning step measured them (``eval/<task>/<metric>``
    in its metrics, kept in its provenance), or ``None`` when it has none (made by an older mergeflow)."""
    prefix = f"eval/{task}/"
    own = {k[len(prefix):]: v for k, v in expert.metrics.items() if k.startswith(prefix)}
    return {task: own} if "accuracy" in own else None


@dataclass
class PendingExperts:
    """Experts being fine-tuned (``Rounds.submit_experts``): reused ones already here, the rest in flight."""

    index: int
    round_run: str
    experts: dict[str, ModelRef] = field(default_factory=dict)
    run_ids: dict[str, str] = field(default_factory=dict)
    futures: list = field(default_factory=list)


@dataclass
class PendingEvaluation:
    """Scores being computed (``Rounds.submit_evaluation``): one evaluation step per model, in flight."""

    index: int
    known: dict[str, dict[str, dict[str, float]]]  # expert → its own task's scores, from its fine-tuning step
    experts: list[str]
    merged_run: str | None  # the merge's run: left open for record()
    runs: dict[str, str] = field(default_factory=dict)  # model → the run its scores are logged into
    jobs: dict[str, Any] = field(default_factory=dict)  # model → its evaluation step


class Rounds:
    """Submit the steps of a round and record them; shared by every strategy."""

    def __init__(self, ctx: StepContext, runtime: Any, lineage: Lineage, store: CheckpointStore, report: Reporter,
                 pool: Any = None):
        self.ctx = ctx
        self.wf: Workflow = ctx.workflow
        self.runtime = runtime
        self.lineage = lineage
        self.store = store
        self.report = report
        self.resources = step_resources(self.wf)
        # where the steps run (task or resident workers; ``pool``: resident workers already started)
        self.workers = make_workers(self, pool)

    def close(self) -> None:
        """Give the workers' slots back (resident workers)."""
        self.workers.close()

    def durable(self, index: int, last: int) -> bool:
        """Whether round ``index`` is checkpointed: written to the store, scored and registered. Always with
        task workers; with resident workers every ``rounds.checkpoint_every`` rounds, and the last."""
        return self.workers.durable(index, last)

    def end_unscored(self, index: int, round_run: str, merged: ModelRef) -> None:
        """Close a round kept in memory (between checkpoints): its experts' and merge's runs hold its record."""
        if merged.run_id:
            self.lineage.end_run(merged.run_id)
        self.lineage.set_tags(round_run, {"mergeflow.checkpointed": "false"})
        self.lineage.end_run(round_run)

    # --- runs -----------------------------------------------------------------------------------
    def start_round(self, index: int) -> str:
        run_id = self.lineage.start_run(f"round-{index}", kind="round", parent=self.ctx.workflow_run_id,
                                        workflow_run=self.ctx.workflow_run_id, tags={TAG_ROUND: str(index)})
        self.report(f"round {index}: started (MLflow run {run_id})")
        return run_id

    def _child(self, name: str, kind: str, round_run: str, index: int, tags: dict[str, str] | None = None) -> str:
        return self.lineage.start_run(name, kind=kind, parent=round_run, workflow_run=self.ctx.workflow_run_id,
                                      tags={TAG_ROUND: str(index), **(tags or {})})

    def intact(self, path: str, what: str, index: int) -> bool:
        """Whether a complete checkpoint is at ``path`` whose files match the checksums taken when it
        was published. A corrupt one is reported, removed, and counts as absent: it is made again,
        never reused or merged.
        """
        if not self.store.is_complete(path):
            return False
        try:
            self.store.verify(path)
        except CorruptCheckpoint as exc:
            self.report(f"round {index}: {what} in the store is CORRUPT ({exc.reason}): {exc.uri} was changed after "
                        "it was published; discarded, making it again")
            self.store.discard(path)
            return False
        return True

    # --- fine-tuning ----------------------------------------------------------------------------
    def finetune(self, start: ModelRef, tasks: list[TaskSpec], index: int, round_run: str,
                 per_round: bool = False, part: str = "all") -> dict[str, ModelRef]:
        """Fine-tune one expert per task from ``start`` in parallel; reuse complete ones.

        ``per_round``: use one round's budget (``Workflow.round_finetune_for``) instead of the whole one.
        ``part``: which training rows (``all``, or ``fit`` / ``validation`` with a held-out slice).
        """
        return self.collect_experts(self.submit_experts(start, tasks, index, round_run, per_round, part))

    def expert_plan(self, start: ModelRef, task: TaskSpec, index: int, per_round: bool, part: str):
        """An expert's settings, its content key and its cost (tokens to train: steps × batch × length)."""
        from operators.finetune import total_steps

        settings = self.wf.round_finetune_for(task, index) if per_round else self.wf.finetune_for(task)
        data = task_data(task, part, self.wf.held_out_fraction, task.dataset.split_seed)
        cost = total_steps(len(data.train), settings) * settings.batch_size * settings.max_length
        r = self.wf.resources
        return settings, expert_key(start, task, settings, data.digest, self.wf.workers_for(task), r.strategy), cost

    def submit_experts(self, start: ModelRef, tasks: list[TaskSpec], index: int, round_run: str,
                       per_round: bool = False, part: str = "all", scored: bool = True) -> PendingExperts:
        """Start fine-tuning (as :meth:`finetune`) without waiting; collect with :meth:`collect_experts`.

        Experts are submitted longest first (by tokens to train: steps × batch × length), so the
        slots are packed like LPT scheduling and the longest expert never starts last, alone.
        With resident workers a round's experts stay in memory (``scored``: scored where they are trained).
        """
        pending = PendingExperts(index, round_run)
        todo = []
        for task in tasks:
            settings, key, cost = self.expert_plan(start, task, index, per_round, part)
            path = expert_path(self.store, self.wf, index, task.name, key)
            if self.workers.stored(path, f"expert {task.name!r}", index):
                pending.experts[task.name] = ref_from_store(self.store, path, "expert", task.name, key)
                self.report(f"round {index}: expert {task.name!r} already in the store, reused ({self.store.uri(path)})")
                continue
            todo.append((cost, task, settings, key, path))
        for cost, task, settings, key, path in sorted(todo, key=lambda t: -t[0]):  # stable: ties keep spec order
            run_id = self._child(f"expert:{task.name}", "expert", round_run, index,
                                 {TAG_TASK: task.name, **self.workers.store_tags(self.store.uri(path))})
            pending.run_ids[task.name] = run_id
            pending.futures.append(self.workers.finetune(task, start, index, run_id, key, settings, part, scored, cost))
        return pending

    def collect_experts(self, pending: PendingExperts) -> dict[str, ModelRef]:
        """Wait for the experts of :meth:`submit_experts`; ends their runs as they finish."""
        index, experts = pending.index, pending.experts
        try:
            for fut, ref in self.runtime.as_completed(pending.futures):
                ref.state = fut.state  # a resident expert's weights, in memory (None: in the store)
                experts[ref.name] = ref
                self.lineage.end_run(ref.run_id)
                self.report(f"round {index}: expert {ref.name!r} finished "
                            f"(loss {ref.metrics['train_final_loss']:.4f}, {ref.metrics['train_seconds']:.1f}s)")
        except BaseException as exc:
            for task, run_id in pending.run_ids.items():
                if task not in experts:
                    self.lineage.end_run(run_id, ended_status(exc))
            raise
        if any(e.reused for e in experts.values()):
            self.lineage.set_tags(pending.round_run, {
                "mergeflow.reused_experts": ",".join(sorted(t for t, e in experts.items() if e.reused))})
        return dict(experts)

    # --- merging --------------------------------------------------------------------------------
    def merge(self, base: ModelRef, experts: dict[str, ModelRef], index: int, round_run: str,
              merge: MergeSpec | None = None, heads_from: ModelRef | None = None, durable: bool = True) -> ModelRef:
        """Merge the experts into one model (skipped when the same merge is already stored).

        ``merge`` defaults to the workflow's; ``heads_from`` keeps that model's heads for tasks no
        expert brings. Experts held in memory (resident workers) are merged in memory, on a worker;
        ``durable``: the merge is also written to the store (a checkpointed round).
        """
        merge = merge or self.wf.merge
        key = merged_key(base, experts, merge, heads_from)
        path = merged_path(self.store, self.wf, index, key, merge.method)
        if durable and self.intact(path, "merged model", index):  # (a round between checkpoints is in memory only)
            self.report(f"round {index}: merged model already in the store, reused ({self.store.uri(path)})")
            return ref_from_store(self.store, path, "merged", f"{self.wf.name}-merged", key)
        statistics = self.statistics(experts, merge, index)
        run_id = self._child(f"merge:{merge.method}", "merge", round_run, index,
                             {**self.workers.store_tags(self.store.uri(path)), "mergeflow.method": merge.method})
        with ending_on_failure(self.lineage, run_id):
            recipe = search_recipe(self, base, experts, merge, index, run_id) if merge.recipe is not None else None
            return self.workers.merge(base, experts, index, run_id, key, merge, heads_from, statistics, durable,
                                      recipe)

    def statistics(self, experts: dict[str, ModelRef], merge: MergeSpec, index: int) -> dict[str, str] | None:
        """The statistics a data-driven method needs, one Ray task per expert (reused when stored).

        Returns task → store path, or None for methods that need none.
        """
        from operators.merge import get_method
        from operators.merge.statistics import DEFAULT_EXAMPLES
        from pipeline.learned import statistics_key, statistics_path, statistics_step

        kind = get_method(merge.method).statistics
        if kind is None:
            return None
        examples = int(merge.params.get("examples", DEFAULT_EXAMPLES))
        paths, futures = {}, []
        for task, expert in sorted(experts.items()):
            seed = self.wf.finetune_for(self.wf.task(task)).seed
            path = statistics_path(self.store, self.wf.name, index, task, kind,
                                   statistics_key(expert, kind, examples, seed))
            paths[task] = path
            if self.intact(path, f"{kind} statistics of {task!r}", index):
                self.report(f"round {index}: {kind} statistics of {task!r} already in the store, reused")
                continue
            futures.append(self.runtime.submit(statistics_step, self.ctx, self.wf.task(task), expert, kind, examples,
                                               seed, index, path, name=f"statistics-{task}-r{index}",
                                               resources=self.resources))
        for _fut, res in self.runtime.as_completed(futures):
            self.report(f"round {index}: {kind} statistics of {res['task']!r} in {res['seconds']:.1f}s "
                        f"({res['fraction_of_finetune']:.0%} of its fine-tune)")
        return paths

    # --- evaluation -----------------------------------------------------------------------------
    def evaluate(self, merged: ModelRef, experts: dict[str, ModelRef], index: int, round_run: str,
                 cross_task: bool = True, merged_tasks: list[str] | None = None,
                 ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, dict[str, float]]]]:
        """Score the merged model and every expert, in parallel.

        With ``cross_task``, experts are also scored on other tasks with those tasks' heads: the
        cross-task matrix shows how much each expert's body change helps or hurts the others
        (iterated strategies skip it: each expert on its own task). ``merged_tasks`` limits the
        merged model's evaluation to tasks it has heads for. Metrics go to the run that made the
        model; a model reused from an earlier run gets a new ``evaluate:<name>`` run.

        Returns:
            The merged model's scores (task → metrics) and each expert's (expert → task → metrics).
        """
        return self.collect_evaluation(self.submit_evaluation(merged, experts, index, round_run, cross_task,
                                                              merged_tasks))

    def submit_evaluation(self, merged: ModelRef, experts: dict[str, ModelRef], index: int, round_run: str,
                          cross_task: bool = True, merged_tasks: list[str] | None = None) -> PendingEvaluation:
        """Start scoring (as :meth:`evaluate`) without waiting; collect with :meth:`collect_evaluation`.

        Iterated strategies score a round while the next one trains: nothing the next round does
        depends on this round's scores (unless ``rounds.patience`` must decide whether there is one).
        """
        # an expert's own task was scored by its fine-tuning step where the model was (``own_scores``): no
        # second load, no second pass; only the other tasks' heads (``cross_task``) need an evaluation step
        known = {name: own for name, e in experts.items() if (own := own_scores(e, name))}
        tasks = merged_tasks if merged_tasks is not None else [t.name for t in self.wf.tasks]
        work: dict[str, tuple[ModelRef, dict[str, ModelRef]]] = {"merged": (merged, {t: merged for t in tasks})}
        for name, expert in experts.items():
            heads = {t: e for t, e in experts.items() if cross_task or t == name}
            if name in known:
                heads.pop(name)
            if heads:
                work[name] = (expert, heads)
        pending = PendingEvaluation(index, known, list(experts), merged.run_id)
        for name, (model, heads) in work.items():
            run = model.run_id if (model.run_id and not model.reused) else self._child(
                f"evaluate:{name}", "evaluation", round_run, index)
            pending.runs[name] = run
            pending.jobs |= self.workers.evaluate(name, model, heads, run, index)
        return pending

    def collect_evaluation(self, pending: PendingEvaluation
                           ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, dict[str, float]]]]:
        """Wait for the scores of :meth:`submit_evaluation`; ends the evaluation runs (not the merge's)."""
        with ending_on_failure(self.lineage, *pending.runs.values()):
            results = {name: self.runtime.result(fut) for name, fut in pending.jobs.items()}
        # the merge run stays open: record() adds the normalised scores, then closes it
        for run in set(pending.runs.values()) - {pending.merged_run}:
            self.lineage.end_run(run)
        merged_eval: dict[str, dict[str, float]] = {}
        for name in [n for n in results if n.split("@")[0] == "merged"]:  # resident: one job per task
            merged_eval |= results.pop(name)
        scores = {name: {**pending.known.get(name, {}), **results.get(name, {})} for name in pending.experts}
        return merged_eval, {name: {t: s[t] for t in pending.experts if t in s} for name, s in scores.items()}

    def eval_resources(self) -> Resources:
        """What an evaluation step asks of the cluster: the workflow's resources per step, as a fine-tune."""
        return self.resources

    def submit_probe(self, base: ModelRef, index: int, round_run: str, name: str = "baseline:linear-probe"):
        """Start a linear probe of ``base``'s body (returns a future; collect with ``probe_result``)."""
        run_id = self._child(name, "baseline", round_run, index)
        return run_id, self.workers.probe(base, run_id, index), index

    def probe_result(self, handle) -> dict[str, dict[str, float]]:
        """Wait for a probe of :meth:`submit_probe`; task → metrics. Logs its cost and ends its run."""
        run_id, futs, index = handle
        with ending_on_failure(self.lineage, run_id):
            res = {}
            for fut in futs:
                res |= self.runtime.result(fut)
            res = {t.name: res[t.name] for t in self.wf.tasks}
            # the baseline's cost: each task's measuring time (a task reused from the store has none)
            logged = self.lineage.run_metrics(run_id)
            seconds = [v for k, v in logged.items() if k.startswith("probe/") and k.endswith("/seconds")]
            if seconds:
                self.lineage.log_metrics(run_id, {"probe_seconds": sum(seconds)}, step=index)
        self.lineage.end_run(run_id)
        return res

    # --- recording ------------------------------------------------------------------------------
    def record(self, result: RoundResult, strategy: str, move_alias: bool = True) -> None:
        """Log the round's summary with step=round, register the merged model, close the round run.

        ``move_alias``: point the registry alias at this round's version (strategies pass whether
        the round is the best so far on the mean held-out accuracy).
        """
        summary = result.summary()
        metrics: dict[str, float] = {}
        for task, row in summary.items():
            for col, value in row.items():
                metrics[f"{task}/{col}_accuracy" if col != "normalized" else f"{task}/normalized_accuracy"] = value
        metrics["budget_epochs_fraction"] = result.budget
        self.lineage.log_metrics(result.run_id, metrics, step=result.index)
        self.lineage.log_metrics(self.ctx.workflow_run_id, metrics, step=result.index)
        if result.merged.run_id and not result.merged.reused:
            self.lineage.log_metrics(result.merged.run_id, {
                f"eval/{t}/normalized_accuracy": row["normalized"] for t, row in summary.items() if t != "mean"
            } | {"eval/mean/accuracy": summary["mean"]["merged"],
                 "eval/mean/normalized_accuracy": summary["mean"]["normalized"]}, step=result.index)
            self.lineage.end_run(result.merged.run_id)
        result.registered_version = self.register(result, strategy, summary, move_alias)
        self.lineage.end_run(result.run_id)

    def register(self, result: RoundResult, strategy: str, summary: dict[str, dict[str, float]],
                 move_alias: bool = True) -> str | None:
        merged = result.merged
        if not merged.model_id:
            return None
        name = self.wf.registered_model_name
        # the same merge (same content key, so same store URI) rebuilt after corruption keeps its version
        existing = self.lineage.find_version(name, merged.model_id) or self.lineage.find_version_by_tag(
            name, TAG_STORE_URI, merged.uri)
        if existing:
            self.report(f"round {result.index}: merged model already registered as {name} v{existing}")
            if move_alias:
                self.lineage.set_alias(name, self.wf.tracking.alias, existing)
            return existing
        # registered from the LoggedModel (models:/<model_id>); without uploaded artifacts, from the store
        source = None if self.wf.tracking.log_model_artifacts else merged.uri
        version = self.lineage.register(
            name, model_id=merged.model_id, source=source, run_id=merged.run_id or result.run_id,
            alias=self.wf.tracking.alias if move_alias else None,
            tags={"mergeflow.round": str(result.index), "mergeflow.strategy": strategy,
                  "mergeflow.method": result.merge_method or self.merge_spec(strategy).method,
                  "mergeflow.store_uri": merged.uri,
                  "mergeflow.experts": ",".join(sorted(result.experts)),
                  "mean_accuracy": f"{summary['mean']['merged']:.4f}",
                  "mean_normalized_accuracy": f"{summary['mean']['normalized']:.4f}"},
            description=f"{strategy} round {result.index}: {result.merge_method or self.merge_spec(strategy).method} of "
                        f"{', '.join(sorted(result.experts))}",
        )
        moved = f" (alias '{self.wf.tracking.alias}')" if move_alias else " (alias stays on a better round)"
        self.report(f"round {result.index}: registered {name} v{version}{moved}")
        return version

    def merge_spec(self, strategy: str) -> MergeSpec:
        """The merge a strategy uses: the workflow's for one-shot, ``rounds.merge`` for iterated ones."""
        return self.wf.merge if strategy == "oneshot" else self.wf.rounds.merge
