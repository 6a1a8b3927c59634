"""Fine-tune speed: mergeflow's operator against a plain transformers ``Trainer`` + peft (a benchmark, not a test).

Both sides fine-tune the same LoRA causal-LM expert in one process:

- mergeflow: ``operators.finetune.finetune`` with a ``FinetuneSpec(mode="lora", ...)``;
- Trainer: ``get_peft_model`` with the same ``LoraConfig`` (r, alpha, dropout, target modules), then a
  ``transformers.Trainer`` with the same learning rate, linear schedule (no warm-up), AdamW, weight decay,
  max_grad_norm, batch size, max_steps and seed; no eval, no checkpoints, logging off, no dataloader workers.

Same data, same batches: a prompt/response task from ``packaged:vader_sentiment`` (prompt "{text} sentiment:",
response " {label}"), tokenised by ``operators.finetune.encode_lm`` (prompt masked with -100, response + EOS
learned). The Trainer reads those rows in exactly the order mergeflow's loop draws them (its ``_batches``
with the same seed; a sequential sampler) and collates them with ``collate_lm``, so both sides see identical
batches, and with LoRA dropout 0 (the default here) they compute the same losses: the mean training loss of
both is printed as a check that they did the same work.

What is timed is the training loop only, nothing of loading or saving:
- mergeflow: ``FinetuneResult.seconds`` (from after the optimiser is built to after the last step);
- Trainer: ``perf_counter`` between its ``on_train_begin`` and ``on_train_end`` callbacks (after its optimiser,
  scheduler and dataloader are built; the same span as its own ``train_runtime`` metric, also reported).
The whole call (load → LoRA → train → adapter saved) is reported too, as "call wall", and the process CPU time
of each loop (read at the same two points): on a shared machine it moves far less with the load than wall time.

Method: one short untimed warm-up run of each side, then ``--repeats`` alternating timed runs (the order swaps
every repeat), medians reported; same torch thread count for both (default 1: on a busy 2-core machine two
OpenMP threads made each step 30-50x slower). Then one instrumented run of each side splits
its loop into forward, backward, gradient clipping, ``optimizer.step`` and what is left: the time spent outside
the optimiser steps (batch building, scheduler, zero_grad, bookkeeping, callbacks). The instrumentation is not
part of the timed runs (on CUDA it synchronises at every phase boundary).

    python benchmarks/finetune_speed.py                                  # word-llama, CPU
    python benchmarks/finetune_speed.py --model smollm2-135m --batch-size 8 --steps 10 --repeats 3   # a real LM
    python benchmarks/finetune_speed.py --model tiny-llama --steps 200
    python benchmarks/finetune_speed.py --device cuda --batch-size 64    # bf16 on both sides, peak GPU memory
    python benchmarks/finetune_speed.py --json > finetune_speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SOURCE = "packaged:vader_sentiment"
PROMPT, RESPONSE = "{text} sentiment:", " {label}"


# --- inputs -------------------------------------------------------------------------------------------

def base_model(name: str, work: Path) -> Path:
    """The start checkpoint: a packaged model (smollm2-135m: a real pretrained Llama of 134.5M parameters;
    word-llama: 0.82M, built once per machine) or a pico Llama built here."""
    if name in ("word-llama", "smollm2-135m"):
        from operators.checkpoint import resolve_model_path

        return resolve_model_path(f"packaged:{name}")
    from tests.helpers import make_tiny_causal_lm

    return make_tiny_causal_lm(work / "tiny-llama", arch="llama")


def task_data():
    from operators.data import load_task_data
    from pipeline.spec import DatasetSpec, PromptTemplate

    spec = DatasetSpec(source=SOURCE, template=PromptTemplate(prompt=PROMPT, response=RESPONSE))
    return load_task_data("sentiment", spec, [], task_type="causal_lm")


def finetune_spec(args):
    from pipeline.spec import FinetuneSpec, LoraSpec

    return FinetuneSpec(
        mode="lora", lora=LoraSpec(r=args.r, alpha=args.alpha, dropout=args.lora_dropout),
        precision=args.precision, max_steps=args.steps, learning_rate=args.lr, weight_decay=args.weight_decay,
        warmup_ratio=0.0, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
        max_grad_norm=args.max_grad_norm, log_every=args.steps,  # one loss record at the end: logging off
    )


def lora_config(spec, model):
    """The ``LoraConfig`` mergeflow's ``add_lora`` builds for a causal LM, built here for the Trainer side."""
    from peft import LoraConfig, TaskType

    from operators.checkpoint import default_lora_targets

    return LoraConfig(
        r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
        target_modules=spec.lora.target_modules or default_lora_targets(model.config.model_type),
        use_rslora=spec.lora.use_rslora, bias="none", task_type=TaskType.CAUSAL_LM,
    )


