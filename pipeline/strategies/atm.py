"""ATM: alternating tuning and merging (Zhou et al., arXiv 2411.03055).

    θ⁽⁰⁾ = base
    for k in 1..R:
        θ_t⁽ᵏ⁾ = finetune(θ⁽ᵏ⁻¹⁾, task t, one round's budget)      every task, in parallel
        θ⁽ᵏ⁾  = merge(θ_t⁽ᵏ⁾ − θ_start)                         θ_start = θ⁽ᵏ⁻¹⁾ (default) or the base
        evaluate θ⁽ᵏ⁾ on every task; the registry alias follows the best round so far

The default merge (``rounds.merge``) is the mean of the round's models, i.e. task arithmetic with
α = 1/T on the round's task vectors, as the authors run it; any library method can replace it.
Task heads carry over: each round's experts start from the heads in θ⁽ᵏ⁻¹⁾. A round's budget is
each task's whole budget divided by R unless ``rounds.finetune`` says otherwise, so ATM and
one-shot merging spend the same compute. ``rounds.patience`` stops early when the mean held-out
accuracy has not improved for that many rounds.

ATM on validation data (``rounds.start: oneshot_merge`` with ``rounds.validation_fraction``):
round 0 is a one-shot merge (the workflow's ``merge``) of experts trained with the whole budget on
the train split minus a held-out validation slice; rounds 1..R then alternate tuning on that slice
and merging, as above. The eval split, on which every round is scored, is never trained on.

Scoring a round while the next trains, the baseline, checkpointed rounds and restore are the round
loop's (:mod:`pipeline.strategies.loop`).
"""

from __future__ import annotations

from pipeline.context import ModelRef, merged_key, merged_path, ref_from_store
from pipeline.spec import RoundsSpec
from pipeline.strategies.loop import RoundLoop
from pipeline.strategies.oneshot import merge_once
from pipeline.strategies.rounds import RoundResult, Rounds


def run(rounds: Rounds, base: ModelRef) -> list[RoundResult]:
    """Run ATM for ``rounds.count`` rounds (or until patience runs out); returns every round."""
    wf, spec = rounds.wf, rounds.wf.rounds
    loop = RoundLoop(rounds, base, "atm", patience=spec.patience)
    current, first, part = base, 0, "fit" if wf.held_out_fraction else "all"  # AdaMerging learns on the rest
    if spec.start == "oneshot_merge":  # ATM on validation data: round 0 is the one-shot merge
        zero = merge_once(rounds, base, "atm", part="fit", cross_task=False, merge_method=wf.merge.method)
        current, first, part = loop.first_round(zero), 1, "validation"
    last = first + spec.count - 1

    def budget(k: int) -> float:  # the share of each task's budget spent by round k's end
        done = (k - first + 1) / spec.count
        return done if first == 0 else 1.0 + done * (spec.validation_fraction or 0.0)

    # rounds a killed run checkpointed (resident workers) come from the store
    current, resume = loop.restore(checkpointed_rounds(rounds, base, first, last, part), current, first, budget)
    for k in loop.rounds(resume, last):
        experts = loop.train(current, wf.tasks, k, part)
        merged = loop.merge(task_vectors_from(spec, current, base), experts, heads_from=current)
        loop.score(experts, merged, budget(k))
        current = merged
    return loop.finish()


def task_vectors_from(spec: RoundsSpec, current: ModelRef, base: ModelRef) -> ModelRef:
    """What a round's task vectors are measured from: its start model (default) or the base."""
    return current if spec.task_vectors_from == "round_start" else base


def checkpointed_rounds(rounds: Rounds, base: ModelRef, first: int, last: int, part: str) -> list[tuple[ModelRef, int]]:
    """The checkpointed rounds of this run already in the store as whole rounds (resident workers; task workers
    resume step by step instead), each with the round after it, in order.

    Every key is a content hash of what made it, so the chain of rounds is known without training: each
    round's expert keys follow from its start model, its merge's key from them. The walk stops at the first
    checkpointed round not in the store.
    """
    wf, spec = rounds.wf, rounds.wf.rounds
    current, found = base, []
    for k in range(first, last + 1):
        experts = {t.name: ModelRef("expert", t.name, "", "", rounds.expert_plan(current, t, k, True, part)[1])
                   for t in wf.tasks}
        key = merged_key(task_vectors_from(spec, current, base), experts, spec.merge, current)
        if rounds.durable(k, last):
            path = merged_path(rounds.store, wf, k, key, spec.merge.method)
            if not rounds.workers.restorable(path, k):
                break
            found.append((ref_from_store(rounds.store, path, "merged", f"{wf.name}-merged", key), k + 1))
        current = ModelRef("merged", f"{wf.name}-merged", "", "", key)
    return found
