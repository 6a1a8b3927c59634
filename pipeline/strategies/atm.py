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

from pipeline.steps import ModelRef, merged_key, merged_path, ref_from_store
from pipeline.strategies.rounds import RoundResult, Rounds, own_scores


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
        if not expert_evals:  # a restored checkpoint: its experts' scores, as its provenance recorded them
            expert_evals = {t: own_scores(e, t) for t, e in experts.items()}
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

    last, first_to_run = first + spec.count - 1, first
    # resident workers: rounds between checkpoints lived in memory; resume after the last one in the store
    found = restore(rounds, base, first, last, part) if rounds.resident else []
    for earlier, _next in found[:-1]:  # what the earlier checkpoints scored: the best so far, and patience
        score = recorded_score(rounds, earlier)
        if score is not None:
            best, since_best = (score, 0) if score > best else (best, since_best + 1)
    if found:
        current, first_to_run = found[-1]
        k = first_to_run - 1
        round_run = rounds.start_round(k)
        rounds.report(f"round {k}: restored from its checkpoint {current.uri}; rounds {first}..{k} are not run again")
        pending = rounds.submit_evaluation(current, {}, k, round_run, cross_task=False)
        if finish(k, round_run, restored_experts(rounds, current), current, pending,
                  rounds.submit_probe(base, k, round_run)):
            return results
    probe_pending = not results
    scoring = None  # records the previous round once scored: it is scored while this one trains
    for k in range(first_to_run, last + 1):
        scored = rounds.durable(k, last)  # resident workers: only checkpointed rounds are written and scored
        round_run = rounds.start_round(k)
        pending = rounds.submit_experts(current, wf.tasks, k, round_run, per_round=True, part=part, scored=scored)
        probe = None
        if probe_pending and scored:  # after the experts: they go first
            probe, probe_pending = rounds.submit_probe(base, k, round_run), False
        if scoring is not None:
            scoring()
            scoring = None
        experts = rounds.collect_experts(pending)
        merge_base = current if spec.task_vectors_from == "round_start" else base
        merged = rounds.merge(merge_base, experts, k, round_run, merge=spec.merge, heads_from=current, durable=scored)
        current.state = None  # the round's start weights are read by nothing more: let the object store free them
        if not scored:
            rounds.end_unscored(k, round_run, merged)
            current = merged
            continue
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


def restore(rounds: Rounds, base: ModelRef, first: int, last: int, part: str) -> list[tuple[ModelRef, int]]:
    """The checkpointed rounds of this run already in the store, each with the round after it, in order.

    Every key is a content hash of what made it, so the chain of rounds is known without training:
    each round's expert keys follow from its start model, its merge's key from them. The walk stops at
    the first checkpointed round not in the store.
    """
    wf, spec = rounds.wf, rounds.wf.rounds
    current, found = base, []
    for k in range(first, last + 1):
        experts = {t.name: ModelRef("expert", t.name, "", "", rounds.expert_plan(current, t, k, True, part)[1])
                   for t in wf.tasks}
        merge_base = current if spec.task_vectors_from == "round_start" else base
        key = merged_key(merge_base, experts, spec.merge, current)
        if rounds.durable(k, last):
            path = merged_path(rounds.store, wf, k, key, spec.merge.method)
            if not rounds.intact(path, "merged model", k) or not _resident_checkpoint(rounds, path):
                break
            found.append((ref_from_store(rounds.store, path, "merged", f"{wf.name}-merged", key), k + 1))
        current = ModelRef("merged", f"{wf.name}-merged", "", "", key)
    return found


def recorded_score(rounds: Rounds, merged: ModelRef) -> float | None:
    """The mean held-out accuracy a checkpointed round's merge run recorded (None: never scored)."""
    if not merged.run_id:
        return None
    try:
        return rounds.lineage.client.get_run(merged.run_id).data.metrics.get("eval/mean/accuracy")
    except Exception:  # the run is gone (another tracking server): the round counts as unscored
        return None


def _resident_checkpoint(rounds: Rounds, path: str) -> bool:
    """Whether resident workers wrote it (its provenance keeps its experts' scores; the same merge written
    by task workers is reused by the merge step instead, its experts being in the store)."""
    from operators.checkpoint import read_provenance

    return read_provenance(rounds.store.materialize(path)).get("workers") == "resident"


def restored_experts(rounds: Rounds, merged: ModelRef) -> dict[str, ModelRef]:
    """The experts a restored checkpoint was merged from, with their own-task scores, from its provenance."""
    from operators.checkpoint import read_provenance

    prov = read_provenance(rounds.store.materialize(merged.path))
    out = {}
    for p in prov.get("parents", []):
        if p.get("kind") != "expert":
            continue
        out[p["task"]] = ModelRef("expert", p["task"], "", p["uri"], p["key"], p.get("run_id"), reused=True,
                                  metrics=p.get("metrics", {}))
    return out
