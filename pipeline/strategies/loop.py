"""The round loop of iterated strategies: everything around a paper's loop, once.

ATM and ColD Fusion are loops of the same shape (train experts from the round's start, merge them, score
the merge). :class:`RoundLoop` gives them those three calls and keeps the plumbing out of their sight:

- rounds: each round has its MLflow run; a checkpointed round (always, with task workers; with resident
  workers every ``rounds.checkpoint_every`` rounds and the last) is written, scored and registered, and
  the rounds between are trained and merged in memory and closed unscored;
- the baseline: the base's linear probe, submitted in the first scored round after its experts (they go
  first), and carried by every later round;
- a round is scored while the next one trains (nothing the next round does depends on its scores) and
  recorded in order: its summary, its registry version, the alias moved when it is the best so far;
  with ``patience``, each round is scored before the next starts, and the loop stops after that many
  rounds without improvement;
- each task's latest expert score, by which a round without that task's expert is normalised;
- restore: rounds a killed run checkpointed are taken from the store, not run again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from operators.checkpoint_files import read_provenance
from pipeline.context import ModelRef
from pipeline.spec import TaskSpec
from pipeline.strategies.rounds import PendingEvaluation, RoundResult, Rounds, own_scores


@dataclass
class _Round:
    """The round in progress: what its later calls need."""

    index: int
    run_id: str
    scored: bool  # checkpointed: written to the store, scored and registered
    start: ModelRef  # the model its experts started from
    base_probe: tuple | None  # the baseline's probe when this round submitted it


class RoundLoop:
    """The rounds of one iterated strategy (see the module's docstring).

    Args:
        rounds: Submits and records the steps.
        base: The workflow's base model (its linear probe is every round's baseline).
        strategy: How the rounds are recorded and registered (``atm``, ``cold_fusion``).
        patience: Stop after this many scored rounds without a better mean held-out accuracy (None: never).
        every_expert_scored: Score every expert on its own task, also in rounds between checkpoints
            (ColD Fusion: a later round's non-contributors are normalised by their latest expert).
    """

    def __init__(self, rounds: Rounds, base: ModelRef, strategy: str, *, patience: int | None = None,
                 every_expert_scored: bool = False):
        self.steps = rounds
        self.wf = rounds.wf
        self.base = base
        self.strategy = strategy
        self.patience = patience
        self.every_expert_scored = every_expert_scored
        self.results: list[RoundResult] = []
        self.best, self.since_best = float("-inf"), 0
        self.latest: dict[str, float] = {}  # task → own-task accuracy of its latest expert
        self.stopped = False  # patience ran out
        self.last = 0
        self._round: _Round | None = None
        self._base_probe_due = True  # the baseline is probed once, in the first scored round
        self._pending: Callable[[], None] | None = None  # the previous round's record, once its scores are in

    # --- the three calls of a round --------------------------------------------------------------
    def rounds(self, first: int, last: int) -> Iterator[int]:
        """The round indices ``first..last``, until patience stops the loop."""
        self.last = last
        for k in range(first, last + 1):
            if self.stopped:
                return
            yield k

    def train(self, start: ModelRef, tasks: list[TaskSpec], index: int, part: str = "all",
              note: str | None = None) -> dict[str, ModelRef]:
        """Start round ``index`` and fine-tune one expert per task from ``start`` with one round's budget.

        ``part``: which training rows (``all``, or ``fit`` / ``validation`` with a held-out slice); ``note``
        is reported once the round has started. The previous round is recorded meanwhile.
        """
        steps = self.steps
        scored = steps.durable(index, self.last)
        run_id = steps.start_round(index)
        if note:
            steps.report(f"round {index}: {note}")
        pending = steps.submit_experts(start, tasks, index, run_id, per_round=True, part=part,
                                       scored=scored or self.every_expert_scored)
        probe = None
        if self._base_probe_due and scored:  # after the experts: they go first
            probe, self._base_probe_due = steps.submit_probe(self.base, index, run_id), False
        self._record_pending()
        experts = steps.collect_experts(pending)
        self.latest.update({t: e.metrics["own_accuracy"] for t, e in experts.items() if "own_accuracy" in e.metrics})
        self._round = _Round(index, run_id, scored, start, probe)
        return experts

    def merge(self, base: ModelRef, experts: dict[str, ModelRef], heads_from: ModelRef) -> ModelRef:
        """Merge the round's experts (task vectors from ``base``) with ``rounds.merge``; the merged model keeps
        ``heads_from``'s heads for tasks no expert brings."""
        r = self._round
        merged = self.steps.merge(base, experts, r.index, r.run_id, merge=self.wf.rounds.merge, heads_from=heads_from,
                                  durable=r.scored)
        r.start.state = None  # the round's start weights are read by nothing more: let the object store free them
        return merged

    def score(self, experts: dict[str, ModelRef], merged: ModelRef, budget: float,
              tasks: list[str] | None = None, probe_merged: bool = False) -> None:
        """Score the round's merged model on ``tasks`` (default: all), and with ``probe_merged`` also its body by
        a linear probe; the round is recorded once scored (``budget``: the share of each task's fine-tuning
        budget spent by its end). A round between checkpoints is closed unscored."""
        r = self._round
        if not r.scored:
            self.steps.end_unscored(r.index, r.run_id, merged)
            return
        probe = self.steps.submit_probe(merged, r.index, r.run_id, name="evaluate:shared-linear-probe") \
            if probe_merged else None
        scoring = self.steps.submit_evaluation(merged, experts, r.index, r.run_id, cross_task=False, merged_tasks=tasks)
        self._pending = functools.partial(self._record, r, experts, merged, scoring, budget, probe)
        if self.patience is not None:  # the score decides whether there is a next round: wait for it
            self._record_pending()

    def finish(self) -> list[RoundResult]:
        """Record the last round once scored; every round's result."""
        self._record_pending()
        return self.results

    # --- recording -------------------------------------------------------------------------------
    def first_round(self, result: RoundResult) -> ModelRef:
        """Start from an already recorded round (ATM on validation data: the one-shot merge); its merged model."""
        self.results.append(result)
        self.best = result.summary()["mean"]["merged"]
        self._base_probe_due = False
        return result.merged

    def _record_pending(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending()

    def _record(self, r: _Round, experts: dict[str, ModelRef], merged: ModelRef, scoring: PendingEvaluation,
                budget: float, probe: tuple | None) -> None:
        """Record round ``r`` once scored: its result, its registry version and alias; patience."""
        steps = self.steps
        merged_eval, expert_evals = steps.collect_evaluation(scoring)
        if not expert_evals:  # a restored checkpoint: its experts' scores, as its provenance recorded them
            expert_evals = {t: own_scores(e, t) for t, e in experts.items()}
        self.latest.update({t: ev[t]["accuracy"] for t, ev in expert_evals.items()})
        result = RoundResult(r.index, r.run_id, experts, merged, expert_evals, merged_eval,
                             baseline=steps.probe_result(r.base_probe) if r.base_probe else self.results[0].baseline,
                             merged_probe=steps.probe_result(probe) if probe else {}, budget=budget,
                             reference=dict(self.latest))
        score = result.summary()["mean"]["merged"]
        improved = score > self.best
        steps.record(result, strategy=self.strategy, move_alias=improved)
        self.results.append(result)
        self.best, self.since_best = (score, 0) if improved else (self.best, self.since_best + 1)
        steps.report(f"round {r.index}: mean held-out accuracy {score:.3f} (best {self.best:.3f})")
        if self.patience is not None and self.since_best >= self.patience:
            steps.report(f"round {r.index}: no improvement for {self.since_best} rounds; stopping early (patience)")
            self.stopped = True

    # --- restore ---------------------------------------------------------------------------------
    def restore(self, found: list[tuple[ModelRef, int]], start: ModelRef, first: int,
                budget: Callable[[int], float]) -> tuple[ModelRef, int]:
        """Resume after the last of the checkpointed rounds ``found`` in the store (each with the round after
        it, as the strategy's key chain finds them; rounds by resident workers): the earlier ones' recorded
        scores count for the best score and patience, the last is scored and recorded again, and the rounds
        up to it are not run again. Returns the model and the round to go on from (``start`` and ``first``
        when nothing was found)."""
        for earlier, _next in found[:-1]:
            score = self._recorded_score(earlier)
            if score is not None:
                self.best, self.since_best = (score, 0) if score > self.best else (self.best, self.since_best + 1)
        if not found:
            return start, first
        current, following = found[-1]
        k = following - 1
        run_id = self.steps.start_round(k)
        self.steps.report(f"round {k}: restored from its checkpoint {current.uri}; rounds {first}..{k} are not run "
                          "again")
        scoring = self.steps.submit_evaluation(current, {}, k, run_id, cross_task=False)
        probe = self.steps.submit_probe(self.base, k, run_id)
        self._base_probe_due = False
        self._record(_Round(k, run_id, True, current, probe), self._restored_experts(current), current, scoring,
                     budget(k), None)
        return current, following

    def _recorded_score(self, merged: ModelRef) -> float | None:
        """The mean held-out accuracy a checkpointed round's merge run recorded (None: never scored)."""
        if not merged.run_id:
            return None
        try:
            return self.steps.lineage.run_metrics(merged.run_id).get("eval/mean/accuracy")
        except Exception:  # the run is gone (another tracking server): the round counts as unscored
            return None

    def _restored_experts(self, merged: ModelRef) -> dict[str, ModelRef]:
        """The experts a restored checkpoint was merged from, with their own-task scores, from its provenance."""
        prov = read_provenance(self.steps.store.materialize(merged.path))
        return {p["task"]: ModelRef("expert", p["task"], "", p["uri"], p["key"], p.get("run_id"), reused=True,
                                    metrics=p.get("metrics", {}))
                for p in prov.get("parents", []) if p.get("kind") == "expert"}
