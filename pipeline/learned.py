"""Merges that learn from data, at the pipeline's edges.

- :func:`statistics_step` (a Ray task beside each expert): the Gram matrices (RegMean) or diagonal
  Fisher (Fisher merging) of one expert, on its own training rows, published to the store at
  ``<workflow>/round-NNN/statistics/<task>-<kind>-<key>`` (the key hashes the expert's key, the
  kind, N and the seed, so an unchanged expert's statistics are reused across rounds and re-runs),
  with checksums, and logged as artifacts of the expert's run.
- :func:`learn_from_inputs` (inside the merge step): AdaMerging's coefficients, learned on the unlabeled
  inputs of each task's validation slice, logged (entropy curve, coefficients) on the merge run.
- :func:`prepare_merge` (inside the merge step): verifies those statistics against the experts
  (checksum, weights hash) and hands them to the method; runs a coefficient search on the held-out
  validation slices, one nested MLflow run per candidate, and merges with the chosen value, which
  is recorded on the merge run and in the merged checkpoint's provenance; or merges with the recipe a
  recipe search chose.
- :func:`recipe_candidate_step` (a Ray task per candidate of a recipe search, driven by the strategy):
  one mergekit recipe merged in memory and scored on the validation slices, as its own nested run.
"""

from __future__ import annotations

import shutil
from typing import Any

from pipeline.context import ModelRef, StepContext, local_dir, say, task_data
from pipeline.lineage import TAG_ROUND
from pipeline.spec import MergeSpec, TaskSpec
from pipeline.store import CheckpointStore, content_key


def statistics_key(expert: ModelRef, kind: str, examples: int, seed: int) -> str:
    return content_key("statistics", expert.key, kind, examples, seed)


def statistics_path(store: CheckpointStore, workflow_name: str, round_index: int, task: str, kind: str, key: str) -> str:
    return store.path(workflow_name, f"round-{round_index:03d}", "statistics", f"{task}-{kind}-{key}")


def statistics_step(ctx: StepContext, task: TaskSpec, expert: ModelRef, kind: str, examples: int, seed: int,
                    round_index: int, path: str) -> dict[str, Any]:
    """Compute one expert's statistics on the rows it was trained on, publish them, log them to its run.

    Returns:
        ``{"task", "path", "seconds", "finetune_seconds", "fraction_of_finetune"}``.
    """
    from operators.checkpoint_files import read_provenance
    from operators.learn.statistics import compute_statistics

    wf, store, lineage = ctx.workflow, ctx.store(), ctx.lineage()
    expert_dir = local_dir(ctx, expert)
    prov = read_provenance(expert_dir)
    part = (prov.get("data") or {}).get("part", "all")
    data = task_data(task, part, wf.held_out_fraction, task.dataset.split_seed)
    staging = store.staging_dir()
    try:
        out = staging / "statistics"
        rec = compute_statistics(expert_dir, data, kind, out, examples=examples, seed=seed,
                                 max_length=wf.finetune_for(task).max_length, device=ctx.device)
        train_seconds = float((prov.get("metrics") or {}).get("train_seconds") or 0.0)
        fraction = rec.seconds / train_seconds if train_seconds > 0 else float("nan")
        if expert.run_id:
            for f in (f"{kind}.json", f"{kind}.safetensors"):
                lineage.log_artifact(expert.run_id, out / f)
            lineage.log_metrics(expert.run_id, {f"statistics/{kind}_seconds": rec.seconds,
                                                f"statistics/{kind}_fraction_of_finetune": fraction}, step=round_index)
        store.publish(out, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"[statistics {task.name}] {kind} from {rec.examples} examples in {rec.seconds:.1f}s "
        f"({fraction:.0%} of the fine-tune's {train_seconds:.1f}s)")
    return {"task": task.name, "path": path, "seconds": rec.seconds, "finetune_seconds": train_seconds,
            "fraction_of_finetune": fraction}


