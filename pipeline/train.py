"""An expert fine-tuned by several workers at once: a Ray Train ``TorchTrainer`` (``resources.workers_per_expert``).

The expert's step (``pipeline.steps.finetune_step``) stays the coordinator: it logs the run, then calls
:func:`train_across_workers`, which starts ``workers_per_expert`` Ray Train workers (one placement group,
packed or spread; gloo on CPU, NCCL on GPU), each running :func:`_worker`: the same
:func:`operators.finetune.finetune` as a one-worker expert, with its share of every batch
(:mod:`operators.distributed`). Rank 0 logs the loss curve into the expert's MLflow run and writes the
expert; every ``resources.resume_every`` steps the group reports a resume state to Ray Train, and a worker
that dies has Ray Train restart the group (``FailureConfig``), which goes on from the last one. The expert
Ray Train reports last is copied into the step's staged checkpoint, so store, lineage and provenance are
those of any expert.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

from operators.finetune import FinetuneResult
from pipeline.context import ModelRef, StepContext, local_dir, task_data
from pipeline.spec import FinetuneSpec, TaskSpec

EXPERT_DIR = "expert"  # in the final Ray Train checkpoint: the expert, as rank 0 wrote it
RESULT_FILE = "result.json"  # beside it: rank 0's FinetuneResult (numbers only)


def train_storage(ctx: StepContext) -> str:
    """Where Ray Train keeps this workflow's resume states: ``resources.train_storage``, else under the store."""
    return ctx.workflow.resources.train_storage or f"{ctx.workflow.store.root.rstrip('/')}/.train"


def train_across_workers(ctx: StepContext, task: TaskSpec, start: ModelRef, settings: FinetuneSpec, part: str,
                         run_id: str, key: str, out_dir: Path) -> tuple[FinetuneResult, dict[str, Any], float]:
    """Fine-tune ``task``'s expert from ``start`` on its workers (``workers_for(task)``) under Ray Train; the
    expert is written to ``out_dir``. Called inside a Ray task (the expert's step); logs into ``run_id``.

    Returns the training result, the expert's scores on its own task (measured by rank 0, on its device, as
    every later reader loads the expert) and the seconds they took."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        raise RuntimeError("resources.workers_per_expert > 1 trains each expert with Ray Train, on a Ray cluster; "
                           "run the workflow on Ray (not --address in-process), or set workers_per_expert: 1")
    r = ctx.workflow.resources
    gpu = r.num_gpus > 0
    storage = train_storage(ctx)
    name = f"{ctx.workflow.name}-{task.name}-{key}"
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"ctx": ctx, "task": task, "start": start, "settings": settings, "part": part,
                           "run_id": run_id},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=ctx.workflow.workers_for(task), use_gpu=gpu,
            resources_per_worker={"CPU": r.num_cpus, **({"GPU": r.num_gpus} if gpu else {})},
            placement_strategy="PACK" if r.placement == "pack" else "SPREAD"),
        run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=r.max_retries),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    started = time.perf_counter()
    result = trainer.fit()
    fit_seconds = time.perf_counter() - started
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"the workers training expert {task.name!r} finished without reporting it")
    out_dir.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as done:
        done = Path(done)
        if not (done / EXPERT_DIR).is_dir():
            raise RuntimeError(f"the last checkpoint of Ray Train run {name!r} holds no expert (in {done})")
        # copied, not moved: the checkpoint stays whole until this step has the expert (a retried step reads it)
        shutil.copytree(done / EXPERT_DIR, out_dir, dirs_exist_ok=True)
        raw = json.loads((done / RESULT_FILE).read_text())
    known = {f.name for f in fields(FinetuneResult)}
    out = FinetuneResult(**{k: (([tuple(x) for x in v]) if k == "losses" else v) for k, v in raw["result"].items()
                            if k in known})
    if "://" not in storage:  # the run's resume states: the expert is in the store now
        shutil.rmtree(Path(storage) / name, ignore_errors=True)
    # how long the workers held their slots (rank 0's last attempt, from its start to the expert reported), and
    # what Ray Train added around them (waiting for the slots, starting the group and its processes, ending it)
    ctx.lineage().log_metrics(run_id, {"workers_seconds": raw["worker_seconds"],
                                       "ray_train_seconds": fit_seconds - raw["worker_seconds"]})
    return out, raw["own"], raw["evaluate_seconds"]


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: its share of every batch; rank 0 logs and writes (see the module)."""
    import logging

    import ray.train
    import torch

    from operators.distributed import RESUME_STATE, Distributed
    from operators.finetune import finetune

    logging.getLogger("ray.train.v2._internal.execution.context").setLevel(logging.WARNING)  # a line per report
    started = time.perf_counter()
    c = ray.train.get_context()
    rank, world = c.get_world_rank(), c.get_world_size()
    ctx: StepContext = config["ctx"]
    task, settings, run_id = config["task"], config["settings"], config["run_id"]
    device = str(ray.train.torch.get_device()) if ctx.workflow.resources.num_gpus > 0 else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    data = task_data(task, config["part"], ctx.workflow.held_out_fraction, task.dataset.split_seed)
    start_dir = local_dir(ctx, config["start"])
    lineage = ctx.lineage() if rank == 0 else None

    def log(step: int, metrics: dict[str, float]) -> None:
        lineage.log_metrics(run_id, metrics, step=step)

    def save(directory: Path | None, step: int) -> None:  # every rank reports; rank 0 with the resume state
        checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if directory is not None else None
        ray.train.report({"step": step}, checkpoint=checkpoint)

    resume = ray.train.get_checkpoint()
    with tempfile.TemporaryDirectory(prefix="mergeflow-train-") as tmp:
        resume_dir = None
        if resume is not None:  # a restarted group (a worker died): on from the last resume state, said in the run
            resume_dir = Path(resume.to_directory(str(Path(tmp) / "resume")))
            if (resume_dir / EXPERT_DIR).is_dir():  # the expert itself: done before its step was cut short (a step
                checkpoint = ray.train.Checkpoint.from_directory(str(resume_dir)) if rank == 0 else None  # retried):
                ray.train.report({"step": -1}, checkpoint=checkpoint)  # reported again, as it is
                return
            if lineage is not None:
                step = json.loads((resume_dir / RESUME_STATE).read_text())["step"]
                lineage.set_tags(run_id, {"mergeflow.resumed_from_step": str(step)})
        d = Distributed(rank, world, ctx.workflow.resources.strategy, device=device,
                        checkpoint_every=ctx.workflow.resources.resume_every, save=save, resume_from=resume_dir)
        expert = Path(tmp) / "final" / EXPERT_DIR
        result = finetune(start_dir, data, settings, expert if rank == 0 else None, log=log if rank == 0 else None,
                          device=device, torch_threads=ctx.torch_threads, distributed=d)
        checkpoint = None
        if rank == 0:  # scored here, on this worker's device, as every later reader loads it
            from operators.evaluate import evaluate

            t0 = time.perf_counter()
            own = evaluate(expert, data, adapter_base=start_dir if settings.mode == "lora" else None,
                           headline=task.headline_metric, max_length=settings.max_length, device=device)
            record = {"result": {k: v for k, v in result.__dict__.items() if k not in ("model", "tokenizer")},
                      "own": own, "evaluate_seconds": time.perf_counter() - t0,
                      "worker_seconds": time.perf_counter() - started}
            (expert.parent / RESULT_FILE).write_text(json.dumps(record))
            checkpoint = ray.train.Checkpoint.from_directory(str(expert.parent))
        ray.train.report({"step": result.steps, "final_loss": result.final_loss}, checkpoint=checkpoint)
