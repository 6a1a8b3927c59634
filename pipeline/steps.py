"""Steps: what one Ray task (or one in-process call) does. Each wraps one operator with the edges:

fetch inputs from the store → run the operator on local directories → publish the output
atomically → log lineage into the run the driver created for it.

Steps receive and return references (store paths, run and model ids), never weights.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from operators.checkpoint_files import write_provenance
from pipeline.context import (
    ModelRef,
    StepContext,
    adapter_base_dir,
    attempt_tags,
    expert_path,
    local_dir,
    log_expert_start,
    log_split,
    loggable,
    merged_model_tags,
    merged_path,
    own_task_scores,
    publish_checkpoint,
    say,
    staged_checkpoint,
    step_phases,
    task_data,
    train_metrics,
)
from pipeline.learned import align_merged_heads, alignment_inputs, prepare_merge
from pipeline.lineage import TAG_STORE_URI
from pipeline.redact import redact_uri
from pipeline.runtime import peak_rss_bytes, reset_peak_rss, where_am_i
from pipeline.spec import FinetuneSpec, MergeSpec, TaskSpec, Workflow
from pipeline.store import CheckpointStore, content_key

# --- steps ----------------------------------------------------------------------------------------

def finetune_step(ctx: StepContext, task: TaskSpec, start: ModelRef, round_index: int, run_id: str, key: str,
                  settings: FinetuneSpec | None = None, part: str = "all") -> ModelRef:
    """Fine-tune one expert from ``start`` and publish it; logs into ``run_id``.

    ``settings`` default to the task's full budget (one-shot); iterated strategies pass a round's.
    ``part`` picks the training rows (see :func:`task_data`).
    """
    from operators.finetune import total_steps

    step_start = time.perf_counter()
    wf, store, lineage = ctx.workflow, ctx.store(), ctx.lineage()
    settings = settings or wf.finetune_for(task)
    data = task_data(task, part, wf.held_out_fraction, task.dataset.split_seed)
    path = expert_path(store, wf, round_index, task.name, key)
    log_expert_start(lineage, run_id, task, start, settings, data, part, round_index)
    steps = total_steps(len(data.train), settings)
    say(f"[expert {task.name}] round {round_index}: fine-tuning {steps} steps on {len(data.train)} examples")

    pending: list[tuple[int, dict[str, float]]] = []

    def on_log(step: int, metrics: dict[str, float]) -> None:
        pending.append((step, metrics))
        if len(pending) >= 5 or step == steps:  # batch metric writes: fewer round trips to the store
            for s, m in pending:
                lineage.log_metrics(run_id, m, step=s)
            pending.clear()
            say(f"[expert {task.name}] step {step}/{steps} loss {metrics['train_loss']:.4f}")

    lineage.set_tags(run_id, attempt_tags(lineage, run_id))  # where it trains; a retry says what it replaces
    lora = settings.mode == "lora"
    model_id = lineage.create_model(run_id, f"expert-{task.name}", tags={
        "mergeflow.kind": "expert", "mergeflow.task": task.name, "mergeflow.round": str(round_index),
        "mergeflow.format": "peft-lora-adapter" if lora else "full", TAG_STORE_URI: store.uri(path)})
    with staged_checkpoint(store, lineage, model_id, f"expert {task.name!r}", path) as ckpt:
        fetch_seconds = 0.0
        if wf.workers_for(task) > 1:  # a Ray Train worker group (each worker fetches the start model where it
            from pipeline.train import train_across_workers  # runs); rank 0 logs the curve here and scores

            lineage.set_tags(run_id, {"mergeflow.workers": str(wf.workers_for(task)),
                                      "mergeflow.strategy": wf.resources.strategy})
            result, own, evaluate_seconds = train_across_workers(ctx, task, start, settings, part, run_id, key, ckpt)
        else:
            t0 = time.perf_counter()
            start_dir = local_dir(ctx, start)
            fetch_seconds = time.perf_counter() - t0
            result, own, evaluate_seconds = _train_and_score(ctx, task, data, settings, start_dir, ckpt, on_log)
        metrics = train_metrics(result)
        lineage.log_metrics(run_id, metrics, step=round_index)
        # its own task's scores, measured here where the model already is (iterated strategies use them
        # instead of loading the expert again in an evaluation task)
        own_eval = own_task_scores(task, own)
        lineage.log_metrics(run_id, loggable(own_eval), step=round_index, model_id=model_id,
                            dataset=(f"{task.name}-eval", data.digest))
        lineage.set_tags(run_id, {"mergeflow.precision": result.precision, "mergeflow.finetune_mode": settings.mode})
        write_provenance(ckpt, {
            "kind": "expert", "task": task.name, "round": round_index, "workflow": wf.name,
            "spec_hash": wf.spec_hash(), "key": key,
            "parents": [{"kind": start.kind, "uri": start.uri, "key": start.key, "model_id": start.model_id}],
            "format": "peft-lora-adapter" if lora else "full", "task_type": task.type,
            "adapter_base": start.record() if lora else None,
            "finetune": settings.model_dump(mode="json"), "head_init": result.head_init, "precision": result.precision,
            "data": {"source": redact_uri(data.source), "digest": data.digest, "part": part, "train": len(data.train),
                     "eval": len(data.eval)},
            "metrics": {**metrics, **own_eval},
            "mlflow": {"tracking_uri": redact_uri(ctx.tracking_uri), "run_id": run_id, "model_id": model_id},
        })
        t0, logged = time.perf_counter(), lineage.busy_seconds
        location = publish_checkpoint(store, lineage, ckpt, path, model_id=model_id, run_id=run_id,
                                      step=round_index, upload=wf.tracking.log_expert_artifacts)
        publish_seconds = time.perf_counter() - t0 - (lineage.busy_seconds - logged)
    # the whole step on its worker (load, train, score, write, log): what a slot was busy with, and where
    # it went (the metrics below are logged by the last call, whose own time is not in `log`)
    step_seconds = time.perf_counter() - step_start
    phases = step_phases(step_seconds, load=fetch_seconds + result.load_seconds, train=result.seconds,
                         evaluate=evaluate_seconds, write=result.save_seconds + publish_seconds,
                         log=lineage.busy_seconds)
    lineage.log_metrics(run_id, {"step_seconds": step_seconds, **phases}, step=round_index)
    say(f"[expert {task.name}] done in {result.seconds:.1f}s ({result.tokens_per_second:.0f} tokens/s, "
        f"{result.precision}): loss {result.final_loss:.4f}, eval {task.headline_metric} {own['accuracy']:.3f}")
    return ModelRef("expert", task.name, path, store.uri(path), key, run_id, model_id,
                    metrics={**metrics, **own_eval, "own_accuracy": own["accuracy"], "step_seconds": step_seconds,
                             **phases},
                    artifact_location=location,
                    adapter_base=start if lora else None)


def _train_and_score(ctx: StepContext, task: TaskSpec, data: Any, settings: FinetuneSpec, start_dir: Path, ckpt: Path,
                     on_log: Callable[[int, dict[str, float]], None]) -> tuple[Any, dict[str, Any], float]:
    """One worker: fine-tune into ``ckpt``, then score the expert on its own task (the result, the scores,
    the seconds scoring took)."""
    from operators.evaluate import evaluate, score
    from operators.finetune import finetune

    result = finetune(start_dir, data, settings, ckpt, log=on_log, device=ctx.device, torch_threads=ctx.torch_threads,
                      keep_model=True)
    t0 = time.perf_counter()
    if result.model is not None:  # scored as trained, not loaded again from what was just written
        own = score(result.model, result.tokenizer, data, headline=task.headline_metric,
                    max_length=settings.max_length, device=ctx.device)
        result.model = result.tokenizer = None
    else:  # a LoRA expert: as every later reader loads it (adapter folded into its base)
        own = evaluate(ckpt, data, adapter_base=start_dir if settings.mode == "lora" else None,
                       headline=task.headline_metric, max_length=settings.max_length, device=ctx.device)
    return result, own, time.perf_counter() - t0


def merge_statistics_step(ctx: StepContext, base: ModelRef, experts: dict[str, ModelRef], merge: MergeSpec) -> Any:
    """A split merge's whole-model pass (TIES' model-wide top-k, ...), once for every part (None without one)."""
    from operators.merge.engine import whole_model_statistics

    adapter_bases = {t: adapter_base_dir(ctx, e) for t, e in experts.items() if e.adapter_base is not None}
    return whole_model_statistics(local_dir(ctx, base), {t: local_dir(ctx, e) for t, e in experts.items()},
                                  merge.method, merge.params, adapter_bases=adapter_bases or None)


def merge_part_step(ctx: StepContext, base: ModelRef, experts: dict[str, ModelRef], round_index: int, key: str,
                    merge: MergeSpec, part: tuple[int, int], stats: Any = None) -> dict[str, Any]:
    """One worker's part of a merge split across workers (``resources.merge_workers``): it reads only its
    tensors and publishes its output shards to the store beside the merge's path; :func:`merge_step` puts
    the parts together. ``stats``: the method's whole-model pass (:func:`merge_statistics_step`), if it has one.
    Returns the part's store path and what it took (seconds, peak memory, where)."""
    from operators.merge.engine import merge_checkpoints

    reset_peak_rss()  # this step's own peak, not an earlier step's in this reused worker
    store = ctx.store()
    path = f"{merged_path(store, ctx.workflow, round_index, key, merge.method)}.parts/part-{part[0]:03d}-of-{part[1]:03d}"
    if store.is_complete(path) or store.exists(path):  # an earlier attempt's part: merged again, not trusted
        store.discard(path)
    adapter_bases = {t: adapter_base_dir(ctx, e) for t, e in experts.items() if e.adapter_base is not None}
    staging = store.staging_dir()
    try:
        report = merge_checkpoints(local_dir(ctx, base), {t: local_dir(ctx, e) for t, e in experts.items()},
                                   merge.method, merge.params, staging / "part", adapter_bases=adapter_bases or None,
                                   part=part, whole_model_stats=stats)
        store.publish(staging / "part", path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"[merge] part {part[0] + 1} of {part[1]}: {report.tensors} tensors in {report.seconds:.1f}s")
    return {"path": path, "part": part[0], "tensors": report.tensors, "seconds": report.seconds,
            "bytes_read": report.bytes_read, "bytes_written": report.bytes_written, "peak_rss_bytes": peak_rss_bytes(),
            **where_am_i()}


