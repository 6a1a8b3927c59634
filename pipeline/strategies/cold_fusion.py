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
base. A task that did not contribute is normalised by its latest expert.

Scoring a round while the next trains, the baseline and checkpointed rounds are the round loop's
(:mod:`pipeline.strategies.loop`).
"""

from __future__ import annotations

import random

from pipeline.context import ModelRef, task_data
from pipeline.spec import TaskSpec
from pipeline.spec.common import contributor_count
from pipeline.strategies.loop import RoundLoop
from pipeline.strategies.rounds import RoundResult, Rounds


def run(rounds: Rounds, base: ModelRef) -> list[RoundResult]:
    """Run ColD Fusion for ``rounds.count`` rounds; returns every round."""
    wf, spec = rounds.wf, rounds.wf.rounds
    # every expert is scored: a later round's non-contributors are normalised by their latest expert
    loop = RoundLoop(rounds, base, "cold_fusion", every_expert_scored=True)
    shared, spent = base, 0.0
    with_heads: set[str] = set()  # tasks whose head the shared model carries (every contributor so far)
    part = "fit" if wf.held_out_fraction else "all"  # AdaMerging learns on the rest
    for k in loop.rounds(0, spec.count - 1):
        contributors = sample_contributors(wf.tasks, k, spec.contributors, spec.contributor_seed, spec.weight_by_size)
        experts = loop.train(shared, contributors, k, part, note=f"contributors {', '.join(t.name for t in contributors)}")
        spent += len(contributors) / len(wf.tasks) / spec.count  # mean fraction of a task's budget
        fused = loop.merge(shared, experts, heads_from=shared)
        with_heads |= set(experts)
        loop.score(experts, fused, spent, tasks=sorted(with_heads), probe_merged=True)
        shared = fused
    return loop.finish()


def sample_contributors(tasks: list[TaskSpec], round_index: int, count: float | None, seed: int,
                        weight_by_size: bool) -> list[TaskSpec]:
    """The round's contributors: reproducible from (seed, round); all tasks when ``count`` is None."""
    if count is None:
        return list(tasks)
    n = contributor_count(count, len(tasks))
    rng = random.Random(f"{seed}/{round_index}")
    pool = list(tasks)
    chosen: list[TaskSpec] = []
    while len(chosen) < n:
        weights = [len(task_data(t).train) if weight_by_size else 1.0 for t in pool]
        pick = rng.choices(range(len(pool)), weights=weights)[0]
        chosen.append(pool.pop(pick))
    return sorted(chosen, key=lambda t: t.name)
