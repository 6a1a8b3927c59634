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
accuracy has not improved for that many rounds. Round k is evaluated while round k+1 trains (its
scores are recorded, and the alias moved, in round order); with patience, before it.

ATM on validation data (``rounds.start: oneshot_merge`` with ``rounds.validation_fraction``):
round 0 is a one-shot merge (the workflow's ``merge``) of experts trained with the whole budget on
the train split minus a held-out validation slice; rounds 1..R then alternate tuning on that slice
and merging, as above. The eval split, on which every round is scored, is never trained on.
"""

from __future__ import annotations

import functools

from pipeline.steps import ModelRef
from pipeline.strategies.rounds import RoundResult, Rounds


def run(rounds: Rounds, base: ModelRef) -> list[RoundResult]:
    """Run ATM for ``rounds.count`` rounds (or until patience runs out); returns every round.

    Round k is scored while round k+1 trains: the next round starts from the merged model, not from
    its scores. With ``rounds.patience`` the score decides whether there is a next round, so each
    round is scored before the next starts.
    """
    wf, spec = rounds.wf, rounds.wf.rounds
    current, results = base, []
    best, since_best = float("-inf"), 0
    # a round merge that learns from the validation slices (AdaMerging): the experts train on the rest
    first, part = 0, "fit" if wf.held_out_fraction else "all"
    if spec.start == "oneshot_merge":  # ATM on validation data: round 0 is the one-shot merge
        round_run = rounds.start_round(0)
        pending = rounds.submit_experts(base, wf.tasks, 0, round_run, part="fit")
        probe = rounds.submit_probe(base, 0, round_run)  # after the experts: they go first
        experts = rounds.collect_experts(pending)
        merged = rounds.merge(base, experts, 0, round_run)
        merged_eval, expert_evals = rounds.evaluate(merged, experts, 0, round_run, cross_task=False)
        result = RoundResult(0, round_run, experts, merged, expert_evals, merged_eval,
                             baseline=rounds.probe_result(probe), merge_method=wf.merge.method)
        best = result.summary()["mean"]["merged"]
        rounds.record(result, strategy="atm")
        results.append(result)
        current, first, part = merged, 1, "validation"

    def finish(k, round_run, experts, merged, scoring, probe) -> bool:
        """Record round k once scored; whether patience says stop."""
        nonlocal best, since_best
        merged_eval, expert_evals = rounds.collect_evaluation(scoring)
        done = (k - first + 1) / spec.count
        result = RoundResult(k, round_run, experts, merged, expert_evals, merged_eval,
                             baseline=rounds.probe_result(probe) if probe else results[0].baseline,
                             budget=done if first == 0 else 1.0 + done * (spec.validation_fraction or 0.0))
        score = result.summary()["mean"]["merged"]
        improved = score > best
        rounds.record(result, strategy="atm", move_alias=improved)
        results.append(result)
        best, since_best = (score, 0) if improved else (best, since_best + 1)
        rounds.report(f"round {k}: mean held-out accuracy {score:.3f} (best {best:.3f})")
        if spec.patience is not None and since_best >= spec.patience:
            rounds.report(f"round {k}: no improvement for {since_best} rounds; stopping early (patience)")
            return True
        return False

    scoring = None  # records the previous round once scored: it is scored while this one trains
    for k in range(first, first + spec.count):
        round_run = rounds.start_round(k)
        pending = rounds.submit_experts(current, wf.tasks, k, round_run, per_round=True, part=part)
        probe = rounds.submit_probe(base, k, round_run) if k == 0 else None  # after the experts: they go first
        if scoring is not None:
            scoring()
        experts = rounds.collect_experts(pending)
        merge_base = current if spec.task_vectors_from == "round_start" else base
        merged = rounds.merge(merge_base, experts, k, round_run, merge=spec.merge, heads_from=current)
        scoring = functools.partial(finish, k, round_run, experts, merged,
                                    rounds.submit_evaluation(merged, experts, k, round_run, cross_task=False), probe)
        if spec.patience is not None:  # the score decides whether there is a next round: wait for it
            if scoring():
                return results
            scoring = None
        current = merged
    if scoring is not None:
        scoring()
    return results