def merge_step(ctx: StepContext, base: ModelRef, experts: dict[str, ModelRef], round_index: int, run_id: str, key: str,
               merge: MergeSpec | None = None, heads_from: ModelRef | None = None,
               statistics: dict[str, str] | None = None, recipe: dict[str, Any] | None = None,
               parts: list[dict[str, Any]] | None = None) -> ModelRef:
    """Merge the experts' bodies (keeping each task's head) and publish the merged checkpoint.

    ``merge`` defaults to the workflow's; ``heads_from`` supplies the heads of tasks no expert
    brings (ColD Fusion's non-contributors keep their latest head). ``statistics``: task → store
    path of its expert's statistics (data-driven methods); a searched parameter is chosen on the
    validation slices first (``pipeline.learned``); ``recipe``: the recipe a recipe search chose (a mergekit
    config and the search's summary), merged with its per-tensor parameters. ``parts``: the records of
    :func:`merge_part_step` for a merge split across workers: they are put together instead of merging here.
    """
    from operators.merge.engine import merge_checkpoints

    wf, store, lineage = ctx.workflow, ctx.store(), ctx.lineage()
    merge = merge or wf.merge
    path = merged_path(store, wf, round_index, key, merge.method)
    adapter_bases = {t: adapter_base_dir(ctx, e) for t, e in experts.items() if e.adapter_base is not None}
    adapter_out = merge.lora.mode == "adapter"
    lineage.log_params(run_id, {"method": merge.method, "params": merge.params, "round": round_index,
                                "lora": merge.lora.model_dump(mode="json") if adapter_bases else "no LoRA experts",
                                "base": base.uri, "experts": {t: e.uri for t, e in sorted(experts.items())},
                                "heads_from": heads_from.uri if heads_from is not None else ""})
    lineage.log_model_inputs(run_id, [e.model_id for e in experts.values() if e.model_id])
    lineage.set_tags(run_id, attempt_tags(lineage, run_id))  # a retry marks the model its dead attempt left FAILED
    model_id = lineage.create_model(run_id, f"{wf.name}-merged", tags=merged_model_tags(
        wf, merge, experts, round_index, store.uri(path), "peft-lora-adapter" if adapter_out else "full"),
        params={"method": merge.method, **merge.params})
    say(f"[merge] round {round_index}: {merge.method} of {', '.join(sorted(experts))}")
    with staged_checkpoint(store, lineage, model_id, f"the merged model ({merge.method})", path) as ckpt:
        # heads: aligned: the inputs each head is aligned on (by a search's candidates, then by the merge)
        align_inputs = alignment_inputs(ctx, merge, experts) if merge.heads.mode == "aligned" else None
        params, learned, learned_metrics, tensor_params = prepare_merge(ctx, merge, base, experts, statistics, run_id,
                                                                        round_index, align_inputs, recipe)
        provenance = {
            "round": round_index, "workflow": wf.name, "strategy": wf.strategy, "spec_hash": wf.spec_hash(),
            "key": key, "heads_from": heads_from.uri if heads_from is not None else None,
            "parents": [{"kind": base.kind, "uri": base.uri, "key": base.key, "model_id": base.model_id}]
            + [{"kind": "expert", "task": t, "uri": e.uri, "key": e.key, "model_id": e.model_id,
                "run_id": e.run_id, "format": "peft-lora-adapter" if e.adapter_base else "full",
                "adapter_base": e.adapter_base.record() if e.adapter_base else None}
               for t, e in sorted(experts.items())],
            "adapter_base": base.record() if adapter_out else None,
            "mlflow": {"tracking_uri": redact_uri(ctx.tracking_uri), "run_id": run_id, "model_id": model_id},
            **({"learned": learned} if learned else {}),
        }
        heads_dir = local_dir(ctx, heads_from) if heads_from is not None and heads_from.path else None
        if parts is not None:
            report, part_metrics = _assemble(ctx, base, experts, parts, ckpt, heads_dir, provenance, run_id)
            learned_metrics = {**learned_metrics, **part_metrics}
        else:
            report = merge_checkpoints(
                local_dir(ctx, base), {t: local_dir(ctx, e) for t, e in experts.items()},
                merge.method, params, ckpt, heads_from=heads_dir,
                adapter_bases=adapter_bases or None, lora_mode=merge.lora.mode, adapter_rank=merge.lora.rank,
                adapter_factorization=merge.lora.factorization, tensor_params=tensor_params, provenance=provenance)
        merge_metrics = {"merge_seconds": report.seconds, "merge_tensors": report.tensors,
                         "merge_bytes_written": report.bytes_written, **learned_metrics}
        if align_inputs is not None:  # before publishing: the published checkpoint carries the aligned heads
            merge_metrics |= align_merged_heads(ctx, merge, base if adapter_out else None, experts, ckpt, run_id,
                                                align_inputs)
        if adapter_out:  # what the adapter-mode factorisation gives up, in relative Frobenius norm
            merge_metrics |= {"adapter_rank": float(report.adapter_rank or 0),
                              "adapter_relative_error": float(report.adapter_error or 0.0),
                              "adapter_worst_module_error": float(report.adapter_worst_module_error or 0.0)}
        lineage.log_metrics(run_id, merge_metrics, step=round_index)
        location = publish_checkpoint(store, lineage, ckpt, path, model_id=model_id, run_id=run_id,
                                      step=round_index, upload=wf.tracking.log_model_artifacts)
    say(f"[merge] done in {report.seconds:.1f}s: {report.tensors} tensors")
    return ModelRef("merged", f"{wf.name}-merged", path, store.uri(path), key, run_id, model_id,
                    artifact_location=location if wf.tracking.log_model_artifacts else None,
                    adapter_base=base if adapter_out else None)


