"""``mergeflow compose``: weigh a workflow's experts for a task none of them was trained on, from a few of its
labelled examples (LoraHub's gradient-free composition; ``operators.learn.compose``).

    spec's tasks but TARGET ──▶ one-shot workflow (experts trained, or reused from the store)
        ──▶ CMA-ES over the experts' weights on N examples of TARGET ──▶ composed model
        ──▶ TARGET's held-out eval split: composed, the uniform merge (w = 1/K), the base

Everything goes to the workflow's MLflow experiment: the one-shot run of the other tasks (its merged model
registered as ``<registered model>-without-TARGET``, never under the workflow's own name), and a run
``compose:TARGET`` (kind ``compose``) with the weights, each candidate's few-shot loss and objective (by step),
the recipe as a mergekit config (``recipe.yaml``), and the three held-out scores.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.context import StepContext, base_ref, local_dir, task_data
from pipeline.driver import run_workflow
from pipeline.lineage import Lineage
from pipeline.spec import Workflow


def compose_target(wf: Workflow, target: str, examples: int, out: str | Path, *, evaluations: int = 40,
                   seed: int = 0, l1: float = 0.05, address: str | None = None, num_cpus: int | None = None,
                   report: Callable[[str], None] = print) -> dict[str, Any]:
    """Compose ``wf``'s other tasks' experts for ``target`` from ``examples`` of its train split; the composed
    model is written to ``out``. Returns the record logged on the ``compose:TARGET`` run."""
    from operators.evaluate import evaluate
    from operators.learn.compose import compose
    from operators.merge.engine import merge_checkpoints
    from operators.merge.output import check_output_dir

    task = next((t for t in wf.tasks if t.name == target), None)
    if task is None:
        raise ValueError(f"--target: {target!r} is not a task of {wf.name} ({', '.join(t.name for t in wf.tasks)})")
    if task.type != "causal_lm":
        raise ValueError(f"--target: {target!r} is a classification task; composition scores a causal LM's loss on "
                         "the examples (a new classification task has no head to score with)")
    others = [t for t in wf.tasks if t.name != target]
    if not others:
        raise ValueError(f"--target: {wf.name} has no task besides {target!r}; composition weighs the other tasks' "
                         "experts")
    check_output_dir(Path(out))
    data = task_data(task)
    if examples > len(data.train):
        raise ValueError(f"--examples: {examples} is more than {target!r}'s {len(data.train)} training rows")
    # the other tasks' experts, one-shot from the base (reused from the store when a run already made them)
    raw = {k: v for k, v in wf.model_dump(mode="json", exclude_unset=True).items() if k not in ("rounds", "strategy")}
    # its merges register under a name of their own: the workflow's registered model (and its alias) stay as they are
    raw["tracking"] = {**raw.get("tracking", {}), "registered_model": f"{wf.registered_model_name}-without-{target}"}
    derived = Workflow.model_validate({**raw, "tasks": [t.model_dump(mode="json", exclude_unset=True) for t in others]})
    report(f"compose {target}: the experts of {', '.join(t.name for t in others)} (one-shot from the base)")
    result = run_workflow(derived, address=address, num_cpus=num_cpus, report=report)
    ctx = StepContext(derived, derived.tracking.uri, result.experiment_id, result.run_id, derived.base_model)
    base = local_dir(ctx, base_ref(derived))
    experts = {t: local_dir(ctx, e) for t, e in result.final.experts.items()}
    shots = data.train.take(sorted(random.Random(seed).sample(range(len(data.train)), examples)))
    max_length = wf.finetune_for(task).max_length
    report(f"compose {target}: CMA-ES over {len(experts)} weights, {evaluations} candidates, on {examples} examples")
    res = compose(base, experts, shots, evaluations=evaluations, seed=seed, l1=l1, max_length=max_length)
    made = {"kind": "composed", "target": target, "examples": examples, "seed": seed, "l1": l1,
            "weights": res.weights, "workflow": wf.name, "experts_run": result.run_id,
            "experts": {t: e.uri for t, e in result.final.experts.items()}}
    merge_checkpoints(base, experts, "task_arithmetic", {"weights": res.weights, "scaling": 1.0}, out,
                      provenance={"compose": made})
    scores = {"composed": evaluate(out, data, headline=task.headline_metric, max_length=max_length)}
    with tempfile.TemporaryDirectory() as tmp:
        uniform = Path(tmp) / "uniform"
        merge_checkpoints(base, experts, "task_arithmetic",
                          {"weights": {t: 1.0 / len(experts) for t in experts}, "scaling": 1.0}, uniform)
        scores["uniform"] = evaluate(uniform, data, headline=task.headline_metric, max_length=max_length)
        shutil.rmtree(uniform, ignore_errors=True)
    scores["base"] = evaluate(base, data, headline=task.headline_metric, max_length=max_length)
    record = {**made, "few_shot_loss": {"composed": res.loss, "uniform": res.uniform_loss, "base": res.base_loss},
              "held_out": scores, "search_seconds": res.seconds,
              "candidates": len(res.candidates), "output": str(Path(out).resolve())}
    lineage = Lineage(derived.tracking.uri, result.experiment_id)
    run_id = lineage.start_run(f"compose:{target}", kind="compose", workflow_run=result.run_id)
    lineage.log_params(run_id, {"target": target, "examples": examples, "seed": seed, "l1": l1,
                                "evaluations": evaluations, "experts": sorted(experts),
                                **{f"weight.{t}": w for t, w in res.weights.items()}})
    for i, c in enumerate(res.candidates):
        lineage.log_metrics(run_id, {"candidate/few_shot_loss": c["loss"], "candidate/objective": c["objective"]},
                            step=i)
    lineage.log_metrics(run_id, {**{f"few_shot_loss/{k}": v for k, v in record["few_shot_loss"].items()},
                                 **{f"held_out/{k}/{m}": v for k, s in scores.items() for m, v in s.items()
                                    if isinstance(v, float)}})
    lineage.log_dict(run_id, {**res.config, "base_model": derived.base_model,
                              "models": [{**m, "model": result.final.experts[t].uri}
                                         for m, t in zip(res.config["models"], sorted(experts), strict=True)]},
                     "recipe.yaml")
    lineage.log_dict(run_id, record, "compose.json")
    lineage.end_run(run_id)
    record["run_id"] = run_id
    head = task.headline_metric or "accuracy"
    report(f"compose {target}: weights " + ", ".join(f"{t}={w:+.3f}" for t, w in res.weights.items())
           + f"; few-shot loss {res.loss:.4f} (uniform {res.uniform_loss:.4f}, base {res.base_loss:.4f}); held-out "
           + ", ".join(f"{k} {s.get('accuracy', s.get(head, float('nan'))):.3f}" for k, s in scores.items()))
    return record
