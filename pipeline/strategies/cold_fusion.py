"""ColD Fusion (Don-Yehiya et al., ACL 2023, arXiv 2212.01378).

    shared⁽⁰⁾ = base
    for k in 1..R:
        C⁽ᵏ⁾ = sample contributors (rounds.contributors: a count or a fraction; seeded;
               optionally in proportion to training-set size)
        θ_c = finetune(shared⁽ᵏ⁻¹⁾, task c, one round's budget)    for c in C⁽ᵏ⁾, in parallel
        shared⁽ᵏ⁾ = fuse(θ_c)                                      the uniform average by default
        evaluate shared⁽ᵏ⁾: with each task's latest head, and as a starting point (linear probe)

Heads are per task and never fused: the shared model keeps every task's latest head (a task that
did not contribute this round keeps the head from shared⁽ᵏ⁻¹⁾). The starting-point evaluation is
the linear probe of the shared body (the paper's "ColD-Frozen"), set against the same probe of the
base.
"""

from __future__ import annotations

import functools
import random

from pipeline.spec import TaskSpec
from pipeline.steps import ModelRef, task_data
from pipeline.strategies.rounds import RoundResult, Rounds


def sample_contributors(tasks: list[TaskSpec], round_index: int, count: float | None, seed: int,
                        weight_by_size: bool) -> list[TaskSpec]:
    """The round's contributors: reproducible from (seed, round); all tasks when ``count`` is None."""
    if count is None:
        return list(tasks)
    n = int(count) if count >= 1 else max(1, round(count * len(tasks)))
    n = min(n, len(tasks))
    rng = random.Random(f"{seed}/{round_index}")
    pool = list(tasks)
    chosen: list[TaskSpec] = []
    while len(chosen) < n:
        weights = [len(task_data(t).train) if weight_by_size else 1.0 for t in pool]
        pick = rng.choices(range(len(pool)), weights=weights)[0]
        chosen.append(pool.pop(pick))
    return sorted(chosen, key=lambda t: t.name)


def run(rounds: Rounds, base: ModelRef) -> list[RoundResult]:
    """Run ColD Fusion for ``rounds.count`` rounds; returns every round.

    Round k is scored (heads and linear probe) while round k+1 trains: the next round starts from
    the fused model, not from its scores. Rounds are recorded in order.
    """
    wf, spec = rounds.wf, rounds.wf.rounds
    shared, results = base, []
    latest_expert: dict[str, float] = {}  # task -> own-task accuracy of its latest expert
    with_heads: set[str] = set()  # tasks whose head the shared model carries (every contributor so far)
    best, spent = float("-inf"), 0.0

    def finish(k, round_run, experts, fused, scoring, probe, base_probe, spent) -> None:
        """Record round k once scored."""
        nonlocal best
        merged_eval, expert_evals = rounds.collect_evaluation(scoring)
        latest_expert.update({t: ev[t]["accuracy"] for t, ev in expert_evals.items()})
        result = RoundResult(k, round_run, experts, fused, expert_evals, merged_eval,
                             baseline=rounds.probe_result(base_probe) if base_probe else results[0].baseline,
                             merged_probe=rounds.probe_result(probe), budget=spent,
                             reference=dict(latest_expert))
        score = result.summary()["mean"]["merged"]
        improved = score > best
        best = max(best, score)
        rounds.record(result, strategy="cold_fusion", move_alias=improved)
        results.append(result)

    scoring = None  # records the previous round once scored: it is scored while this one trains
    last = spec.count - 1
    for k in range(spec.count):
        scored = rounds.durable(k, last)  # resident workers: only checkpointed rounds are written and scored
        round_run = rounds.start_round(k)
        contributors = sample_contributors(wf.tasks, k, spec.contributors, spec.contributor_seed, spec.weight_by_size)
        rounds.report(f"round {k}: contributors {', '.join(t.name for t in contributors)}")
        # every expert is scored (a later round's non-contributors are normalised by their latest expert)
        pending = rounds.submit_experts(shared, contributors, k, round_run, per_round=True,
                                        part="fit" if wf.held_out_fraction else "all")  # AdaMerging learns on the rest
        base_probe = None
        if not results and scoring is None and scored:  # the first scored round; after the experts: they go first
            base_probe = rounds.submit_probe(base, k, round_run)
        if scoring is not None:
            scoring()
            scoring = None
        experts = rounds.collect_experts(pending)
        latest_expert.update({t: e.metrics["own_accuracy"] for t, e in experts.items() if "own_accuracy" in e.metrics})
        spent += len(contributors) / len(wf.tasks) / spec.count  # mean fraction of a task's budget
        fused = rounds.merge(shared, experts, k, round_run, merge=spec.merge, heads_from=shared, durable=scored)
        shared.state = None  # the round's start weights are read by nothing more: let the object store free them
        with_heads |= set(experts)
        if not scored:
            rounds.end_unscored(k, round_run, fused)
            shared = fused
            continue
        probe = rounds.submit_probe(fused, k, round_run, name="evaluate:shared-linear-probe")
        scoring = functools.partial(finish, k, round_run, experts, fused, rounds.submit_evaluation(
            fused, experts, k, round_run, cross_task=False, merged_tasks=sorted(with_heads)), probe, base_probe, spent)
        shared = fused
    if scoring is not None:
        scoring()
    return results