def _assemble(ctx: StepContext, base: ModelRef, experts: dict[str, ModelRef], parts: list[dict[str, Any]], ckpt: Path,
              heads_dir: Path | None, provenance: dict[str, Any], run_id: str) -> tuple[Any, dict[str, float]]:
    """A split merge's parts put together into ``ckpt`` (their shards moved, not copied, on a local store), the
    parts' store directories removed; returns a merge report and each part's metrics (time, peak memory)."""
    from operators.merge.engine import MergeReport
    from operators.merge.split import assemble_parts

    store, lineage = ctx.store(), ctx.lineage()
    parts = sorted(parts, key=lambda r: r["part"])
    dirs = [store.materialize(r["path"]) for r in parts]
    summary = assemble_parts(local_dir(ctx, base), {t: local_dir(ctx, e) for t, e in experts.items()}, dirs, ckpt,
                             heads_from=heads_dir, provenance={**provenance, "parts": [
                                 {k: r[k] for k in ("part", "seconds", "peak_rss_bytes", "mergeflow.host",
                                                    "mergeflow.ray_node_id") if k in r} for r in parts]})
    for r in parts:
        store.discard(r["path"])
    first = summary["parts"][0]
    seconds = max(r["seconds"] for r in parts) + summary["assemble_seconds"]
    report = MergeReport(method=first["method"], params=first["params"], experts=sorted(experts),
                         weights=[first["weights"][t] for t in sorted(experts)], tensors=summary["tensors"],
                         bytes_read=summary["bytes_read"], bytes_written=summary["bytes_written"], seconds=seconds,
                         heads=summary["heads"], output_files=summary["files"])
    nodes = sorted({r.get("mergeflow.ray_node_id", r.get("mergeflow.host", "?")) for r in parts})
    lineage.set_tags(run_id, {"mergeflow.merge_parts": str(len(parts)), "mergeflow.merge_part_nodes": ",".join(nodes)})
    metrics = {"merge_parts": float(len(parts)), "merge_assemble_seconds": summary["assemble_seconds"],
               "merge_part_peak_rss_mb_max": max(r["peak_rss_bytes"] for r in parts) / 2**20}
    for r in parts:
        metrics |= {f"merge_part_{r['part']}_seconds": r["seconds"],
                    f"merge_part_{r['part']}_peak_rss_mb": r["peak_rss_bytes"] / 2**20}
    return report, metrics