def learn_from_inputs(ctx: StepContext, merge: MergeSpec, base: ModelRef, experts: dict[str, ModelRef],
                      params: dict[str, Any], run_id: str, round_index: int):
    """AdaMerging: learn the coefficients on the unlabeled inputs of every merged task's validation slice.

    The entropy curve is logged on the merge run (``adamerging/entropy``, by step) and the learned
    coefficients as its ``adamerging.json`` artifact; returns the :class:`AdaMergingResult`.
    """
    from operators.learn.coefficients import learn_coefficients

    wf, lineage = ctx.workflow, ctx.lineage()
    inputs = {t.name: task_data(t, "validation", wf.held_out_fraction, t.dataset.split_seed).train.texts
              for t in wf.tasks if t.name in experts}
    say(f"[adamerging] learning {params.get('granularity', 'layer')}-wise coefficients of "
        f"{', '.join(sorted(experts))} on unlabeled validation inputs ({', '.join(f'{t}: {len(x)}' for t, x in inputs.items())})")
    res = learn_coefficients(local_dir(ctx, base), {t: local_dir(ctx, e) for t, e in experts.items()}, inputs, params,
                             max_length=max(wf.finetune_for(t).max_length for t in wf.tasks if t.name in experts),
                             device=ctx.device,
                             on_log=lambda step, h: lineage.log_metrics(run_id, {"adamerging/entropy": h}, step=step))
    lineage.log_dict(run_id, res.as_dict(), "adamerging.json")
    say(f"[adamerging] {res.steps} steps in {res.seconds:.1f}s: entropy {res.initial_entropy:.4f} → "
        f"{res.final_entropy:.4f}; mean λ " + ", ".join(f"{t}={v:.2f}" for t, v in res.mean_coefficient.items()))
    return res


def alignment_inputs(ctx: StepContext, merge: MergeSpec, experts: dict[str, ModelRef]) -> dict[str, list[str]]:
    """``heads: aligned``: per task, a seeded sample of the inputs its expert trained on (never its labels)."""
    from operators.checkpoint_files import read_provenance
    from operators.learn.statistics import sample_rows

    wf = ctx.workflow
    inputs = {}
    for task in (t for t in wf.tasks if t.name in experts):
        part = (read_provenance(local_dir(ctx, experts[task.name])).get("data") or {}).get("part", "all")
        train = task_data(task, part, wf.held_out_fraction, task.dataset.split_seed).train
        inputs[task.name] = [train.texts[i] for i in sample_rows(len(train), merge.heads.examples, merge.heads.seed)]
    return inputs


def align_merged_heads(ctx: StepContext, merge: MergeSpec, adapter_base: ModelRef | None,
                       experts: dict[str, ModelRef], ckpt, run_id: str, inputs: dict[str, list[str]]) -> dict[str, float]:
    """``heads: aligned``: refit each expert's head in the staged merged checkpoint ``ckpt`` (before it is published).

    ``inputs``: from :func:`alignment_inputs`. The fit is recorded in the checkpoint's provenance
    (``heads``) and as ``heads_aligned.json`` on the merge run; returns the metrics for the merge run.
    """
    from operators.checkpoint_files import read_provenance, write_provenance
    from operators.learn.heads import align_heads

    wf, lineage = ctx.workflow, ctx.lineage()
    spec = merge.heads
    tasks = {t.name: t for t in wf.tasks if t.name in experts}
    expert_dirs = {t: local_dir(ctx, e) for t, e in experts.items() if t in tasks}
    report = align_heads(ckpt, expert_dirs, inputs, ridge=spec.ridge, seed=spec.seed,
                         max_length=max(wf.finetune_for(t).max_length for t in tasks.values()), device=ctx.device,
                         merged_adapter_base=local_dir(ctx, adapter_base) if adapter_base is not None else None,
                         expert_adapter_bases={t: local_dir(ctx, e.adapter_base) for t, e in experts.items()
                                               if e.adapter_base is not None and t in tasks})
    record = report.as_dict()
    prov = read_provenance(ckpt)
    prov.pop("mergeflow_version", None)
    prov.pop("created_at", None)
    write_provenance(ckpt, {**prov, "heads": record})
    lineage.log_dict(run_id, record, "heads_aligned.json")
    say(f"[heads] aligned {', '.join(sorted(report.fits))} on the merged body in {report.seconds:.1f}s; logit MSE "
        + ", ".join(f"{t} {f.mse_before:.3g}→{f.mse_after:.3g}" for t, f in sorted(report.fits.items())))
    metrics = {"heads_align_seconds": report.seconds}
    for t, f in report.fits.items():
        metrics |= {f"heads/{t}/logit_mse_before": f.mse_before, f"heads/{t}/logit_mse_after": f.mse_after}
    return metrics


def recipe_refs(ctx: StepContext, base: ModelRef, experts: dict[str, ModelRef]) -> tuple[str, dict[str, str]]:
    """How a recipe names the base and the experts: the base's local folder (a packaged or local model) or its
    store URI, and each expert's store URI (``mergeflow merge`` fetches URIs from the store)."""
    return (str(local_dir(ctx, base)) if base.kind == "base" and not base.path else base.uri,
            {t: e.uri for t, e in sorted(experts.items())})


