"""``resources``: what Ray reserves for each step (one expert's fine-tuning, a merge, an evaluation), and how
steps larger than one worker are spread: an expert over several workers (Ray Train), a merge over several
nodes, small experts sharing a GPU."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from operators.merge import get_method
from pipeline.spec.common import _Frozen

if TYPE_CHECKING:
    from pipeline.spec.workflow import Workflow


class ResourcesSpec(_Frozen):
    """Ray resources for each expert's fine-tuning task (and the merge/eval tasks)."""

    num_cpus: float = Field(default=1.0, gt=0, description="Ray CPUs reserved by each step (one expert = one task; "
                            "with workers_per_expert, by each of its workers).")
    num_gpus: float = Field(
        default=0.0, ge=0,
        description="Ray GPUs reserved by each step; above 0 the step runs on CUDA (a fraction shares a device, "
        "e.g. 0.25 packs four LoRA experts on one GPU: `mergeflow validate` shows each expert's memory estimate "
        "and refuses a share too small for it).",
    )
    max_retries: int = Field(
        default=1, ge=0, description="How many times Ray re-runs a step whose worker process died (a multi-worker "
        "expert: how many times its worker group is restarted from its last resume state)."
    )
    torch_threads: int | None = Field(
        default=None, gt=0, description="torch intra-op threads inside each step; defaults to num_cpus."
    )
    workers_per_expert: int = Field(
        default=1, ge=1, description="Above 1: each expert is fine-tuned by this many workers at once (a Ray Train "
        "TorchTrainer; gloo on CPU, NCCL on GPU), each with num_cpus / num_gpus; the global batch stays "
        "finetune.batch_size (a multiple of this), so the expert is the one-worker expert, to float rounding.")
    strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp", description="Multi-worker experts: ddp (every worker a full copy, gradients averaged) or fsdp "
        "(weights, gradients and AdamW state sharded over the workers: for models whose training state exceeds one "
        "device; causal-LM tasks).")
    placement: Literal["pack", "spread"] = Field(
        default="pack", description="Where a multi-worker expert's workers (and a split merge's parts) are placed: "
        "pack (as few nodes as possible: fast all-reduce) or spread (across nodes: more memory and disk bandwidth "
        "per worker, survives one node better).")
    resume_every: int = Field(
        default=50, ge=0, description="Multi-worker experts: write a resume state (weights, AdamW state, schedule, "
        "random state) every N steps, from which a restarted worker group goes on; 0: a restart begins again.")
    train_storage: str | None = Field(
        default=None, description="Multi-worker experts: where Ray Train keeps resume states (every node must reach "
        "it: a shared filesystem or s3://...); default: <store.root>/.train.")
    merge_workers: int = Field(
        default=1, ge=1, description="Above 1: a merge is split by tensors across this many Ray workers (placed by "
        "`placement`), each reading only its tensors and writing whole output shards; the index is written once "
        "every part is in. Bit for bit the one-process merge.")
    gpu_memory_gb: float | None = Field(
        default=None, gt=0, description="The memory of one GPU of the cluster, for the check of fractional "
        "num_gpus (default: the GPU of the machine that validates, if any).")


NO_WEIGHT_CHANGE = ("placement", "resume_every", "train_storage", "merge_workers", "gpu_memory_gb")
"""Resources that change no weight (left out of the spec hash): where workers sit, how often a resume state is
written, and how a merge is split (a split merge is bit for bit the one-process merge)."""


def check_multiworker(wf: Workflow) -> None:
    """``workers_per_expert`` and ``merge_workers``: what the training and merging they ask for can do."""
    r = wf.resources
    many = [t for t in wf.tasks if wf.workers_for(t) > 1]
    for task in many:
        n = wf.workers_for(task)
        where = f"tasks[{task.name}].workers" if task.workers else "resources.workers_per_expert"
        settings = [(task.name, wf.finetune_for(task))]
        if wf.strategy != "oneshot":
            settings.append((f"{task.name} (a round)", wf.round_finetune_for(task, 1)))
        for name, s in settings:
            if s.batch_size % n:
                raise ValueError(f"{where}: {n} splits each batch evenly over the workers, but task {name}'s "
                                 f"finetune.batch_size is {s.batch_size}; make it a multiple of {n}")
            if s.sharpness is not None:
                raise ValueError(f"finetune.sharpness (task {name}) is not available with {where} {n}; train "
                                 "sharpness-aware experts with one worker each")
        if r.strategy == "fsdp" and task.type != "causal_lm":
            raise ValueError("resources.strategy: fsdp trains causal-LM tasks; classification experts (small: a body "
                             "and a head) train with strategy: ddp")
    if many and wf.strategy != "oneshot" and wf.rounds.workers == "resident":
        raise ValueError("resources.workers_per_expert > 1 (or a task's workers) needs rounds.workers: tasks (a "
                         "resident worker keeps one expert's model in one process)")
    if r.merge_workers > 1:
        merges = [("merge", wf.merge)] + ([("rounds.merge", wf.rounds.merge)] if wf.strategy != "oneshot" else [])
        for where, m in merges:
            for what, bad in (("lora.mode: adapter", m.lora.mode == "adapter"),
                              ("heads.mode: aligned", m.heads.mode == "aligned"),
                              ("a search", m.search is not None), ("a recipe search", m.recipe is not None),
                              ("a data-driven method", m.learns_from_inputs or get_method(m.method).statistics is not None)):
                if bad:
                    raise ValueError(f"resources.merge_workers: {r.merge_workers} splits a merge of fixed parameters "
                                     f"by tensors; {where} has {what}, which learns from the whole model first. "
                                     "Set merge_workers: 1 for it")