def evaluate_step(ctx: StepContext, model: ModelRef, head_sources: dict[str, ModelRef], run_id: str,
                  round_index: int, prefix: str = "eval") -> dict[str, dict[str, float]]:
    """Score ``model``'s body with each task's head (from ``head_sources``) on those tasks.

    Each score is kept in the store under its content key (:func:`evaluation_key`): a later run that
    scores the same body with the same head on the same data (the experts of a re-run or of another
    merge of them, an unchanged champion) reuses it, with a ``mergeflow.evaluation.<task>.reused_from``
    tag naming the run that measured it.
    """
    from operators.evaluate import evaluate

    wf, lineage, store = ctx.workflow, ctx.lineage(), ctx.store()
    body: Path | None = None
    adapter_base: Path | None = None
    results: dict[str, dict[str, float]] = {}
    reused: dict[str, str] = {}
    for task in (t for t in wf.tasks if t.name in head_sources):
        data = task_data(task)
        head = head_sources[task.name] if task.type == "classification" else None  # causal LMs: the whole model
        settings = {"headline": task.headline_metric, "max_length": wf.finetune_for(task).max_length}

        def score(task=task, data=data, head=head, settings=settings) -> dict[str, float]:
            nonlocal body, adapter_base
            if body is None:
                body, adapter_base = local_dir(ctx, model), adapter_base_dir(ctx, model)
            head_dir = local_dir(ctx, head) if head is not None else None
            return evaluate(body, data, head_from=None if head_dir == body else head_dir, adapter_base=adapter_base,
                            headline=settings["headline"], max_length=settings["max_length"], device=ctx.device)

        key = evaluation_key(model, head, task, data.digest, settings, ctx.device)
        m, source, _ = kept_measurement(
            store, measurement_path(store, wf, "evaluations", task.name, key), key, run_id, "score", score,
            {"task": task.name, "model": model.record(), "head": head.record() if head else None,
             "settings": settings, "workflow": wf.name, "data_digest": data.digest})
        if source is not None:
            reused[task.name] = source
        results[task.name] = m
        if model.kind != "expert":  # an expert's run already lists its own splits as inputs
            log_split(lineage, run_id, task, data, "eval")
        lineage.log_metrics(run_id, {f"{prefix}/{task.name}/{k}": v for k, v in m.items() if k != "n"},
                            step=round_index, model_id=model.model_id, dataset=(f"{task.name}-eval", data.digest))
    if reused:
        lineage.set_tags(run_id, {f"mergeflow.evaluation.{t}.reused_from": r for t, r in reused.items()})
    say(f"[evaluate {model.kind} {model.name}] " + ", ".join(f"{t}={m['accuracy']:.3f}" for t, m in results.items())
        + (f" (reused from the store: {', '.join(sorted(reused))})" if reused else ""))
    return results