def local_config(ctx: StepContext, config: dict[str, Any], base: ModelRef, experts: dict[str, ModelRef]) -> dict[str, Any]:
    """A recipe with its references replaced by this machine's local folders."""
    base_ref, refs = recipe_refs(ctx, base, experts)
    local = {base_ref: str(local_dir(ctx, base)), **{refs[t]: str(local_dir(ctx, e)) for t, e in experts.items()}}
    return {**config, "base_model": local[config["base_model"]],
            "models": [{**m, "model": local[m["model"]]} for m in config["models"]]}


def local_recipe(ctx: StepContext, config: dict[str, Any], base: ModelRef, experts: dict[str, ModelRef]):
    """A recipe's merge plan on this machine: its references local, its experts named by task."""
    from operators.learn.recipe import recipe_plan

    return recipe_plan(local_config(ctx, config, base, experts), {t: local_dir(ctx, e) for t, e in experts.items()})


_SCORERS: dict[str, Any] = {}  # one recipe search's loaded models, kept by each worker process between candidates


def _recipe_scorer(ctx: StepContext, base: ModelRef, experts: dict[str, ModelRef]):
    """The base, experts and validation slices of a recipe search, loaded once per worker process."""
    from operators.learn.recipe import RecipeScorer

    key = content_key("recipe-scorer", base.key, {t: e.key for t, e in sorted(experts.items())}, ctx.workflow.spec_hash())
    if key not in _SCORERS:
        wf = ctx.workflow
        val = {t.name: task_data(t, "validation", wf.held_out_fraction, t.dataset.split_seed).train
               for t in wf.tasks if t.name in experts}
        _SCORERS.clear()  # one search at a time: the last one's models go
        _SCORERS[key] = RecipeScorer(local_dir(ctx, base), {t: local_dir(ctx, e) for t, e in experts.items()}, val,
                                     max_length=max(wf.finetune_for(t).max_length for t in wf.tasks),
                                     device=ctx.device)
    return _SCORERS[key]


def recipe_candidate_step(ctx: StepContext, base: ModelRef, experts: dict[str, ModelRef], config: dict[str, Any],
                          number: int, generation: int, run_id: str, round_index: int) -> dict[str, Any]:
    """Score one recipe (a mergekit config) on the validation slices; it is its own run under the merge's.

    Returns:
        ``{"score", "accuracy", "normalized", "seconds", "run_id"}``.
    """
    lineage = ctx.lineage()
    scored = _recipe_scorer(ctx, base, experts).score(local_config(ctx, config, base, experts))
    score, acc, norm, seconds = scored["score"], scored["accuracy"], scored["normalized"], scored["seconds"]
    cid = lineage.start_run(f"recipe:{number}", kind="search_candidate", parent=run_id,
                            workflow_run=ctx.workflow_run_id, tags={TAG_ROUND: str(round_index),
                                                                    "mergeflow.recipe.generation": str(generation)})
    lineage.log_params(cid, {"method": config["merge_method"], "candidate": number, "generation": generation,
                             **recipe_params(config, experts)})
    lineage.log_metrics(cid, {"validation/mean/normalized_accuracy": score,
                              **{f"validation/{t}/accuracy": a for t, a in acc.items()},
                              **{f"validation/{t}/normalized_accuracy": a for t, a in norm.items()},
                              "seconds": seconds}, step=round_index)
    lineage.log_dict(cid, config, "recipe.yaml")
    lineage.end_run(cid)
    return {"score": score, "accuracy": acc, "normalized": norm, "seconds": seconds, "run_id": cid}


def recipe_params(config: dict[str, Any], experts: dict[str, ModelRef]) -> dict[str, Any]:
    """A recipe's values by task (``weight.sentiment``, ``density.emotion``, ``lambda``) for MLflow's params."""
    task_of = {e.uri: t for t, e in experts.items()}
    out: dict[str, Any] = {}
    for m in config["models"]:
        for k, v in (m.get("parameters") or {}).items():
            out[f"{k}.{task_of.get(m['model'], m['model'])}"] = v
    return {**out, **(config.get("parameters") or {})}


