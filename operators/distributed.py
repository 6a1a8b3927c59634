"""One expert trained by several processes at once: data-parallel (DDP) or fully sharded (FSDP).

Knows nothing of Ray: the caller (``pipeline.train``, under Ray Train) starts the processes, sets up
``torch.distributed`` and hands :func:`operators.finetune.finetune` a :class:`Distributed`. Here:

- **The same step as one process.** Every rank draws the same batch of example indices (one seeded
  stream) and trains on its own ``1/N`` of it. The loss each rank back-propagates is scaled so that the
  gradients, once averaged across ranks (DDP's all-reduce, FSDP's reduce-scatter), are the gradients of
  the one-process loss of the whole batch: a classification batch's mean cross-entropy, a causal LM's mean
  over the batch's learned tokens (each rank's token losses summed and divided by the *whole* batch's
  count, which every rank knows from the labels). So N workers at global batch B train the one-worker
  expert at batch B, to float rounding (the all-reduce's order of summation). Dropout draws its own masks
  on each rank, so that equality holds for dropout 0.
- **Wrapping.** ``ddp``: ``DistributedDataParallel`` (every rank a full copy). ``fsdp``: FSDP2
  (``fully_shard``) on every transformer block, then the root, so each rank holds 1/N of the weights,
  gradients and AdamW state; full state dicts are gathered to write the expert.
- **Resume state.** Every ``checkpoint_every`` steps: the trainable weights, AdamW's state, the schedule
  and each rank's random state as safetensors and JSON (nothing pickled); a restarted group loads them
  and skips the batches already seen, so it goes on as if never stopped (dropout aside).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RESUME_WEIGHTS = "resume-weights.safetensors"
RESUME_OPTIMIZER = "resume-optimizer.safetensors"
RESUME_STATE = "resume.json"


@dataclass
class Distributed:
    """How this process takes part in training one expert (``torch.distributed`` already initialised).

    ``save``: called on every rank as ``save(directory_or_None, step)`` every ``checkpoint_every`` steps
    (rank 0 gets the written resume directory, the others None; the caller persists it, e.g. Ray Train's
    ``report``); ``resume_from``: a directory :func:`write_resume` wrote, to go on from.
    """

    rank: int
    world: int
    strategy: str = "ddp"
    device: str = "cpu"
    checkpoint_every: int = 0
    save: Callable[[Path | None, int], None] | None = None
    resume_from: Path | None = None

    def shard(self, idx: list[int]) -> list[int]:
        """This rank's contiguous 1/N of the batch ``idx`` (every rank draws the same ``idx``)."""
        if len(idx) % self.world:
            raise ValueError(f"a batch of {len(idx)} cannot be split evenly over {self.world} workers; make "
                             f"finetune.batch_size a multiple of resources.workers_per_expert")
        size = len(idx) // self.world
        return idx[self.rank * size:(self.rank + 1) * size]

    def all_sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (one all-reduce)."""
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()


def wrap(model: torch.nn.Module, task_model: Any, dist_: Distributed, device: str) -> torch.nn.Module:
    """``model`` (on ``device``) made data-parallel: what the training loop calls forward on.

    DDP returns a wrapper (``model``'s parameters are its parameters); FSDP shards ``model`` in place
    (its parameters become DTensors) and returns it.
    """
    if dist_.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [torch.device(device).index or 0] if device.startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(task_model, "_no_split_modules", None) or [])
    for module in model.modules():  # each transformer block its own unit: gathered only while it computes
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    return model


def full_state(model: torch.nn.Module, dist_: Distributed, optimizer=None, trainable_only: bool = False,
               ) -> tuple[dict[str, torch.Tensor], Any]:
    """The model's (and ``optimizer``'s) state on the CPU, gathered from every rank (a collective: every rank
    calls it; rank 0's is complete, the others' may be empty); ``trainable_only``: just what trains."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if dist_.strategy == "ddp":  # every rank holds everything already: copied, and only what is asked for
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items() if not trainable_only or k in trainable}
    else:
        weights = get_model_state_dict(model, options=options)
        for alias in tied_aliases(model):  # a tied weight (an LM head sharing the embedding) is written once,
            weights.pop(alias, None)       # as save_pretrained writes it: the checkpoint has the base's names
        if trainable_only:
            weights = {k: v for k, v in weights.items() if k in trainable}
    return weights, (get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None)


def tied_aliases(model: torch.nn.Module) -> list[str]:
    """The second and later names of parameters registered under several names (tied weights)."""
    seen: set[int] = set()
    aliases = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases.append(name)
        seen.add(id(p))
    return aliases


def write_resume(directory: Path, model: torch.nn.Module, optimizer, scheduler, step: int, totals: dict[str, Any],
                 dist_: Distributed) -> Path | None:
    """Gather what a restart needs and write it (rank 0) to ``directory``; every rank calls it.
    Returns ``directory`` on rank 0, None elsewhere."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    weights, optim = full_state(model, dist_, optimizer, trainable_only=True)

    rng = torch.get_rng_state().to(dist_.device)  # (NCCL gathers device tensors only)
    rngs = [torch.zeros_like(rng) for _ in range(dist_.world)]
    dist.all_gather(rngs, rng)  # each rank's CPU random stream (dropout on the CPU; CUDA's is not kept)
    rngs = [r.cpu() for r in rngs]
    if dist_.rank != 0:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / RESUME_WEIGHTS))
    tensors = {f"rng/{r}": t for r, t in enumerate(rngs)}
    scalars: dict[str, dict[str, float]] = {}
    for name, fields in optim["state"].items():
        for field, value in fields.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                tensors[f"state/{name}/{field}"] = value.contiguous()
            else:
                scalars.setdefault(name, {})[field] = float(value)
    save_file(tensors, str(directory / RESUME_OPTIMIZER))
    (directory / RESUME_STATE).write_text(json.dumps({
        "step": step, "totals": totals, "world": dist_.world, "strategy": dist_.strategy,
        "scalars": scalars, "param_groups": optim["param_groups"], "scheduler": scheduler.state_dict(),
    }))
    return directory


def read_resume(directory: Path, model: torch.nn.Module, optimizer, scheduler, dist_: Distributed) -> dict[str, Any]:
    """Load what :func:`write_resume` wrote into this rank's model, optimizer, schedule and random state;
    returns the JSON record (``step``, and ``totals``: the loss curve and counts so far). Every rank calls it."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    record = json.loads((directory / RESUME_STATE).read_text())
    if record["world"] != dist_.world:
        raise ValueError(f"the resume state in {directory} was written by {record['world']} workers, this group has "
                         f"{dist_.world}; the global batch is split differently: start this expert again")
    weights = load_file(str(directory / RESUME_WEIGHTS))
    saved = load_file(str(directory / RESUME_OPTIMIZER))
    state: dict[str, dict[str, Any]] = {}
    for key, value in saved.items():
        if key.startswith("state/"):
            name, field = key[len("state/"):].rsplit("/", 1)
            state.setdefault(name, {})[field] = value
    for name, fields in record["scalars"].items():
        for field, value in fields.items():
            state.setdefault(name, {})[field] = torch.tensor(value)
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": record["param_groups"]},
                             options=options)
    scheduler.load_state_dict(record["scheduler"])
    torch.set_rng_state(saved[f"rng/{dist_.rank}"])
    return record
