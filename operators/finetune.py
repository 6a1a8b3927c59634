"""Fine-tune one expert from a start checkpoint: full fine-tune or LoRA, classification or causal LM.

Reads top to bottom: set up (seed, model, LoRA, data, optimiser) → train → save. One loop for every
kind of expert; what differs is how a batch is built and what is saved:

- classification: body + the task's head (a fresh seeded head, or the start model's head for this
  task); the loss is the mean cross-entropy over the batch.
- causal LM: the whole language model; the loss is the mean next-token cross-entropy over the
  response tokens (every token when the task gives no prompt), padding and prompt masked out.
- full: every weight trains; the expert is a full checkpoint.
- LoRA (peft): only the adapters (and a classification head) train; the expert is a peft adapter
  directory (a few MB, not a copy of the base), loadable with ``PeftModel.from_pretrained``.

Deterministic for a given seed, start weights, data and thread count. The random stream is seeded
before loading; it draws a fresh head's initialisation, then LoRA's A and dropout masks. A head
carried over from the start checkpoint, or a causal LM (no head), draws nothing: the stream is seeded
again once that model is ready, so the throwaway draws of a loader (a missing head initialised, then
overwritten) never reach training, and a model kept in memory from an earlier round trains bit for
bit as one loaded from its checkpoint. Knows nothing of Ray or MLflow: progress goes to an optional ``log`` callback, which the pipeline points at MLflow.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from operators.checkpoint import load_task_model, quiet_transformers, save_task_model
from operators.checkpoint_files import HEAD_WEIGHTS, HEADS_DIR, copy_tokenizer, save_head
from operators.data import Split, TaskData
from operators.distributed import Distributed, full_state, read_resume, wrap, write_resume
from operators.errors import TrainingDiverged
from operators.lm_batches import (  # noqa: F401  (IGNORE_INDEX, lm_tokenizer, encode_lm: importable from here)
    IGNORE_INDEX,
    collate_lm,
    encode_lm,
    keeps_logits,
    learned_tokens,
    lm_loss,
    lm_tokenizer,
)
from operators.lora import add_lora
from operators.sharpness import sharpness_aware_

LogFn = Callable[[int, dict[str, float]], None]


class LoraSettings(Protocol):
    r: int
    alpha: float
    dropout: float
    target_modules: list[str] | None
    use_rslora: bool


class FinetuneSettings(Protocol):
    mode: str
    lora: LoraSettings
    precision: str
    gradient_checkpointing: bool
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
    sharpness: Any  # None, or .method ("sam" | "asam") and .rho


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
    tokens_seen: int = 0  # tokens the model was fed (padding excluded)
    trainable_parameters: int = 0
    precision: str = "fp32"
    peak_gpu_bytes: int = 0
    load_seconds: float = 0.0  # start checkpoint and tokenizer into a ready model (before the first step)
    save_seconds: float = 0.0  # the expert written to ``out_dir``
    # with ``keep_model``: the trained model, on the CPU, in eval mode (LoRA: the peft model wrapping it)
    model: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_seen / self.seconds if self.seconds > 0 else float("nan")


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


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` → ``bf16`` on a CUDA device that supports it, else ``fp32``."""
    if precision != "auto":
        return precision
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(precision: str, device: str):
    """bf16 autocast (weights and optimiser state stay fp32), or nothing."""
    if precision == "bf16":
        return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- the loop ---------------------------------------------------------------------------------------------