def lm_eval_step(ctx: StepContext, model: ModelRef, run_id: str, round_index: int,
                 prefix: str = "lm_eval") -> dict[str, Any]:
    """Score ``model`` with lm-evaluation-harness (``evaluation.lm_eval``): its metrics go to ``run_id`` as
    ``<prefix>/<task>/<metric>`` (for the model's LoggedModel too), the harness' record as ``<prefix>.json``."""
    from operators.harness import lm_eval_scores

    spec, lineage = ctx.workflow.evaluation.lm_eval, ctx.lineage()
    scores = lm_eval_scores(local_dir(ctx, model), spec.tasks, adapter_base=adapter_base_dir(ctx, model),
                            include_path=spec.include_path, limit=spec.limit, num_fewshot=spec.num_fewshot,
                            batch_size=spec.batch_size, device=ctx.device, seed=ctx.workflow.finetune.seed)
    lineage.log_metrics(run_id, scores.flat(prefix), step=round_index, model_id=model.model_id)
    lineage.log_dict(run_id, {"model": model.record(), **scores.record()}, f"{prefix.replace('/', '_')}.json")
    say(f"[lm-eval {model.kind} {model.name}] " + ", ".join(
        f"{t}: " + " ".join(f"{m}={v:.3f}" for m, v in ms.items() if not m.endswith("_stderr"))
        for t, ms in scores.scores.items()))
    return scores.record()


