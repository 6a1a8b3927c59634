"""Resident rounds: the steps a resident worker runs (``rounds.workers: resident``).

A resident worker is one long-lived process per slot (a Ray actor; in process, the driver itself).
It keeps, per task it trains, the task model, its tokenizer and its data in this module's cache, so
a round costs its training and little else:

- a round's start weights arrive once, as a checkpoint held in memory (``StateCheckpoint``) in Ray's
  object store, and are copied into the kept model (no store read, no model build);
- an expert's weights go back to the object store, not to the store; the round's merge reads them
  there and merges in memory (``merge_states``: the same method functions over the same blocks as the
  streaming engine, so the same weights bit for bit);
- only a checkpointed round (``rounds.checkpoint_every``, and always the last) writes its merged
  model to the store, with its LoggedModel, and is scored: its experts where they were trained, the
  merged model on each task's worker.

LoRA experts (classification or causal LM) train adapters on the kept model: the expert that goes to
the object store is its adapter (``AdapterCheckpoint``: A and B, and a classification head; kilobytes
to a few MB, not a copy of the model), the adapter is then unloaded, so the kept model holds the
round's start weights untouched, and the merge folds each adapter into the round's start exactly as
the streaming engine folds an adapter directory.

Fine-tuning is the same ``operators.finetune.finetune`` loop from the same weights with the same seed,
so a resident expert is bit for bit the task step's expert (``tests/test_resident.py`` checks it).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from operators.state import AdapterCheckpoint, StateCheckpoint
from pipeline.context import (
    ModelRef,
    StepContext,
    attempt_tags,
    base_ref,
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
from pipeline.redact import redact_uri
from pipeline.runtime import WithState
from pipeline.spec import FinetuneSpec, MergeSpec, TaskSpec

# (base files, task, labels) → (model, tokenizer): this process's models, kept from one round to the next
_MODELS: dict[tuple[str, str, tuple[str, ...]], tuple[Any, Any]] = {}


def _kept(files, task: TaskSpec) -> tuple[str, str, tuple[str, ...]]:
    return str(files), task.name, tuple(task.label_names)


def memory_uri(ctx: StepContext, round_index: int, what: str, key: str) -> str:
    """How lineage names a checkpoint that lived only in memory (a round between checkpoints)."""
    return f"memory://{ctx.workflow.name}/round-{round_index:03d}/{what}-{key}"


def _files(ctx: StepContext):
    """This node's copy of the base's config and tokenizer files, which every round's checkpoint shares."""
    return local_dir(ctx, base_ref(ctx.workflow))


# the checkpoints this process read last (a round's start weights are read by its training, its merge and
# its scoring on one worker): object-store key or store URI → checkpoint; never changed in place
_READ: dict[str, StateCheckpoint] = {}


def _remember(key: str, read) -> StateCheckpoint:
    if key not in _READ:
        while len(_READ) >= 2:
            _READ.pop(next(iter(_READ)))
        _READ[key] = read()
    return _READ[key]


def start_state(ctx: StepContext, ref: ModelRef) -> StateCheckpoint | None:
    """The weights of ``ref``: from the object store when it lives in memory, else ``None`` (read from the store)."""
    if ref.state is None:
        return None
    state = _remember(ref.state.key, ref.state.get)
    state.files = _files(ctx)
    return state


def stored_state(ctx: StepContext, ref: ModelRef) -> StateCheckpoint:
    """``ref``'s weights, from the object store or read from the checkpoint store (a published
    checkpoint never changes: it is read once)."""
    return start_state(ctx, ref) or _remember(
        ref.uri, lambda: StateCheckpoint.read(local_dir(ctx, ref), files=_files(ctx)))