def finetune(
    init_ckpt: str | Path,
    data: TaskData,
    settings: FinetuneSettings,
    out_dir: str | Path | None,
    *,
    log: LogFn | None = None,
    device: str = "cpu",
    torch_threads: int | None = None,
    keep_model: bool = False,
    model: Any = None,
    tokenizer: Any = None,
    fresh_head: bool = False,
    distributed: Distributed | None = None,
) -> FinetuneResult:
    """Fine-tune an expert for ``data.name`` starting from ``init_ckpt``; save it to ``out_dir``.

    Args:
        init_ckpt: The start checkpoint (the base, or a merged model in later rounds): always a full
            checkpoint. For classification, if it carries a head for this task, training continues
            from that head; otherwise a fresh head is made (seeded, so the same seed gives the same head).
        data: The task's data (train split used here); ``data.task_type`` picks classification or causal LM.
        settings: Mode (full/LoRA), learning rate, budget, batch size, precision, ... (``FinetuneSpec``).
        out_dir: Where to write the expert: a full checkpoint, or a peft adapter directory (mode ``lora``),
            with ``heads/<task>`` for classification and the tokenizer. ``None``: not written (with
            ``keep_model``, the caller takes the trained model as it is).
        log: Called as ``log(step, {"train_loss": ..., "lr": ...})`` every ``log_every`` steps.
        device: ``"cpu"`` or ``"cuda"``.
        torch_threads: torch intra-op threads (None leaves torch's default).
        keep_model: Return the trained model and its tokenizer (``result.model``, ``result.tokenizer``), so
            the caller can score it without loading what was just written. A LoRA expert written to
            ``out_dir`` is not kept (it is scored as it is loaded, adapter folded into its base); one not
            written (``out_dir=None``) is kept as the peft model wrapping the task model: its adapter is
            read with ``AdapterCheckpoint.of_peft_model`` and ``result.model.unload()`` gives back the
            task model with its start weights untouched (and its trained head).
        model, tokenizer: A task model already holding the start weights (a resident worker's, kept
            across rounds), trained in place instead of loading ``init_ckpt``, which then only names
            where the start came from (LoRA wraps it and trains adapters on it). ``fresh_head``: its
            head was just made (the caller seeded the stream with ``settings.seed``, then drew it) rather
            than carried over; training goes on from where that draw left the stream, as when
            ``init_ckpt`` is loaded here. Otherwise the stream starts again at the seed once the model is
            ready, however it was loaded.
        distributed: This process is one of several training this expert together (DDP or FSDP; see
            :mod:`operators.distributed`): each takes its share of every batch, and the expert is the one
            process would train at the same batch size. Only rank 0 writes ``out_dir`` (pass None elsewhere)
            and calls ``log``; every rank must call this with the same arguments otherwise.

    Returns:
        Steps, losses, tokens, time taken and peak GPU memory.
    """
    load_start = time.perf_counter()
    quiet_transformers()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    if model is None:  # (a preloaded model was seeded and loaded by its caller: a fresh head drew from the seed)
        torch.manual_seed(settings.seed)  # fixes the fresh head's initialisation, LoRA's A and dropout masks
    init_ckpt = Path(init_ckpt)
    run = _set_up(init_ckpt, data, settings, device, model, tokenizer, fresh_head, distributed)
    steps = total_steps(len(data.train), settings)
    optimizer, scheduler = _optimizer(run, settings, steps)
    load_seconds = time.perf_counter() - load_start
    trained = _train(run, data, settings, steps, optimizer, scheduler, device, log, distributed)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    save_start = time.perf_counter()
    _save(run, init_ckpt, data, settings, out_dir, distributed)
    keep = keep_model and (not run.lora or out_dir is None) and distributed is None
    return FinetuneResult(
        steps=steps,
        examples_seen=trained.seen,
        final_loss=trained.losses[-1][1] if trained.losses else float("nan"),
        mean_loss=trained.total_loss / max(1, steps),
        seconds=trained.seconds,
        losses=trained.losses,
        head_init="none" if run.lm else ("carried over" if run.has_head else "fresh"),
        tokens_seen=trained.tokens,
        trainable_parameters=sum(p.numel() for p in trained.params),
        precision=run.precision,
        peak_gpu_bytes=peak,
        load_seconds=load_seconds,
        save_seconds=time.perf_counter() - save_start,
        model=(run.model if run.lora else run.task_model) if keep else None,
        tokenizer=run.tokenizer if keep else None,
    )


@dataclass
class _Run:
    """A model ready to train (:func:`_set_up`)."""

    model: Any  # what trains: the task model, or the peft model wrapping it (LoRA)
    task_model: Any  # the transformers model (heads and bodies are read from it)
    tokenizer: Any
    lm: bool
    lora: bool
    has_head: bool  # a classification head carried over from the start (not fresh)
    precision: str
    encoded: list[tuple[list[int], list[int]]] | None  # causal LM: every row's ids and loss labels
    keep_logits: bool = False  # causal LM: logits only where a token is learned (:func:`lm_loss`)
    parallel: Any = None  # several processes: what forward is called on (DDP's wrapper; FSDP: ``model``, sharded)