def training_rows(base: Path, data, spec):
    """mergeflow's encoded rows, in the order its loop draws them; and the tokens each side will see."""
    from operators.finetune import _batches, collate_lm, encode_lm, lm_tokenizer

    tokenizer = lm_tokenizer(base)
    encoded = encode_lm(tokenizer, data.train, spec.max_length)
    order = list(_batches(data.train, spec.batch_size, spec.max_steps, torch.Generator().manual_seed(spec.seed)))
    rows = [encoded[i] for batch in order for i in batch]
    tokens = sum(int(collate_lm([encoded[i] for i in b], tokenizer.pad_token_id, "cpu")["attention_mask"].sum())
                 for b in order)
    return rows, tokenizer.pad_token_id, tokens


# --- the two sides ---------------------------------------------------------------------------------------

class _LoopCpuClock:
    """Stands in for ``time`` inside ``operators.finetune``: its loop (``_train``) reads ``perf_counter`` at the
    start and the end of the loop; this also reads the process CPU time there (a measure less sensitive to
    load). Reads from elsewhere (the load and save timers) pass through."""

    def __init__(self):
        self.cpu: list[float] = []

    def perf_counter(self) -> float:
        if sys._getframe(1).f_code.co_name == "_train":
            self.cpu.append(time.process_time())
        return time.perf_counter()


def run_mergeflow(base: Path, data, spec, device: str, threads: int, out: Path) -> dict:
    import operators.finetune as ft

    gc.collect()
    clock = _LoopCpuClock()
    ft.time = clock
    try:
        wall = time.perf_counter()
        result = ft.finetune(base, data, spec, out, device=device, torch_threads=threads)
        wall = time.perf_counter() - wall
    finally:
        ft.time = time
    if len(clock.cpu) != 2:
        raise RuntimeError(f"finetune's loop read its clock {len(clock.cpu)} times, not 2 (start, end): update this "
                           "benchmark")
    return {"seconds": result.seconds, "cpu_seconds": clock.cpu[1] - clock.cpu[0], "call_wall_s": wall,
            "examples": result.examples_seen,
            "tokens": result.tokens_seen, "mean_loss": result.mean_loss, "peak_gpu_bytes": result.peak_gpu_bytes,
            "trainable_parameters": result.trainable_parameters, "precision": result.precision}


def run_trainer(base: Path, rows, pad_id: int, spec, device: str, threads: int, out: Path, optim: str) -> dict:
    from peft import get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from operators.checkpoint import quiet_transformers
    from operators.finetune import collate_lm, resolve_precision

    class InOrder(Trainer):
        """A plain Trainer that reads the rows in the given order (they are already mergeflow's shuffle)."""

        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

    class LoopClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.start
            self.cpu_seconds = time.process_time() - self.cpu_start

    gc.collect()
    quiet_transformers()
    torch.set_num_threads(threads)
    precision = resolve_precision(spec.precision, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    wall = time.perf_counter()
    torch.manual_seed(spec.seed)  # as mergeflow: fixes LoRA's A initialisation
    model = AutoModelForCausalLM.from_pretrained(str(base))
    model = get_peft_model(model, lora_config(spec, model))
    args = TrainingArguments(
        output_dir=str(out), max_steps=spec.max_steps, per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=1, learning_rate=spec.learning_rate, weight_decay=spec.weight_decay,
        max_grad_norm=spec.max_grad_norm or 0.0, lr_scheduler_type="linear", warmup_steps=0, optim=optim,
        seed=spec.seed, logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[],
        dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False,
        use_cpu=not device.startswith("cuda"), bf16=precision == "bf16",
    )
    clock = LoopClock()
    trainer = InOrder(model=model, args=args, train_dataset=rows, callbacks=[clock],
                      data_collator=lambda batch: collate_lm(batch, pad_id, "cpu"))
    trainer.remove_callback(PrinterCallback)  # logging off: it would print the final metrics inside the timed span
    result = trainer.train()
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    model.save_pretrained(str(out), safe_serialization=True)  # the adapter only, as mergeflow saves it
    wall = time.perf_counter() - wall
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"seconds": clock.seconds, "cpu_seconds": clock.cpu_seconds, "train_runtime": result.metrics["train_runtime"], "call_wall_s": wall,
            "examples": len(rows), "mean_loss": result.training_loss, "peak_gpu_bytes": peak,
            "trainable_parameters": trainable, "precision": precision}


