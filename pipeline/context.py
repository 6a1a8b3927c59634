"""What every step stands on: its context, references to models, their keys and paths in the store, each
task's data, and the one order in which a checkpoint is published.

Both kinds of worker use these: task workers (``pipeline.steps``: a Ray task per step, through the store)
and resident workers (``pipeline.resident``: long-lived workers that keep models in memory); the driver
uses the keys and paths to find finished work.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from operators.checkpoint import resolve_model_path
from operators.checkpoint_files import read_provenance
from operators.data import TaskData, hold_out, load_task_data
from pipeline.lineage import TAG_STORE_URI, Lineage
from pipeline.runtime import where_am_i
from pipeline.spec import FinetuneSpec, MergeSpec, TaskSpec, Workflow
from pipeline.store import CheckpointStore, StoreFull, content_key, out_of_space, store_full_error


@dataclass(frozen=True)
class StepContext:
    """Everything a step needs to find its inputs and record its lineage."""

    workflow: Workflow
    tracking_uri: str
    experiment_id: str
    workflow_run_id: str
    base_ref: str  # the workflow's base model: packaged:NAME, a local dir, or a store path

    def store(self) -> CheckpointStore:
        return CheckpointStore(self.workflow.store.root)

    def lineage(self) -> Lineage:
        return Lineage(self.tracking_uri, self.experiment_id, self.workflow.tracking.retry_seconds)

    @property
    def device(self) -> str:
        return "cuda" if self.workflow.resources.num_gpus > 0 else "cpu"

    @property
    def torch_threads(self) -> int:
        r = self.workflow.resources
        return r.torch_threads or max(1, int(r.num_cpus))


@dataclass
class ModelRef:
    """A checkpoint in the store, and the MLflow run and LoggedModel that made it."""

    kind: str  # "base" | "expert" | "merged"
    name: str
    path: str  # path inside the store's filesystem ("" for the base)
    uri: str
    key: str
    run_id: str | None = None
    model_id: str | None = None
    reused: bool = False
    metrics: dict[str, float] = field(default_factory=dict)
    artifact_location: str | None = None
    adapter_base: ModelRef | None = None  # a LoRA adapter's full start checkpoint (None: a full checkpoint)
    state: Any = field(default=None, repr=False, compare=False)  # resident rounds: its weights in memory (StateHandle)

    def record(self) -> dict[str, str | None]:
        """How provenance names this checkpoint (enough to find it again in the store)."""
        return {"kind": self.kind, "name": self.name, "path": self.path, "uri": self.uri, "key": self.key,
                "model_id": self.model_id, "run_id": self.run_id}


@functools.lru_cache(maxsize=32)
def _task_data_cached(task_json: str) -> TaskData:
    task = TaskSpec.model_validate_json(task_json)
    return load_task_data(task.name, task.dataset, task.label_names, task.type)


def task_data(task: TaskSpec, part: str = "all", validation_fraction: float = 0.0, seed: int = 0) -> TaskData:
    """Load (and cache per process) one task's data.

    ``part``: ``all`` (the train split), or, with a validation slice held out of the train split,
    ``fit`` (train minus the slice) or ``validation`` (the slice), for ATM on validation data.
    """
    data = _task_data_cached(task.model_dump_json())
    if part == "all":
        return data
    fit, val = hold_out(data, validation_fraction, seed)
    return fit if part == "fit" else val


def local_dir(ctx: StepContext, ref: ModelRef) -> Path:
    """A local directory for a model reference (the packaged/local base, or a store checkpoint)."""
    if ref.kind == "base":
        return resolve_model_path(ref.uri) if not ref.path else ctx.store().materialize(ref.path)
    return ctx.store().materialize(ref.path)


def adapter_base_dir(ctx: StepContext, ref: ModelRef) -> Path | None:
    """The local full checkpoint a LoRA adapter was trained from (None for a full checkpoint)."""
    return local_dir(ctx, ref.adapter_base) if ref.adapter_base is not None else None


@contextlib.contextmanager
def staged_checkpoint(store: CheckpointStore, lineage: Lineage, model_id: str, what: str, path: str) -> Iterator[Path]:
    """A local directory to write a new checkpoint into; its LoggedModel is marked FAILED on error.

    The staging directory is removed afterwards whatever happens (a published checkpoint has
    been moved out of it by then). A full disk while writing ``what`` (bound for ``path``) is
    raised as :class:`StoreFull`, which says so and what to do.
    """
    staging = None
    try:
        staging = store.staging_dir()
        yield staging / "ckpt"
    except BaseException as exc:
        lineage.fail_model(model_id)
        if out_of_space(exc) and not isinstance(exc, StoreFull):
            raise store_full_error(what, store.uri(path), exc) from exc
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def publish_checkpoint(store: CheckpointStore, lineage: Lineage, ckpt: Path, path: str, *, model_id: str,
                       run_id: str, step: int, upload: bool) -> str:
    """The one order that loses nothing: upload to MLflow (optional), publish atomically to the store,
    then mark the LoggedModel READY. A crash before the end leaves a PENDING/FAILED model and no
    visible checkpoint, never a READY model or a registry version without its weights.

    Returns:
        The LoggedModel's artifact location.
    """
    if upload:
        lineage.upload_model_artifacts(model_id, ckpt)
    store.publish(ckpt, path)
    return lineage.finalize_model(model_id, run_id=run_id, step=step)


def say(msg: str) -> None:
    print(msg, flush=True)
    sys.stdout.flush()


# --- keys and paths (also used by the driver to find finished work) ------------------------------

def expert_key(start: ModelRef, task: TaskSpec, settings: FinetuneSpec, data_digest: str, workers: int = 1,
               strategy: str = "ddp") -> str:
    # fields added later are left out at their default, so experts already in a store keep their keys
    finetune = settings.model_dump(mode="json", exclude={"sharpness"} if settings.sharpness is None else set())
    # several workers train the one-worker expert to float rounding only: another key, not a reuse of it
    parallel = [f"{workers} workers, {strategy}"] if workers > 1 else []
    spec = task.model_dump(mode="json", exclude={"workers"})  # (how many workers: below, beside the settings)
    return content_key("expert", start.key, spec, finetune, data_digest, *parallel)


def expert_path(store: CheckpointStore, workflow: Workflow, round_index: int, task: str, key: str) -> str:
    return store.path(workflow.name, f"round-{round_index:03d}", "experts", f"{task}-{key}")


def merged_key(base: ModelRef, experts: dict[str, ModelRef], merge: MergeSpec, heads_from: ModelRef | None = None) -> str:
    # fields added later are left out at their default, so merges already in a store keep their keys
    # (refit_heads only scores the merge: it never changes the merged checkpoint)
    spec = merge.model_dump(mode="json", exclude={"refit_heads"} | (
        {"validation_fraction"} if merge.validation_fraction is None else set()) | (
        {"heads"} if merge.heads.mode == "experts" else set()) | ({"recipe"} if merge.recipe is None else set()))
    return content_key("merged", base.key, {t: e.key for t, e in sorted(experts.items())}, spec,
                       heads_from.key if heads_from is not None else "")


def merged_path(store: CheckpointStore, workflow: Workflow, round_index: int, key: str, method: str | None = None) -> str:
    return store.path(workflow.name, f"round-{round_index:03d}", "merged", f"{method or workflow.merge.method}-{key}")


def ref_from_store(store: CheckpointStore, path: str, kind: str, name: str, key: str) -> ModelRef:
    """Rebuild a reference to a finished checkpoint from its provenance (for resume and reuse)."""
    prov = read_provenance(store.materialize(path))
    mlflow_ids = prov.get("mlflow", {})
    return ModelRef(kind=kind, name=name, path=path, uri=store.uri(path), key=key,
                    run_id=mlflow_ids.get("run_id"), model_id=mlflow_ids.get("model_id"), reused=True,
                    metrics=prov.get("metrics", {}), artifact_location=mlflow_ids.get("artifact_location"),
                    adapter_base=_ref_from_record(prov.get("adapter_base")))


def _ref_from_record(rec: dict | None) -> ModelRef | None:
    if not rec:
        return None
    return ModelRef(kind=rec["kind"], name=rec.get("name") or rec["kind"], path=rec.get("path") or "", uri=rec["uri"],
                    key=rec["key"], run_id=rec.get("run_id"), model_id=rec.get("model_id"), reused=True)


def train_metrics(result) -> dict[str, float]:
    """What an expert's run records of its fine-tuning (a ``FinetuneResult``)."""
    metrics = {"train_final_loss": result.final_loss, "train_mean_loss": result.mean_loss,
               "train_seconds": result.seconds, "train_steps": float(result.steps),
               "train_tokens": float(result.tokens_seen), "train_tokens_per_second": result.tokens_per_second,
               "train_examples_per_second": result.examples_seen / max(result.seconds, 1e-9),
               "trainable_parameters": float(result.trainable_parameters)}
    if result.peak_gpu_bytes:
        metrics["train_peak_gpu_bytes"] = float(result.peak_gpu_bytes)
    return metrics