def _set_up(init_ckpt: Path, data: TaskData, settings: FinetuneSettings, device: str, model: Any, tokenizer: Any,
            fresh_head: bool, distributed: Distributed | None = None) -> _Run:
    """The start model (loaded, or a resident worker's), its tokenizer, LoRA adapters, on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm, lora = data.is_lm, settings.mode == "lora"
    precision = resolve_precision(settings.precision, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if model is not None:  # a resident worker's model, already holding the start weights
        has_head = not lm and not fresh_head
        model.requires_grad_(True)
    elif lm:
        has_head = False
        model = AutoModelForCausalLM.from_pretrained(str(init_ckpt))
        tokenizer = lm_tokenizer(init_ckpt)
    else:
        has_head = (init_ckpt / HEADS_DIR / data.name / HEAD_WEIGHTS).is_file()
        model = load_task_model(init_ckpt, data.name, label_names=data.label_names)
        tokenizer = AutoTokenizer.from_pretrained(str(init_ckpt))
    encoded = encode_lm(tokenizer, data.train, settings.max_length) if lm else None
    if has_head or lm:  # the stream starts again at the seed: a loader's throwaway draws stay out of training
        torch.manual_seed(settings.seed)  # (only a fresh head's draw, made with this seed, goes on into training)
    task_model = model
    if settings.freeze_embeddings and not lora:
        # the word-embedding table is most of a small model's parameters and of each step's cost
        model.get_input_embeddings().weight.requires_grad_(False)
    if lora:
        model = add_lora(model, settings.lora, causal_lm=lm)
    if settings.gradient_checkpointing:
        task_model.config.use_cache = False
        task_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    parallel = wrap(model, task_model, distributed, device) if distributed is not None else None
    return _Run(model, task_model, tokenizer, lm, lora, has_head, precision, encoded,
                keep_logits=lm and keeps_logits(task_model), parallel=parallel)


def _optimizer(run: _Run, settings: FinetuneSettings, steps: int):
    """AdamW over what trains (the head at its own learning rate), with linear warm-up then linear decay."""
    body_prefix = run.task_model.base_model_prefix + "."
    trainable = [(n, p) for n, p in run.task_model.named_parameters() if p.requires_grad]  # (FSDP: the shards)
    head_params = [] if run.lm else [p for n, p in trainable if not n.startswith(body_prefix) and "lora_" not in n]
    head_ids = {id(p) for p in head_params}
    body_params = [p for _, p in trainable if id(p) not in head_ids]
    groups = [{"params": body_params, "lr": settings.learning_rate}]
    if head_params:
        groups.append({"params": head_params, "lr": settings.head_learning_rate or settings.learning_rate})
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    warmup = int(steps * settings.warmup_ratio)

    def lr_scale(step: int) -> float:  # linear warm-up, then linear decay to zero
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_scale)


@dataclass
class _Trained:
    """What :func:`_train` did."""

    losses: list[tuple[int, float]]
    total_loss: float
    seen: int
    tokens: int
    seconds: float
    params: list[torch.nn.Parameter]


def _train(run: _Run, data: TaskData, settings: FinetuneSettings, steps: int, optimizer, scheduler, device: str,
           log: LogFn | None, dist_: Distributed | None = None) -> _Trained:
    """The loop: ``steps`` seeded batches, the loss averaged over every ``log_every`` steps.

    With ``dist_``, every rank draws the same batch and trains on its share of it, and the loss is scaled
    so that the gradients averaged over the ranks are the whole batch's (:mod:`operators.distributed`);
    the loss logged and checked is the whole batch's, summed over the ranks."""
    generator = torch.Generator().manual_seed(settings.seed)
    model = run.model
    losses = _Loss(run, data, settings, device, dist_)
    forward = losses.forward

    model.train()
    start = time.perf_counter()
    tally = _Tally()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    all_params = [p for _, p in named]
    sharpness = getattr(settings, "sharpness", None)
    first = 1
    if dist_ is not None and dist_.resume_from is not None:  # a restarted group: on from the last resume state
        record = read_resume(dist_.resume_from, model, optimizer, scheduler, dist_)
        first, tally = record["step"] + 1, _Tally.from_record(record["totals"])

    def stop(step: int, what: str) -> TrainingDiverged:
        if tally.window and log is not None:  # the curve ends at the last step that completed
            log(step - 1, {"train_loss": sum(tally.window) / len(tally.window), "lr": scheduler.get_last_lr()[0]})
        return _diverged(data.name, step, steps, what, tally.last_finite, settings)

    for step, idx in enumerate(_batches(data.train, settings.batch_size, steps, generator), start=1):
        if step < first:  # (resumed: these batches were trained before the restart; drawn again to skip them)
            continue
        batch, loss, value, batch_tokens = losses.step(idx)
        if not math.isfinite(value):  # before the step: no NaN reaches the weights, none is saved
            raise stop(step, f"the training loss is {value}")
        loss.backward()
        if sharpness is not None:  # the gradient at the worst weights within ρ replaces this one
            second = sharpness_aware_(all_params, lambda b=batch: forward(b), sharpness.method, sharpness.rho,
                                      sharpness.eta, scaled=[n.endswith("weight") for n, _ in named])
            if not math.isfinite(second):
                raise stop(step, f"the loss at the perturbed weights ({sharpness.method}, rho {sharpness.rho}) is {second}")
        if settings.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(all_params, settings.max_grad_norm)
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # (FSDP: a DTensor)
            if not math.isfinite(norm):  # a gradient that overflowed: stepping would write NaN into the weights
                raise stop(step, f"the gradient's norm is {norm} (the loss {value:.6g})")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)  # free the gradients now; no need for this memory

        avg = tally.add(step, value, len(idx), batch_tokens, ends_window=step % settings.log_every == 0 or step == steps)
        if avg is not None and log is not None:
            log(step, {"train_loss": avg, "lr": scheduler.get_last_lr()[0]})
        if dist_ is not None and dist_.checkpoint_every and step % dist_.checkpoint_every == 0 and step < steps:
            _save_resume(model, optimizer, scheduler, step, tally, dist_)
    return _Trained(tally.losses, tally.total_loss, tally.seen, tally.tokens, time.perf_counter() - start, all_params)