def _task_model(ctx: StepContext, task: TaskSpec, state: StateCheckpoint, seed: int):
    """The kept model of ``task`` holding ``state``'s weights (body and ``task``'s head; a causal LM: the
    whole model), its tokenizer, and whether its head is fresh.

    A state without a head for the task (a ColD Fusion task that has not contributed yet) gets a
    fresh seeded head, drawn as a task step's load draws it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from operators.checkpoint import load_task_model, quiet_transformers
    from operators.finetune import lm_tokenizer

    lm = task.type != "classification"
    kept = _MODELS.get(_kept(state.files, task))
    if kept is not None and (lm or task.name in state.heads):
        state.load_into(kept[0], task.name)
        return (*kept, False)
    torch.manual_seed(seed)  # as finetune() seeds before it loads: a fresh head is the task step's head
    if lm:
        quiet_transformers()
        model = AutoModelForCausalLM.from_pretrained(str(state.files))
        state.load_body_into(model)
        tokenizer = kept[1] if kept is not None else lm_tokenizer(state.files)
        _MODELS[_kept(state.files, task)] = (model.eval(), tokenizer)
        return model, tokenizer, False
    model = load_task_model(state.files, None, label_names=task.label_names)
    if task.name in state.heads:
        state.load_into(model, task.name)
    else:
        state.load_body_into(model)
    tokenizer = kept[1] if kept is not None else AutoTokenizer.from_pretrained(str(state.files))
    _MODELS[_kept(state.files, task)] = (model, tokenizer)
    return model, tokenizer, task.name not in state.heads


def finetune_step(ctx: StepContext, task: TaskSpec, start: ModelRef, round_index: int, run_id: str, key: str,
                  settings: FinetuneSpec, part: str, scored: bool) -> WithState:
    """Fine-tune one expert of a round on this worker; its weights stay in memory.

    ``scored``: a checkpointed round; the expert is scored on its own task here, where it is, and its
    run lists the task's datasets. Returns the expert's reference and (as its state) its weights.
    """
    from operators.evaluate import score
    from operators.finetune import finetune

    step_start = time.perf_counter()
    wf, lineage = ctx.workflow, ctx.lineage()
    data = task_data(task, part, wf.held_out_fraction, task.dataset.split_seed)
    log_expert_start(lineage, run_id, task, start, settings, data, part, round_index, datasets=scored,
                     workers="resident")
    lineage.set_tags(run_id, {**attempt_tags(lineage, run_id), "mergeflow.finetune_mode": settings.mode})
    t0 = time.perf_counter()
    state = start_state(ctx, start)
    if state is None:  # the base, or a checkpointed round's merged model: read from the store as a task step does
        init, model, tokenizer, fresh = local_dir(ctx, start), None, None, False
    else:
        init = state.files
        model, tokenizer, fresh = _task_model(ctx, task, state, settings.seed)
    fetch_seconds = time.perf_counter() - t0
    try:  # a failure leaves the kept model half-trained or still wrapped by peft: build it again next time
        result = finetune(init, data, settings, None, device=ctx.device, torch_threads=ctx.torch_threads,
                          keep_model=True, model=model, tokenizer=tokenizer, fresh_head=fresh)
        lora = settings.mode == "lora"
        t0 = time.perf_counter()
        # a LoRA expert is scored with its adapter applied (peft's forward), not folded into the start weights:
        # the kept model's weights must stay the round's start, bit for bit
        own = score(result.model, result.tokenizer, data, headline=task.headline_metric,
                    max_length=settings.max_length, device=ctx.device) if scored else {}
        result.model.to("cpu")  # kept on the CPU between rounds (scoring moved it to the device)
        evaluate_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        if lora:  # the expert is its adapter (and head); the task model goes back to its start weights
            expert = AdapterCheckpoint.of_peft_model(result.model, task.name, causal_lm=data.is_lm)
            net = result.model.unload()
        else:
            net = result.model
            expert = StateCheckpoint.of_model(net, task.name, init, causal_lm=data.is_lm)
    except BaseException:
        _MODELS.pop(_kept(_files(ctx), task), None)
        raise
    _MODELS[_kept(_files(ctx), task)] = (net, result.tokenizer)  # kept for the next round
    copy_seconds = time.perf_counter() - t0
    metrics = train_metrics(result)
    own_eval = own_task_scores(task, own)
    step_seconds = time.perf_counter() - step_start
    phases = step_phases(step_seconds, load=fetch_seconds + result.load_seconds, train=result.seconds,
                         evaluate=evaluate_seconds, write=copy_seconds, log=lineage.busy_seconds)
    lineage.log_metrics(run_id, {**metrics, **loggable(own_eval), "step_seconds": step_seconds, **phases},
                        step=round_index)
    say(f"[expert {task.name}] round {round_index}: {result.steps} steps in {result.seconds:.1f}s on a resident "
        f"worker, loss {result.final_loss:.4f}" + (f", eval {task.headline_metric} {own['accuracy']:.3f}" if own else ""))
    ref = ModelRef("expert", task.name, "", memory_uri(ctx, round_index, f"experts/{task.name}", key), key, run_id,
                   metrics={**metrics, **own_eval, "step_seconds": step_seconds, **phases}
                   | ({"own_accuracy": own["accuracy"]} if own else {}),
                   adapter_base=dataclasses.replace(start, state=None) if lora else None)
    return WithState(ref, expert)


def _merge(ctx: StepContext, base: ModelRef, experts: dict[str, ModelRef], merge: MergeSpec,
           heads_from: ModelRef | None, part: tuple[int, int] | None):
    from operators.merge.engine import merge_states

    # a LoRA expert's full weights are its start's plus its update: the round's start, which is the merge's
    # base, or (task vectors from the original base) the model whose heads the round keeps, held in memory
    def start_of(e: ModelRef) -> StateCheckpoint:
        held = heads_from if heads_from is not None and heads_from.key == e.adapter_base.key else e.adapter_base
        return stored_state(ctx, held)

    starts = {t: start_of(e) for t, e in experts.items() if e.adapter_base is not None and e.adapter_base.key != base.key}
    heads = heads_from is not None and (part is None or part[0] == 0)  # the heads travel with the first part
    return merge_states(stored_state(ctx, base), {t: e.state.get() for t, e in experts.items()},
                        merge.method, merge.params, adapter_bases=starts or None, part=part,
                        heads_from=stored_state(ctx, heads_from) if heads else None)


def merge_part(ctx: StepContext, base: ModelRef, experts: dict[str, ModelRef], merge: MergeSpec,
               heads_from: ModelRef | None, part: tuple[int, int]) -> WithState:
    """Merge one run of the model's tensors (``part``: i of n) on this worker, while the others merge theirs;
    its tensors stay in the object store for the round's merge step and the next round."""
    merged, report = _merge(ctx, base, experts, merge, heads_from, part)
    say(f"[merge] part {part[0] + 1} of {part[1]}: {report.tensors} tensors in {report.seconds:.2f}s")
    return WithState(report.seconds, merged)