def attempt_tags(lineage: Lineage, run_id: str) -> dict[str, str]:
    """Where this attempt of a step runs (host, Ray node and task) and which attempt it is.

    The run was made by the driver; an earlier attempt that tagged it and is not here any more died
    mid-step (Ray retries a task only when its worker dies): this one says so, and the model that
    attempt left PENDING is marked FAILED.
    """
    here = where_am_i()
    before = lineage.run_tags(run_id)
    if "mergeflow.host" not in before:
        return {**here, "mergeflow.attempt": "1"}
    attempt = int(before.get("mergeflow.attempt", "1")) + 1
    failed = lineage.fail_pending_models(run_id)
    say(f"[attempt {attempt}] run {run_id}: attempt {attempt - 1} died mid-step; {failed} model(s) it left "
        "PENDING marked FAILED")
    return {**here, "mergeflow.attempt": str(attempt),
            "mergeflow.retried_after": f"attempt {attempt - 1} on {before['mergeflow.host']} (Ray node "
                                       f"{before.get('mergeflow.ray_node_id', '?')}) died mid-step; Ray retried it"}



def base_ref(ctx_workflow: Workflow) -> ModelRef:
    """A reference to the workflow's base model; its key hashes the reference and its config."""
    path = resolve_model_path(ctx_workflow.base_model)
    cfg = (path / "config.json").read_text()
    weights = sorted(p.name + ":" + str(p.stat().st_size) for p in path.glob("*.safetensors"))
    return ModelRef("base", "base", "", ctx_workflow.base_model, content_key("base", ctx_workflow.base_model, cfg, weights))


