"""Where a round's steps run: two implementations of one small interface.

- :class:`TaskWorkers` (``rounds.workers: tasks``, and every one-shot run): each step is a Ray task (or
  an in-process call) that reads its inputs from the store and publishes its output there
  (``pipeline.steps``), so every expert and merge of every round is a checkpoint.
- :class:`ResidentWorkers` (``rounds.workers: resident``): one long-lived worker per slot keeps each of
  its tasks' model across rounds (``pipeline.resident``); experts and merges stay in memory, and only
  checkpointed rounds (every ``rounds.checkpoint_every``, and the last) are written and scored.

:class:`~pipeline.strategies.rounds.Rounds` plans, names and records every step the same way for both
(content keys, MLflow runs, reuse of finished work, the registry); a ``Workers`` only says where a step
runs and where its result lives. Nothing else branches on the kind of worker: :func:`make_workers`
picks one from the spec.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from operators.checkpoint_files import read_provenance
from pipeline import resident
from pipeline.context import ModelRef, StepContext
from pipeline.lineage import TAG_STORE_URI
from pipeline.runtime import Future, PartsHandle, Resources
from pipeline.spec import FinetuneSpec, MergeSpec, TaskSpec, Workflow
from pipeline.steps import (
    evaluate_step,
    finetune_step,
    merge_part_step,
    merge_statistics_step,
    merge_step,
    probe_step,
)
from pipeline.store import CheckpointStore


class Rounds(Protocol):
    """What workers use of the rounds that own them (``pipeline.strategies.rounds.Rounds``)."""

    ctx: StepContext
    wf: Workflow
    runtime: Any
    store: CheckpointStore
    resources: Resources
    report: Callable[[str], None]

    def intact(self, path: str, what: str, index: int) -> bool: ...

    def eval_resources(self) -> Resources: ...


class Workers(Protocol):
    """What differs between task workers and resident workers (see the module's docstring)."""

    def durable(self, index: int, last: int) -> bool:
        """Whether round ``index`` (of ``last``) is checkpointed: written to the store, scored and registered."""

    def stored(self, path: str, what: str, index: int) -> bool:
        """Whether an expert's checkpoint at ``path`` is complete in the store and can be reused."""

    def store_tags(self, uri: str) -> dict[str, str]:
        """Tags naming where a step's checkpoint is written (on the run that writes it)."""

    def restorable(self, path: str, index: int) -> bool:
        """Whether round ``index``'s merged checkpoint at ``path`` restores the whole round (a resumed run goes on
        after it without running that round's steps again)."""

    def finetune(self, task: TaskSpec, start: ModelRef, index: int, run_id: str, key: str, settings: FinetuneSpec,
                 part: str, scored: bool, cost: float) -> Future:
        """Start fine-tuning one expert (its run exists); ``scored``: also score it on its own task."""

    def merge(self, base: ModelRef, experts: dict[str, ModelRef], index: int, run_id: str, key: str,
              merge: MergeSpec, heads_from: ModelRef | None, statistics: dict[str, str] | None,
              durable: bool, recipe: dict[str, Any] | None = None) -> ModelRef:
        """Merge the experts (the merge's run exists) and wait for it (with the recipe a search chose, if any)."""

    def evaluate(self, name: str, model: ModelRef, heads: dict[str, ModelRef], run_id: str,
                 index: int) -> dict[str, Future]:
        """Start scoring ``model``'s body with each task's head in ``heads``; job name → its future."""

    def probe(self, model: ModelRef, run_id: str, index: int) -> list[Future]:
        """Start the linear probe of ``model``'s body on every task (its run exists)."""

    def close(self) -> None:
        """Give the workers' slots back."""


def step_resources(wf: Workflow) -> Resources:
    """What each fine-tuning (and scoring) step asks of the cluster."""
    r = wf.resources
    return Resources(num_cpus=r.num_cpus, num_gpus=r.num_gpus, max_retries=r.max_retries)


def expert_resources(wf: Workflow, task: TaskSpec) -> Resources:
    """What an expert's step asks of the cluster: a fine-tuning slot, or, for an expert trained by several
    workers (``resources.workers_per_expert``), nothing: the step only coordinates them, and Ray Train reserves
    each worker's slot in the expert's placement group (a coordinator holding one would starve its own workers)."""
    if wf.workers_for(task) > 1:
        return Resources(num_cpus=0, num_gpus=0, max_retries=wf.resources.max_retries)
    return step_resources(wf)


def uses_resident_workers(wf: Workflow) -> bool:
    """Whether ``wf``'s rounds run on resident workers (``rounds.workers: resident``)."""
    return wf.strategy != "oneshot" and wf.rounds.workers == "resident"


def prestart(runtime: Any, wf: Workflow) -> Any:
    """Resident workers: start the pool while the driver is still setting up (its MLflow run), so that
    each worker's process starts and imports the steps' libraries meanwhile; returned for ``Rounds``
    (None for task workers: Ray starts their processes with the cluster, and they import as they start)."""
    return runtime.resident_pool(len(wf.tasks), step_resources(wf)) if uses_resident_workers(wf) else None


def make_workers(rounds: Rounds, pool: Any = None) -> Workers:
    """The workers ``rounds``' spec asks for (``pool``: resident workers already started by :func:`prestart`)."""
    return ResidentWorkers(rounds, pool) if uses_resident_workers(rounds.wf) else TaskWorkers(rounds)


class TaskWorkers:
    """Every step a Ray task (or an in-process call) through the store: :mod:`pipeline.steps`."""

    def __init__(self, rounds: Rounds):
        self.rounds = rounds

    def durable(self, index: int, last: int) -> bool:
        return True  # every expert and merge is a checkpoint in the store

    def stored(self, path: str, what: str, index: int) -> bool:
        return self.rounds.intact(path, what, index)

    def store_tags(self, uri: str) -> dict[str, str]:
        return {TAG_STORE_URI: uri}

    def restorable(self, path: str, index: int) -> bool:
        return False  # a resumed run reuses each finished step from the store instead (its experts are there)

    def finetune(self, task: TaskSpec, start: ModelRef, index: int, run_id: str, key: str, settings: FinetuneSpec,
                 part: str, scored: bool, cost: float) -> Future:
        r = self.rounds  # (an expert is always scored on its own task where it is trained)
        return r.runtime.submit(finetune_step, r.ctx, task, start, index, run_id, key, settings, part,
                                name=f"finetune-{task.name}-r{index}", resources=expert_resources(r.wf, task))

    def merge(self, base: ModelRef, experts: dict[str, ModelRef], index: int, run_id: str, key: str,
              merge: MergeSpec, heads_from: ModelRef | None, statistics: dict[str, str] | None,
              durable: bool, recipe: dict[str, Any] | None = None) -> ModelRef:
        r = self.rounds
        resources = Resources(num_cpus=r.resources.num_cpus, max_retries=r.resources.max_retries)
        parts = self._merge_parts(base, experts, index, key, merge, resources)
        fut = r.runtime.submit(merge_step, r.ctx, base, experts, index, run_id, key, merge, heads_from, statistics,
                               recipe, parts, name=f"merge-r{index}", resources=resources)
        ref = r.runtime.result(fut)
        r.report(f"round {index}: merged {len(experts)} experts with {merge.method}")
        return ref

    def _merge_parts(self, base: ModelRef, experts: dict[str, ModelRef], index: int, key: str, merge: MergeSpec,
                     resources: Resources) -> list[dict[str, Any]] | None:
        """A merge split across ``resources.merge_workers`` workers (one placement group, packed or spread):
        each part's record, once all are in the store; None for a merge in one step."""
        r = self.rounds
        n = r.wf.resources.merge_workers
        if n == 1:
            return None
        from operators.merge import get_method

        stats = None
        if get_method(merge.method).prepare is not None:  # the whole-model pass once, not once a part
            stats = r.runtime.result(r.runtime.submit(merge_statistics_step, r.ctx, base, experts, merge,
                                                      name=f"merge-r{index}-statistics", resources=resources))
        gang = r.runtime.gang(n, resources, r.wf.resources.placement)
        try:
            futures = [gang.submit(i, merge_part_step, r.ctx, base, experts, index, key, merge, (i, n), stats,
                                   name=f"merge-r{index}-part{i}") for i in range(n)]
            parts = [r.runtime.result(f) for f in futures]
        finally:
            gang.close()
        r.report(f"round {index}: {merge.method} merged in {n} parts on {len({p.get('mergeflow.ray_node_id') for p in parts})}"
                 f" node(s), peak memory per part {max(p['peak_rss_bytes'] for p in parts) / 2**20:.0f} MiB at most")
        return parts

    def evaluate(self, name: str, model: ModelRef, heads: dict[str, ModelRef], run_id: str,
                 index: int) -> dict[str, Future]:
        r = self.rounds
        return {name: r.runtime.submit(evaluate_step, r.ctx, model, heads, run_id, index,
                                       name=f"evaluate-{name}-r{index}", resources=r.eval_resources())}

    def probe(self, model: ModelRef, run_id: str, index: int) -> list[Future]:
        r = self.rounds
        return [r.runtime.submit(probe_step, r.ctx, model, run_id, index, name=f"probe-r{index}",
                                 resources=r.eval_resources())]

    def close(self) -> None:
        pass


class ResidentWorkers:
    """One long-lived worker per slot (a Ray actor; in process, the driver): :mod:`pipeline.resident`.

    Each task is trained on one worker, fixed at its first round (the least loaded then), which keeps
    its model, tokenizer and data; a round's experts are merged in memory, every worker merging a run
    of the tensors at once; only checkpointed rounds are written to the store and scored.
    """

    def __init__(self, rounds: Rounds, pool: Any = None):
        self.rounds = rounds
        self._pool = pool  # made on first use (or by ``prestart``), given back by close()
        self._worker_of: dict[str, int] = {}  # task → the worker that trains it, every round (its model stays there)
        self._load: list[float] = []

    @property
    def pool(self):
        if self._pool is None:
            self._pool = self.rounds.runtime.resident_pool(len(self.rounds.wf.tasks), self.rounds.resources)
        if not self._load:
            self._load = [0.0] * self._pool.size
            self.rounds.report(f"{self._pool.size} resident worker(s) started; each keeps its tasks' models across "
                               "rounds")
        return self._pool

    def worker_for(self, task: str, cost: float = 0.0) -> int:
        """The worker that keeps ``task``'s model: fixed at its first round, on the least loaded worker then."""
        if task not in self._worker_of:
            w = self.least_loaded()
            self._worker_of[task] = w
            self._load[w] += cost
        return self._worker_of[task]

    def least_loaded(self) -> int:
        """The resident worker with the least work given so far (the first of equals)."""
        return min(range(self.pool.size), key=lambda i: (self._load[i], i))

    def durable(self, index: int, last: int) -> bool:
        every = self.rounds.wf.rounds.checkpoint_every
        return index == last or (index + 1) % every == 0

    def stored(self, path: str, what: str, index: int) -> bool:
        return False  # a round's experts live in memory, never in the store

    def store_tags(self, uri: str) -> dict[str, str]:
        return {}  # (what a checkpointed round writes is named by its LoggedModel)

    def restorable(self, path: str, index: int) -> bool:
        # complete and intact, and written by resident workers: its provenance keeps its experts' scores (the
        # same merge written by task workers is reused by the merge step instead, its experts being in the store)
        return (self.rounds.intact(path, "merged model", index)
                and read_provenance(self.rounds.store.materialize(path)).get("workers") == "resident")

    def finetune(self, task: TaskSpec, start: ModelRef, index: int, run_id: str, key: str, settings: FinetuneSpec,
                 part: str, scored: bool, cost: float) -> Future:
        r = self.rounds
        return self.pool.submit(self.worker_for(task.name, cost), resident.finetune_step, r.ctx, task, start, index,
                                run_id, key, settings, part, scored, name=f"finetune-{task.name}-r{index}")

    def merge(self, base: ModelRef, experts: dict[str, ModelRef], index: int, run_id: str, key: str,
              merge: MergeSpec, heads_from: ModelRef | None, statistics: dict[str, str] | None,
              durable: bool, recipe: dict[str, Any] | None = None) -> ModelRef:
        from operators.merge.registry import get_method

        r = self.rounds
        # every worker merges a run of the tensors at once (methods that merge each tensor on its own); the
        # first also the heads, and writes a checkpointed round whole
        n = self.pool.size if get_method(merge.method).prepare is None else 1
        parts = [self.pool.submit(i, resident.merge_part, r.ctx, base, experts, merge, heads_from, (i, n),
                                  name=f"merge-r{index}-part{i}") for i in range(1, n)]
        fut = self.pool.submit(0, resident.merge_step, r.ctx, base, experts, index, run_id, key, merge, heads_from,
                               durable, [p.state for p in parts], name=f"merge-r{index}")
        ref = r.runtime.result(fut)
        for p in parts:
            r.runtime.result(p)
        ref.state = PartsHandle([fut.state, *(p.state for p in parts)]) if parts else fut.state
        for e in experts.values():  # merged: their weights are read by nothing more (their runs keep their record)
            e.state = None
        r.report(f"round {index}: merged {len(experts)} experts with {merge.method} in memory"
                 + (f" (checkpoint {ref.uri})" if durable else ""))
        return ref

    def evaluate(self, name: str, model: ModelRef, heads: dict[str, ModelRef], run_id: str,
                 index: int) -> dict[str, Future]:
        # each task's score where its model is kept: the merged weights go to its worker
        if name != "merged":
            raise ValueError("resident rounds score each expert on its own task where it is trained (scored=True)")
        r = self.rounds
        return {f"merged@{task}": self.pool.submit(self.worker_for(task), resident.evaluate_step, r.ctx, model,
                                                   r.wf.task(task), run_id, index,
                                                   name=f"evaluate-merged-{task}-r{index}")
                for task in heads}

    def probe(self, model: ModelRef, run_id: str, index: int) -> list[Future]:
        # the resident workers hold every slot: each probes its own tasks, after its experts
        r = self.rounds
        mine: dict[int, list[str]] = {}
        spare = iter(range(len(r.wf.tasks)))  # a task no worker keeps yet (ColD Fusion): spread, not placed
        for task in r.wf.tasks:
            w = self._worker_of.get(task.name)
            mine.setdefault(w if w is not None else next(spare) % self.pool.size, []).append(task.name)
        return [self.pool.submit(w, probe_step, r.ctx, model, run_id, index, tasks if len(mine) > 1 else None,
                                 name=f"probe-r{index}-{w}") for w, tasks in sorted(mine.items())]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