def merge_step(ctx: StepContext, base: ModelRef, experts: dict[str, ModelRef], round_index: int, run_id: str,
               key: str, merge: MergeSpec, heads_from: ModelRef | None, durable: bool,
               parts: list[Any] | None = None) -> WithState:
    """Merge a round's experts in memory; a checkpointed round (``durable``) also publishes the merge to
    the store with its LoggedModel, in the order that loses nothing (``publish_checkpoint``).

    ``parts``: the other workers merge the rest of the tensors at the same time (``merge_part``; their
    handles here); this step merges the first run and the heads, and a checkpointed round waits for
    the rest to write the whole model. What it keeps in the object store is then its own part.
    """
    wf, store, lineage = ctx.workflow, ctx.store(), ctx.lineage()
    lineage.log_params(run_id, {"method": merge.method, "params": merge.params, "round": round_index,
                                "base": base.uri, "experts": {t: e.uri for t, e in sorted(experts.items())},
                                "heads_from": heads_from.uri if heads_from is not None else "",
                                "workers": "resident", "merged_in_parts": 1 + len(parts or [])})
    merged, report = _merge(ctx, base, experts, merge, heads_from, (0, 1 + len(parts)) if parts else None)
    merged.files = _files(ctx)
    own = merged
    if parts and durable:  # the whole model, to write it: the other parts, mapped from the object store
        merged = merged.with_parts([p.get() for p in parts])
    metrics = {"merge_seconds": report.seconds, "merge_tensors": report.tensors}
    path, uri, model_id, location = "", memory_uri(ctx, round_index, f"merged/{merge.method}", key), None, None
    if durable:
        path = merged_path(store, wf, round_index, key, merge.method)
        uri = store.uri(path)
        lineage.set_tags(run_id, attempt_tags(lineage, run_id))  # a retry marks the model its dead attempt left FAILED
        model_id = lineage.create_model(run_id, f"{wf.name}-merged",
                                        tags=merged_model_tags(wf, merge, experts, round_index, uri, "full"),
                                        params={"method": merge.method, **merge.params})
        lineage.log_model_inputs(run_id, [e.model_id for e in experts.values() if e.model_id])
        t0 = time.perf_counter()
        with staged_checkpoint(store, lineage, model_id, f"the merged model ({merge.method})", path) as ckpt:
            merged.write(ckpt, provenance={
                "kind": "merged", "method": merge.method, "params": report.params,
                "weights": dict(zip(report.experts, report.weights, strict=True)),
                "round": round_index, "workflow": wf.name, "strategy": wf.strategy, "spec_hash": wf.spec_hash(),
                "key": key, "workers": "resident", "heads_from": heads_from.uri if heads_from is not None else None,
                **({"lora": {"mode": "exact"}} if report.lora_mode else {}),
                "parents": [{"kind": base.kind, "uri": base.uri, "key": base.key, "model_id": base.model_id}]
                + [{"kind": "expert", "task": t, "uri": e.uri, "key": e.key, "run_id": e.run_id, "in_memory": True,
                    "format": "peft-lora-adapter" if e.adapter_base else "full",
                    "adapter_base": e.adapter_base.record() if e.adapter_base else None, "metrics": e.metrics}
                   for t, e in sorted(experts.items())],
                "mlflow": {"tracking_uri": redact_uri(ctx.tracking_uri), "run_id": run_id, "model_id": model_id},
            })
            location = publish_checkpoint(store, lineage, ckpt, path, model_id=model_id, run_id=run_id,
                                          step=round_index, upload=wf.tracking.log_model_artifacts)
        metrics["merge_write_seconds"] = time.perf_counter() - t0
    lineage.log_metrics(run_id, metrics, step=round_index)
    say(f"[merge] round {round_index}: {merge.method} of {', '.join(sorted(experts))} in memory in "
        f"{report.seconds:.2f}s" + (f" ({1 + len(parts)} workers)" if parts else "")
        + (f", written to {uri}" if durable else ""))
    ref = ModelRef("merged", f"{wf.name}-merged", path, uri, key, run_id, model_id,
                   artifact_location=location if wf.tracking.log_model_artifacts else None)
    return WithState(ref, own)


def evaluate_step(ctx: StepContext, model: ModelRef, task: TaskSpec, run_id: str, round_index: int
                  ) -> dict[str, dict[str, float]]:
    """Score ``model`` on ``task`` with ``task``'s head, in the task's kept model on its worker."""
    from operators.evaluate import score

    wf, lineage = ctx.workflow, ctx.lineage()
    data = task_data(task)
    state = stored_state(ctx, model)
    net, tokenizer, _ = _task_model(ctx, task, state, wf.finetune_for(task).seed)
    m = score(net, tokenizer, data, headline=task.headline_metric, max_length=wf.finetune_for(task).max_length,
              device=ctx.device)
    net.to("cpu")  # kept on the CPU between rounds
    log_split(lineage, run_id, task, data, "eval")
    lineage.log_metrics(run_id, {f"eval/{task.name}/{k}": v for k, v in m.items() if k != "n"}, step=round_index,
                        model_id=model.model_id, dataset=(f"{task.name}-eval", data.digest))
    say(f"[evaluate {model.kind} {model.name}] {task.name}={m['accuracy']:.3f} on a resident worker")
    return {task.name: m}