class _Loss:
    """A training step's batch and loss, in one process or as one of several (:mod:`operators.distributed`)."""

    def __init__(self, run: _Run, data: TaskData, settings: FinetuneSettings, device: str, dist_: Distributed | None):
        self.run, self.data, self.settings, self.device, self.dist = run, data, settings, device, dist_
        self.model = run.parallel if run.parallel is not None else run.model  # what forward is called on

    def inputs(self, idx: list[int]) -> dict[str, Any]:
        run, device = self.run, self.device
        if run.lm:
            return collate_lm([run.encoded[i] for i in idx], run.tokenizer.pad_token_id, device)
        enc = run.tokenizer([self.data.train.texts[i] for i in idx], padding=True, truncation=True,
                            max_length=self.settings.max_length, return_tensors="pt").to(device)
        return {**enc, "labels": torch.tensor([self.data.train.labels[i] for i in idx], device=device)}

    def forward(self, batch: dict[str, Any], total: int | None = None) -> torch.Tensor:
        with autocast(self.run.precision, self.device):
            # classification: mean cross-entropy over the batch (transformers' loss); causal LM: mean
            # over the response tokens of the batch, next-token shifted, logits only where learned
            if self.run.lm:
                return lm_loss(self.model, batch, keep_logits=self.run.keep_logits, total=total)
            return self.model(**batch).loss

    def step(self, idx: list[int]) -> tuple[dict[str, Any], torch.Tensor, float, int]:
        """The batch this process trains on, the loss it back-propagates, the whole batch's loss and tokens."""
        dist_ = self.dist
        if dist_ is None:
            batch = self.inputs(idx)
            loss = self.forward(batch)
            return batch, loss, float(loss.detach()), int(batch["attention_mask"].sum())
        batch = self.inputs(dist_.shard(idx))
        if self.run.lm:  # this share's token losses over the whole batch's count: the shares add up to its mean
            total = sum(learned_tokens(self.run.encoded[i][1]) for i in idx)
            share = self.forward(batch, total=max(1, total))
            loss = share * dist_.world  # the ranks' gradients are averaged: N × (1/N) Σ = the whole batch's
        else:  # each share's mean over an equal part of the batch: their average is the batch's mean
            loss = self.forward(batch)
            share = loss / dist_.world
        value, count = dist_.all_sum([float(share.detach()), float(batch["attention_mask"].sum())])
        return batch, loss, value, int(count)