# --- where the loop's time goes (instrumented runs only) -----------------------------------------------------

class PhaseClock:
    """Times forward, backward, gradient clipping and ``optimizer.step`` of every step, on either side.

    Hooks that both loops go through: the peft model's ``forward`` (class level), ``torch.autograd.backward``,
    ``torch.nn.utils.clip_grad_norm_`` and the global optimiser step hooks. A forward starts at the first
    model call after the previous optimiser step; it ends where backward begins (the loss is computed in
    the model). On CUDA each boundary synchronises, so GPU time lands in its phase.
    """

    PHASES = ("forward", "backward", "clip", "optimizer_step")

    def __init__(self, device: str):
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        self.total = dict.fromkeys(self.PHASES, 0.0)
        self.steps = 0
        self._mark: float | None = None

    def _now(self) -> float:
        self.sync()
        return time.perf_counter()

    def _close(self, phase: str) -> None:
        t = self._now()
        if self._mark is not None:
            self.total[phase] += t - self._mark
        self._mark = t

    @contextlib.contextmanager
    def installed(self):
        import peft

        cls = peft.PeftModelForCausalLM
        forward, backward, clip = cls.forward, torch.autograd.backward, torch.nn.utils.clip_grad_norm_
        clock = self

        def timed_forward(self_, *a, **k):
            if clock._mark is None:
                clock._mark = clock._now()
            return forward(self_, *a, **k)

        def timed_backward(*a, **k):
            clock._close("forward")
            out = backward(*a, **k)
            clock._close("backward")
            return out

        def timed_clip(*a, **k):
            clock._close("backward")  # anything between backward and the clip (none in either loop)
            out = clip(*a, **k)
            clock._close("clip")
            return out

        def pre_step(opt, a, k):
            clock._close("clip")  # between clipping and the step: nothing in mergeflow; hooks in the Trainer

        def post_step(opt, a, k):
            clock._close("optimizer_step")
            clock.steps += 1
            clock._mark = None

        cls.forward, torch.autograd.backward, torch.nn.utils.clip_grad_norm_ = timed_forward, timed_backward, timed_clip
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        handles = [register_optimizer_step_pre_hook(pre_step), register_optimizer_step_post_hook(post_step)]
        try:
            yield self
        finally:
            cls.forward, torch.autograd.backward, torch.nn.utils.clip_grad_norm_ = forward, backward, clip
            for h in handles:
                h.remove()


# --- report -------------------------------------------------------------------------------------------------