# --- what a step records, the same whichever worker runs it --------------------------------------------
def log_split(lineage: Lineage, run_id: str, task: TaskSpec, data: TaskData, split: str) -> None:
    """Record one of ``task``'s splits (``train`` or ``eval``) as an input of ``run_id``."""
    rows, context = (data.train, "training") if split == "train" else (data.eval, "evaluation")
    lineage.log_dataset(run_id, name=f"{task.name}-{split}", texts=data.inputs(rows), labels=data.targets(rows),
                        source=data.source, digest=data.digest, context=context)


def log_expert_start(lineage: Lineage, run_id: str, task: TaskSpec, start: ModelRef, settings: FinetuneSpec,
                     data: TaskData, part: str, round_index: int, *, datasets: bool = True,
                     **extra: Any) -> None:
    """An expert's run, before it trains: what it trains from and with (params), and its splits (inputs)."""
    lineage.log_params(run_id, {"task": task.name, "round": round_index, "start_model": start.uri, "data_part": part,
                                "finetune": settings.model_dump(mode="json"), "labels": task.label_names,
                                "train_examples": len(data.train), "eval_examples": len(data.eval), **extra})
    if datasets:
        for split in ("train", "eval"):
            log_split(lineage, run_id, task, data, split)


def own_task_scores(task: TaskSpec, own: dict[str, float]) -> dict[str, float]:
    """An expert's scores on its own task as its run records them (``eval/<task>/<metric>``; ``n`` is kept in
    provenance, not logged: :func:`loggable`)."""
    return {f"eval/{task.name}/{k}": float(v) for k, v in own.items()}


def loggable(scores: dict[str, float]) -> dict[str, float]:
    """Scores without their example counts (``…/n``), which provenance keeps and MLflow does not need."""
    return {k: v for k, v in scores.items() if not k.endswith("/n")}


def step_phases(step_seconds: float, *, load: float, train: float, evaluate: float, write: float,
                log: float) -> dict[str, float]:
    """Where a step's time on its worker went, ``phase_other_seconds`` being what the others leave."""
    phases = {"phase_load_seconds": load, "phase_train_seconds": train, "phase_evaluate_seconds": evaluate,
              "phase_write_seconds": write, "phase_log_seconds": log}
    phases["phase_other_seconds"] = max(0.0, step_seconds - sum(phases.values()))
    return phases


def merged_model_tags(wf: Workflow, merge: MergeSpec, experts: dict[str, ModelRef], round_index: int, uri: str,
                      fmt: str) -> dict[str, str]:
    """The tags of a merged model's LoggedModel."""
    return {"mergeflow.kind": "merged", "mergeflow.round": str(round_index), "mergeflow.method": merge.method,
            "mergeflow.strategy": wf.strategy, "mergeflow.experts": ",".join(sorted(experts)), TAG_STORE_URI: uri,
            "mergeflow.format": fmt}
