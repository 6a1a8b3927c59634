"""One-shot: fine-tune every expert once from the base, merge once, evaluate.

    base ──▶ [finetune task_1 … task_K] ──▶ merge ──▶ evaluate (merged and experts, every task)
"""

from __future__ import annotations

from pipeline.context import ModelRef
from pipeline.strategies.rounds import RoundResult, Rounds


def run(rounds: Rounds, base: ModelRef) -> list[RoundResult]:
    """Run the one-shot strategy; returns its single round."""
    wf = rounds.wf
    # a searched merge parameter (or AdaMerging's coefficients) is chosen on a slice held out of each train
    # split: experts train on the rest
    return [merge_once(rounds, base, "oneshot", part="fit" if wf.merge.needs_validation else "all",
                       cross_task=wf.evaluation.cross_task, refit_heads=wf.merge.refit_heads)]


def merge_once(rounds: Rounds, base: ModelRef, strategy: str, part: str, cross_task: bool,
               refit_heads: bool = False, merge_method: str = "") -> RoundResult:
    """Round 0 of ``strategy``: every expert with its whole budget from ``base``, merged with ``merge``, scored.

    ``part``: the training rows (``all``, or ``fit`` with a validation slice held out); ``cross_task``: also
    score each expert on the other tasks; ``refit_heads``: also score the merged body with every head refit
    on it (its own column, ``merged_probe``); ``merge_method``: recorded as the round's method when it is not
    the strategy's usual one.
    """
    round_run = rounds.start_round(0)
    pending = rounds.submit_experts(base, rounds.wf.tasks, 0, round_run, part=part)
    probe = rounds.submit_probe(base, 0, round_run)  # the baseline fills a slot once the experts have theirs
    experts = rounds.collect_experts(pending)
    merged = rounds.merge(base, experts, 0, round_run)
    merged_eval, expert_evals = rounds.evaluate(merged, experts, 0, round_run, cross_task=cross_task)
    refit = {}
    if refit_heads:  # every head refit on the merged body: its own column (merged_probe), with its cost
        refit = rounds.probe_result(rounds.submit_probe(merged, 0, round_run, name="refit-heads:linear-probe"))
    result = RoundResult(0, round_run, experts, merged, expert_evals, merged_eval, rounds.probe_result(probe),
                         merged_probe=refit, merge_method=merge_method)
    rounds.record(result, strategy=strategy)
    return result