@dataclass
class _Tally:
    """The loss curve and counts so far (a resumed run carries them over)."""

    losses: list[tuple[int, float]] = field(default_factory=list)
    window: list[float] = field(default_factory=list)  # the losses since the curve's last point
    total_loss: float = 0.0
    seen: int = 0
    tokens: int = 0
    last_finite: tuple[int, float] | None = None

    def add(self, step: int, value: float, examples: int, tokens: int, ends_window: bool) -> float | None:
        """Count one step; returns the window's mean loss when ``ends_window`` (a point of the curve)."""
        self.last_finite = (step, value)
        self.window.append(value)
        self.total_loss += value
        self.seen += examples
        self.tokens += tokens
        if not ends_window:
            return None
        avg = sum(self.window) / len(self.window)
        self.losses.append((step, avg))
        self.window = []
        return avg

    def record(self) -> dict[str, Any]:
        return {"losses": self.losses, "window": self.window, "total_loss": self.total_loss, "seen": self.seen,
                "tokens": self.tokens, "last_finite": self.last_finite}

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> _Tally:
        return cls([tuple(x) for x in r["losses"]], list(r["window"]), r["total_loss"], int(r["seen"]),
                   int(r["tokens"]), tuple(r["last_finite"]) if r["last_finite"] else None)


def _save_resume(model, optimizer, scheduler, step: int, tally: _Tally, dist_: Distributed) -> None:
    """Every rank: the resume state written (by rank 0) and handed to ``dist_.save`` to be kept."""
    with tempfile.TemporaryDirectory(prefix="mergeflow-resume-") as tmp:
        written = write_resume(Path(tmp), model, optimizer, scheduler, step, tally.record(), dist_)
        if dist_.save is not None:
            dist_.save(written, step)


def _diverged(task: str, step: int, steps: int, what: str, last: tuple[int, float] | None,
              settings: FinetuneSettings) -> TrainingDiverged:
    before = (f"its last finite value {last[1]:.6g} at step {last[0]}" if last is not None
              else "no step completed before it")
    return TrainingDiverged(
        f"fine-tuning {task!r} diverged at step {step} of {steps}: {what} (the training loss: {before}); "
        f"nothing of this expert was saved. Lower finetune.learning_rate (now {settings.learning_rate:g}) or set "
        f"finetune.max_grad_norm (now {settings.max_grad_norm}), or look for huge or non-finite weights in the "
        "checkpoint it started from; then run again (finished steps are kept)")


def _save(run: _Run, init_ckpt: Path, data: TaskData, settings: FinetuneSettings, out_dir: str | Path | None,
          dist_: Distributed | None = None) -> None:
    """The trained model back on the CPU in eval mode; written to ``out_dir`` unless it is None.

    Several processes: FSDP's shards are gathered into one state (every rank takes part), and rank 0 writes."""
    run.model.eval()
    state = None
    if dist_ is not None and dist_.strategy == "fsdp":
        state, _ = full_state(run.model, dist_)  # (the model stays sharded; the whole state is on rank 0's CPU)
    else:
        run.model.to("cpu")
    if settings.gradient_checkpointing:
        run.task_model.gradient_checkpointing_disable()
        run.task_model.config.use_cache = True
    if out_dir is None:
        return
    if run.lora:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        run.model.save_pretrained(str(out_dir), safe_serialization=True, state_dict=state)  # the adapter only
        if not run.lm:
            save_head(run.task_model, out_dir, data.name)
        copy_tokenizer(init_ckpt, out_dir)
    elif run.lm:
        run.task_model.save_pretrained(str(out_dir), state_dict=state)
        copy_tokenizer(init_ckpt, Path(out_dir))
    else:
        save_task_model(run.task_model, init_ckpt, out_dir, data.name)
