"""Fine-tune one expert: a shared body plus its task's classification head, from a start checkpoint.

Reads top to bottom: set up (seed, model, data, optimiser) → train → save. Deterministic for a
given seed, start checkpoint, data and thread count. Knows nothing of Ray or MLflow: progress goes
to an optional ``log`` callback, which the pipeline points at MLflow.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from operators.checkpoint import HEAD_WEIGHTS, HEADS_DIR, load_task_model, quiet_transformers, save_task_model
from operators.data import Split, TaskData

LogFn = Callable[[int, dict[str, float]], None]


class FinetuneSettings(Protocol):
    epochs: float | None
    max_steps: int | None
    learning_rate: float
    head_learning_rate: float | None
    weight_decay: float
    warmup_ratio: float
    batch_size: int
    max_length: int
    seed: int
    max_grad_norm: float | None
    log_every: int
    freeze_embeddings: bool


@dataclass
class FinetuneResult:
    """What one fine-tuning run did."""

    steps: int
    examples_seen: int
    final_loss: float
    mean_loss: float
    seconds: float
    losses: list[tuple[int, float]] = field(default_factory=list)
    head_init: str = "fresh"


def total_steps(n_examples: int, settings: FinetuneSettings) -> int:
    """The number of optimiser steps a budget means: ``max_steps``, else ``ceil(epochs × batches)``."""
    if settings.max_steps is not None:
        return settings.max_steps
    batches = math.ceil(n_examples / settings.batch_size)
    return max(1, math.ceil((settings.epochs or 1.0) * batches))


def _batches(split: Split, batch_size: int, steps: int, generator: torch.Generator):
    """Yield ``steps`` batches of example indices, reshuffling at every epoch boundary."""
    n = len(split)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order = order + torch.randperm(n, generator=generator).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        yield batch


def finetune(
    init_ckpt: str | Path,
    data: TaskData,
    settings: FinetuneSettings,
    out_dir: str | Path,
    *,
    log: LogFn | None = None,
    device: str = "cpu",
    torch_threads: int | None = None,
) -> FinetuneResult:
    """Fine-tune body and head of ``data.name``'s task starting from ``init_ckpt``; save to ``out_dir``.

    Args:
        init_ckpt: The start checkpoint (the base, or a merged model in later rounds). If it carries
            a head for this task, training continues from that head; otherwise a fresh head is made
            (seeded, so the same seed gives the same head).
        data: The task's data (train split used here).
        settings: Learning rate, budget, batch size, ... (``FinetuneSpec``).
        out_dir: Where to write the expert checkpoint (body + ``heads/<task>``).
        log: Called as ``log(step, {"train_loss": ..., "lr": ...})`` every ``log_every`` steps.
        device: ``"cpu"`` or ``"cuda"``.
        torch_threads: torch intra-op threads (None leaves torch's default).

    Returns:
        Steps, losses and time taken.
    """
    # --- setup --------------------------------------------------------------------------------
    quiet_transformers()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    torch.manual_seed(settings.seed)  # fixes the fresh head's initialisation and dropout masks
    from transformers import AutoTokenizer

    init_ckpt = Path(init_ckpt)
    has_head = (init_ckpt / HEADS_DIR / data.name / HEAD_WEIGHTS).is_file()
    model = load_task_model(init_ckpt, data.name, label_names=data.label_names).to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(init_ckpt))

    if settings.freeze_embeddings:
        # the word-embedding table is most of a small model's parameters and of each step's cost
        model.get_input_embeddings().weight.requires_grad_(False)
    body_prefix = model.base_model_prefix + "."
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    body_params = [p for n, p in trainable if n.startswith(body_prefix)]
    head_params = [p for n, p in trainable if not n.startswith(body_prefix)]
    optimizer = torch.optim.AdamW(
        [
            {"params": body_params, "lr": settings.learning_rate},
            {"params": head_params, "lr": settings.head_learning_rate or settings.learning_rate},
        ],
        weight_decay=settings.weight_decay,
    )
    steps = total_steps(len(data.train), settings)
    warmup = int(steps * settings.warmup_ratio)

    def lr_scale(step: int) -> float:  # linear warm-up, then linear decay to zero
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (steps - step) / max(1, steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_scale)
    generator = torch.Generator().manual_seed(settings.seed)

    # --- train --------------------------------------------------------------------------------
    model.train()
    start = time.perf_counter()
    losses: list[tuple[int, float]] = []
    window: list[float] = []
    total_loss, seen = 0.0, 0
    for step, idx in enumerate(_batches(data.train, settings.batch_size, steps, generator), start=1):
        enc = tokenizer(
            [data.train.texts[i] for i in idx], padding=True, truncation=True,
            max_length=settings.max_length, return_tensors="pt",
        ).to(device)
        labels = torch.tensor([data.train.labels[i] for i in idx], device=device)
        # mean cross-entropy over the batch (HF's loss for single-label classification)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        if settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)  # free the gradients now; no need for this memory

        value = float(loss.detach())
        window.append(value)
        total_loss += value
        seen += len(idx)
        if step % settings.log_every == 0 or step == steps:
            avg = sum(window) / len(window)
            losses.append((step, avg))
            if log is not None:
                log(step, {"train_loss": avg, "lr": scheduler.get_last_lr()[0]})
            window = []
    seconds = time.perf_counter() - start

    # --- save ---------------------------------------------------------------------------------
    model.eval()
    save_task_model(model.to("cpu"), init_ckpt, out_dir, data.name)
    return FinetuneResult(
        steps=steps,
        examples_seen=seen,
        final_loss=losses[-1][1] if losses else float("nan"),
        mean_loss=total_loss / max(1, steps),
        seconds=seconds,
        losses=losses,
        head_init="carried over" if has_head else "fresh",
    )