# --- measurements kept in the store (baselines, scores), found again by their content key ------------------
def measurement_path(store: CheckpointStore, wf: Workflow, kind: str, task: str, key: str) -> str:
    """Where a measurement is kept: ``<workflow>/<kind>/<task>-<key>.json``, beside the workflow's rounds, so
    re-runs of it and its ``compare`` variants (which share its name and store) find it, as they find its
    experts."""
    return store.path(wf.name, kind, f"{task}-{key}.json")


def kept_measurement(store: CheckpointStore, path: str, key: str, run_id: str, what: str,
                     measure: Callable[[], dict[str, float]], record: dict[str, Any],
                     ) -> tuple[dict[str, float], str | None, float]:
    """The metrics kept at ``path`` for ``key``, or ``measure()`` kept there for the next run.

    Returns the metrics, the run that measured them when they were reused (``None``: measured by this
    call, or by this run before a retry) and the seconds measuring took. A record that cannot be read, or
    is not this key's, is measured again and rewritten; one that cannot be written costs the next run a
    measurement, nothing more.
    """
    try:
        kept = store.read_record(path)
    except Exception as exc:  # unreadable (not JSON, a store error)
        say(f"[{what}] {store.uri(path)} could not be read ({exc}): measured again")
        kept = None
    metrics = kept.get("metrics") if isinstance(kept, dict) and kept.get("key") == key else None
    if isinstance(metrics, dict) and isinstance(metrics.get("accuracy"), float | int):
        source = kept.get("run_id") or ""
        return metrics, None if source == run_id else source, float(kept.get("seconds", 0.0))
    if kept is not None:
        say(f"[{what}] {store.uri(path)} is not a record of this key: measured again, and rewritten")
    start = time.perf_counter()
    metrics = measure()
    seconds = time.perf_counter() - start
    try:
        store.write_record(path, {**record, "key": key, "metrics": metrics, "run_id": run_id, "seconds": seconds,
                                  "where": where_am_i()})
    except Exception as exc:  # a full or read-only store: the measurement stands, the next run repeats it
        say(f"[{what}] could not keep the measurement at {store.uri(path)} ({exc})")
    return metrics, None, seconds


def _versions(device: str) -> list[str]:
    """What moves a measurement beyond float rounding: torch's and transformers' versions, CPU or GPU."""
    import torch
    import transformers

    return [torch.__version__, transformers.__version__, device.split(":")[0]]


def evaluation_key(model: ModelRef, head: ModelRef | None, task: TaskSpec, data_digest: str,
                   settings: dict[str, Any], device: str) -> str:
    """The content key of a score: the body's key (and its adapter's start), the head's, the task's labels
    and data, how it is scored, and :func:`_versions`."""
    return content_key("evaluation", EVALUATION_VERSION, model.key,
                       model.adapter_base.key if model.adapter_base else "", head.key if head else "", task.type,
                       task.label_names, data_digest, settings, *_versions(device))


