"""One-shot: fine-tune every expert once from the base, merge once, evaluate.

    base ──▶ [finetune task_1 … task_K] ──▶ merge ──▶ evaluate (merged and experts, every task)
"""

from __future__ import annotations

from pipeline.steps import ModelRef
from pipeline.strategies.rounds import RoundResult, Rounds


def run(rounds: Rounds, base: ModelRef) -> list[RoundResult]:
    """Run the one-shot strategy; returns its single round."""
    wf = rounds.wf
    round_run = rounds.start_round(0)
    # a searched merge parameter (or AdaMerging's coefficients) is chosen on a slice held out of each train
    # split: experts train on the rest
    pending = rounds.submit_experts(base, wf.tasks, 0, round_run, part="fit" if wf.merge.needs_validation else "all")
    probe = rounds.submit_probe(base, 0, round_run)  # the baseline fills a slot once the experts have theirs
    experts = rounds.collect_experts(pending)
    merged = rounds.merge(base, experts, 0, round_run)
    merged_eval, expert_evals = rounds.evaluate(merged, experts, 0, round_run)
    refit = {}
    if wf.merge.refit_heads:  # every head refit on the merged body: its own column (merged_probe), with its cost
        refit = rounds.probe_result(rounds.submit_probe(merged, 0, round_run, name="refit-heads:linear-probe"))
    result = RoundResult(0, round_run, experts, merged, expert_evals, merged_eval, rounds.probe_result(probe),
                         merged_probe=refit)
    rounds.record(result, strategy="oneshot")
    return [result]