def prepare_merge(ctx: StepContext, merge: MergeSpec, base: ModelRef, experts: dict[str, ModelRef],
                  statistics: dict[str, str] | None, run_id: str, round_index: int,
                  align_inputs: dict[str, list[str]] | None = None, recipe: dict[str, Any] | None = None,
                  ) -> tuple[dict[str, Any], dict[str, Any], dict[str, float], Any]:
    """The parameters to merge with: statistics filled in and verified, a searched parameter chosen
    (with ``align_inputs``, ``heads: aligned``: each candidate scored with its heads aligned on them), or
    those of the ``recipe`` a recipe search chose (``{"config": mergekit config, "search": summary}``).

    Returns:
        ``(params, provenance record, metrics for the merge run, per-tensor parameters or None)``.
    """
    if recipe is not None:
        plan = local_recipe(ctx, recipe["config"], base, experts)
        return plan.params, {"recipe": recipe}, {}, plan.tensor_params
    from operators.learn.search import search_coefficient
    from operators.merge import get_method
    from operators.merge.statistics import open_statistics

    wf, store, lineage = ctx.workflow, ctx.store(), ctx.lineage()
    params: dict[str, Any] = dict(merge.params)
    record: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    kind = get_method(merge.method).statistics
    if kind is not None:
        local, rows = {}, {}
        for task, path in sorted((statistics or {}).items()):
            d = store.materialize(path)
            st = open_statistics(d, kind, expert=local_dir(ctx, experts[task]), who=task)  # checksum, weights hash
            local[task] = str(d)
            rows[task] = {"uri": store.uri(path), "examples": st.record["examples"], "seconds": st.record["seconds"],
                          "file_sha256": st.record["file_sha256"], "expert_sha256": st.record["expert_sha256"]}
        params["statistics"] = local  # the method reads them; provenance records the store URIs instead
        record["statistics"] = {"kind": kind, "experts": rows}
        metrics["statistics_seconds_max"] = max((r["seconds"] for r in rows.values()), default=0.0)
    if merge.learns_from_inputs:
        learned = learn_from_inputs(ctx, merge, base, experts, params, run_id, round_index)
        params["coefficients"] = learned.coefficients
        record["adamerging"] = {k: v for k, v in learned.as_dict().items() if k != "coefficients"}
        metrics |= {"adamerging_seconds": learned.seconds, "adamerging_initial_entropy": learned.initial_entropy,
                    "adamerging_final_entropy": learned.final_entropy,
                    **{f"adamerging_mean_coefficient/{t}": v for t, v in learned.mean_coefficient.items()}}
    space = merge.search
    if space is not None:
        val = {t.name: task_data(t, "validation", wf.held_out_fraction, t.dataset.split_seed).train
               for t in wf.tasks if t.name in experts}

        def on_candidate(c) -> None:
            cid = lineage.start_run(f"candidate:{space.param}={c.value:g}", kind="search_candidate", parent=run_id,
                                    workflow_run=ctx.workflow_run_id, tags={TAG_ROUND: str(round_index)})
            lineage.log_params(cid, {"method": merge.method, space.param: c.value})
            lineage.log_metrics(cid, {"validation/mean/normalized_accuracy": c.score,
                                      **{f"validation/{t}/accuracy": a for t, a in c.accuracy.items()},
                                      **{f"validation/{t}/normalized_accuracy": a for t, a in c.normalized.items()},
                                      "merge_seconds": c.merge_seconds, "eval_seconds": c.eval_seconds},
                                step=round_index)
            lineage.end_run(cid)
            say(f"[search] {merge.method} {space.param}={c.value:g}: mean normalized validation accuracy {c.score:.4f}")

        say(f"[search] {merge.method}.{space.param}: {space.describe()} on validation slices of "
            f"{', '.join(f'{t} ({len(s)})' for t, s in val.items())}")
        res = search_coefficient(local_dir(ctx, base), {t: local_dir(ctx, e) for t, e in experts.items()},
                                 merge.method, params, val, max_length=max(wf.finetune_for(t).max_length
                                                                           for t in wf.tasks),
                                 device=ctx.device, on_candidate=on_candidate,
                                 align=align_inputs, ridge=merge.heads.ridge)
        params[res.param] = res.chosen
        record["search"] = {k: v for k, v in res.as_dict().items() if k != "extra"}
        lineage.log_params(run_id, {f"search.chosen.{res.param}": res.chosen, "search.space": res.space,
                                    "search.selection": "mean normalized validation accuracy",
                                    "search.heads": res.heads})
        lineage.log_dict(run_id, record["search"], "search.json")
        metrics |= {"search_seconds": res.seconds, "search_candidates": float(len(res.candidates)),
                    "search_eval_pass_seconds": res.eval_pass_seconds, "search_cost_ratio": res.cost_ratio,
                    "search_best_validation_normalized_accuracy": res.best_score,
                    f"search_chosen_{res.param}": res.chosen}
        say(f"[search] chose {res.param}={res.chosen:g} (validation {res.best_score:.4f}) in {res.seconds:.1f}s: "
            f"{res.cost_ratio:.2f}x one evaluation pass per candidate")
    return params, record, metrics, None