EVALUATION_VERSION = 1  # bump when scoring changes, so scores kept by the old code are not reused


# what a baseline measurement is made with, beside its model, data and settings: bump it when the probe's
# algorithm changes, so records made by the old one are not reused
PROBE_VERSION = 1
PROBE_STEPS, PROBE_LR = 300, 1e-2  # the linear probe's full-batch Adam steps and learning rate


def probe_settings(task: TaskSpec, wf: Workflow) -> dict[str, Any]:
    """What one task's baseline is measured with: ``linear_probe``'s arguments (``evaluate``'s for a causal LM)."""
    if task.type == "causal_lm":
        return {"headline": task.headline_metric, "max_length": wf.finetune_for(task).max_length}
    return {"max_length": wf.finetune.max_length, "seed": wf.finetune.seed, "steps": PROBE_STEPS, "lr": PROBE_LR}


def probe_key(model: ModelRef, task: TaskSpec, data_digest: str, wf: Workflow, device: str) -> str:
    """The content key of one task's baseline of ``model``: the model's key, the task's labels and data, the
    probe's settings, and :func:`_versions`. Like an expert's key, it leaves out what only moves float
    rounding (torch's threads, the CPU's model): a run on one thread reuses what a run on two measured, and
    the record says where that was."""
    return content_key("probe", PROBE_VERSION, model.key, task.type, task.label_names, data_digest,
                       probe_settings(task, wf), *_versions(device))


def probe_step(ctx: StepContext, base: ModelRef, run_id: str, round_index: int,
               tasks: list[str] | None = None) -> dict[str, dict[str, float]]:
    """The baseline of every task (or of ``tasks``): a linear probe (head only, body frozen) of the base model.

    Causal-LM tasks have no head to probe: their baseline is the base model itself, as it is. Each task's
    result is kept in the store under its content key (:func:`probe_key`, :func:`kept_measurement`), so a
    later run of the same model, data and settings (a re-run, another merge of the same experts, ``mergeflow
    compare``) reuses it: its run gets the same metrics and a ``mergeflow.baseline.<task>.reused_from`` tag
    naming the run that measured it.
    """
    from operators.evaluate import evaluate, linear_probe

    wf, lineage, store = ctx.workflow, ctx.lineage(), ctx.store()
    body: Path | None = None
    results, reused = {}, {}
    start = time.perf_counter()
    for task in [t for t in wf.tasks if tasks is None or t.name in tasks]:
        data = task_data(task)
        settings = probe_settings(task, wf)

        def probe(task=task, data=data, settings=settings) -> dict[str, float]:
            nonlocal body
            body = body or local_dir(ctx, base)
            if task.type == "causal_lm":
                return evaluate(body, data, headline=settings["headline"], max_length=settings["max_length"],
                                device=ctx.device)
            return linear_probe(body, data, max_length=settings["max_length"], seed=settings["seed"],
                                steps=settings["steps"], lr=settings["lr"], device=ctx.device)

        key = probe_key(base, task, data.digest, wf, ctx.device)
        m, source, seconds = kept_measurement(
            store, measurement_path(store, wf, "baselines", task.name, key), key, run_id, "probe", probe,
            {"task": task.name, "model": base.record(), "settings": settings, "workflow": wf.name,
             "data_digest": data.digest})
        if source is not None:
            reused[task.name] = source
        results[task.name] = m
        log_split(lineage, run_id, task, data, "eval")
        lineage.log_metrics(run_id, {**{f"probe/{task.name}/{k}": v for k, v in m.items() if k != "n"},
                                     **({} if task.name in reused else {f"probe/{task.name}/seconds": seconds})},
                            step=round_index, dataset=(f"{task.name}-eval", data.digest))
    if reused:
        lineage.set_tags(run_id, {f"mergeflow.baseline.{t}.reused_from": r for t, r in reused.items()})
    say(f"[probe] linear probe of the {base.kind} model in {time.perf_counter() - start:.1f}s: "
        + ", ".join(f"{t}={m['accuracy']:.3f}" for t, m in results.items())
        + (f" (reused from the store: {', '.join(sorted(reused))})" if reused else ""))
    return results