def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def table(report: dict) -> str:
    m, t = report["mergeflow"], report["trainer"]
    cuda = report["device"].startswith("cuda")

    def row(label: str, a: str, b: str) -> str:
        return f"  {label:<42}{a:>26}{b:>26}"

    lines = [
        f"fine-tune speed: LoRA causal LM on {report['model']} ({report['trainable_parameters']:,} trainable "
        f"parameters, r={report['lora']['r']}, alpha={report['lora']['alpha']}, dropout={report['lora']['dropout']})",
        f"  data: {SOURCE}, {report['train_rows']} train rows, prompt {PROMPT!r} / response {RESPONSE!r}; "
        f"{report['steps']} steps x batch {report['batch_size']} = {report['examples']} examples, "
        f"{report['tokens']:,} tokens (padding excluded)",
        f"  {report['device']} ({report['device_name']}), {report['precision']}, torch threads {report['threads']}, "
        f"{report['repeats']} timed repeats (alternating, after 1 untimed warm-up run each), medians; "
        f"Trainer optim {report['trainer_optim']}",
        f"  load average before / after: {report['load_before']} / {report['load_after']}",
        "",
        row("", "mergeflow", "Trainer+peft"),
        row("training loop seconds (median)", f"{median(m['runs'], 'seconds'):.3f}", f"{median(t['runs'], 'seconds'):.3f}"),
        row("  best of the repeats", f"{min(r['seconds'] for r in m['runs']):.3f}",
            f"{min(r['seconds'] for r in t['runs']):.3f}"),
        row("  Trainer's own train_runtime (median)", "-", f"{median(t['runs'], 'train_runtime'):.3f}"),
        row("loop CPU seconds, process (median)", f"{median(m['runs'], 'cpu_seconds'):.3f}",
            f"{median(t['runs'], 'cpu_seconds'):.3f}"),
        row("examples/s", f"{report['examples_per_s']['mergeflow']:.1f}", f"{report['examples_per_s']['trainer']:.1f}"),
        row("tokens/s", f"{report['tokens_per_s']['mergeflow']:.0f}", f"{report['tokens_per_s']['trainer']:.0f}"),
        row("call wall s: load->train->saved (median)", f"{median(m['runs'], 'call_wall_s'):.2f}",
            f"{median(t['runs'], 'call_wall_s'):.2f}"),
        row("mean training loss (same work check)", f"{m['runs'][0]['mean_loss']:.6f}", f"{t['runs'][0]['mean_loss']:.6f}"),
    ]
    if cuda:
        lines.append(row("peak GPU memory MiB (load->train end)", f"{m['runs'][0]['peak_gpu_bytes'] / 2**20:.1f}",
                         f"{t['runs'][0]['peak_gpu_bytes'] / 2**20:.1f}"))
    lines += ["", "  loop seconds, repeat by repeat (repeat i: both sides back to back, order swapped every repeat):",
              "    mergeflow  " + " ".join(f"{r['seconds']:6.2f}" for r in m["runs"]),
              "    Trainer    " + " ".join(f"{r['seconds']:6.2f}" for r in t["runs"]),
              "    ratio      " + " ".join(f"{x:6.2f}" for x in report["paired_ratios"]) + "   (Trainer / mergeflow time)"]
    if report.get("breakdown"):
        mb, tb = report["breakdown"]["mergeflow"], report["breakdown"]["trainer"]
        lines += ["", f"  one instrumented run each, ms per step (loop {mb['loop_seconds']:.2f}s / "
                      f"{tb['loop_seconds']:.2f}s; steps seen by the hooks {mb['steps']} / {tb['steps']}):"]
        for k in (*PhaseClock.PHASES, "outside_optimizer_steps"):
            lines.append(row(f"  {k.replace('_', ' ')}", f"{mb['ms_per_step'][k]:.2f}", f"{tb['ms_per_step'][k]:.2f}"))
    ratio = report["ratio_examples_per_s"]
    lines += ["", f"  mergeflow / Trainer throughput (ratio of median loop times): {ratio:.2f}x "
                  f"(target >= 1.00x: {'met' if ratio >= 1.0 else 'NOT met'}); repeat by repeat, median "
                  f"{statistics.median(report['paired_ratios']):.2f}x; by loop CPU time {report['ratio_cpu']:.2f}x"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["word-llama", "smollm2-135m", "tiny-llama"], default="word-llama")
    p.add_argument("--steps", type=int, default=20, help="optimiser steps per run (default 20)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each side, alternating (default 5)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads, both sides (default 1: on a busy 2-core machine 2 threads made "
                        "every step 30-50x slower, OpenMP threads waiting for each other)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on a CUDA device that supports it (Trainer bf16=True), else fp32")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.0, help="0 keeps the two sides' losses comparable")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-steps", type=int, default=5, help="steps of the untimed warm-up run of each side")
    p.add_argument("--trainer-optim", default="adamw_torch",
                   help="Trainer optim: adamw_torch is torch.optim.AdamW, as mergeflow uses (the Trainer's own "
                        "default on torch>=2.8 is adamw_torch_fused)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the instrumented runs")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    threads = args.threads
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, each run

    def log(msg: str) -> None:  # progress on stderr, so --json output stays clean
        print(msg, file=sys.stderr, flush=True)

    from operators.finetune import resolve_precision

    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="finetune-speed-") as tmp:
        work = Path(tmp)
        base = base_model(args.model, work)
        data = task_data()
        spec = finetune_spec(args)
        rows, pad_id, tokens = training_rows(base, data, spec)

        def one(side: str, s, tag: str, rows_=rows) -> dict:
            out = work / f"{side}-{tag}"
            if side == "mergeflow":
                r = run_mergeflow(base, data, s, args.device, threads, out)
            else:
                r = run_trainer(base, rows_, pad_id, s, args.device, threads, out, args.trainer_optim)
            if args.device == "cuda":
                torch.cuda.empty_cache()
            return r

        warm = spec.model_copy(update={"max_steps": args.warmup_steps})
        warm_rows = rows[:args.warmup_steps * args.batch_size]
        for side in ("mergeflow", "trainer"):
            log(f"warm-up: {side}, {args.warmup_steps} steps (untimed)")
            one(side, warm, "warmup", warm_rows)
        runs: dict[str, list[dict]] = {"mergeflow": [], "trainer": []}
        for i in range(args.repeats):
            for side in (("mergeflow", "trainer") if i % 2 == 0 else ("trainer", "mergeflow")):
                r = one(side, spec, f"run{i}")
                runs[side].append(r)
                log(f"repeat {i + 1}/{args.repeats}: {side:<9} loop {r['seconds']:.3f}s  loss {r['mean_loss']:.6f}")
        m0 = runs["mergeflow"][0]
        if m0["tokens"] != tokens:
            raise SystemExit(f"mergeflow saw {m0['tokens']} tokens, the Trainer's batches hold {tokens}: "
                             "the two sides did not see the same batches")
        breakdown = {}
        if not args.no_breakdown:
            for side in ("mergeflow", "trainer"):
                clock = PhaseClock(args.device)
                with clock.installed():
                    r = one(side, spec, "instrumented")
                per = {k: 1e3 * v / spec.max_steps for k, v in clock.total.items()}
                per["outside_optimizer_steps"] = 1e3 * (r["seconds"] - sum(clock.total.values())) / spec.max_steps
                breakdown[side] = {"loop_seconds": r["seconds"], "steps": clock.steps, "ms_per_step": per}
                log(f"instrumented: {side:<9} loop {r['seconds']:.3f}s")

    eps = {k: len(rows) / median(v, "seconds") for k, v in runs.items()}
    report = {
        "model": args.model, "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "precision": resolve_precision(args.precision, args.device), "threads": threads,
        "steps": args.steps, "batch_size": args.batch_size, "repeats": args.repeats,
        "lora": {"r": args.r, "alpha": args.alpha, "dropout": args.lora_dropout},
        "learning_rate": args.lr, "weight_decay": args.weight_decay, "max_grad_norm": args.max_grad_norm,
        "trainer_optim": args.trainer_optim, "train_rows": len(data.train), "examples": len(rows), "tokens": tokens,
        "trainable_parameters": m0["trainable_parameters"],
        "timing": {"mergeflow": "FinetuneResult.seconds (the training loop)",
                   "trainer": "perf_counter from on_train_begin to on_train_end (train_runtime's span)"},
        "mergeflow": {"runs": runs["mergeflow"]}, "trainer": {"runs": runs["trainer"]},
        "examples_per_s": eps, "tokens_per_s": {k: tokens / median(v, "seconds") for k, v in runs.items()},
        "ratio_examples_per_s": eps["mergeflow"] / eps["trainer"], "breakdown": breakdown,
        "ratio_cpu": median(runs["trainer"], "cpu_seconds") / median(runs["mergeflow"], "cpu_seconds"),
        "paired_ratios": [t["seconds"] / m["seconds"] for m, t in zip(runs["mergeflow"], runs["trainer"], strict=True)],
        "load_before": load_before, "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
