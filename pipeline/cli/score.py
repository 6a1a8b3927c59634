"""``mergeflow lm-eval``: score any causal-LM checkpoint (a merged model, an expert, an export) with
lm-evaluation-harness, as a workflow's ``evaluation.lm_eval`` scores its merged model."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline.cli.common import EXIT_BAD_INPUT, EXIT_FAILED, fail, new_console
from pipeline.cli.group import main


@main.command("lm-eval")
@click.argument("checkpoint", type=click.Path())
@click.option("--tasks", required=True, help="Comma-separated harness tasks (lm-eval ls tasks) or tasks in "
              "--include-path.")
@click.option("--include-path", type=click.Path(), default=None, help="A folder of your own task YAML files.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many examples per task.")
@click.option("--num-fewshot", type=click.IntRange(min=0), default=None, help="Examples in each prompt.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the harness' record as JSON instead of a table.")
def lm_eval(checkpoint: str, tasks: str, include_path: str | None, limit: int | None, num_fewshot: int | None,
            batch_size: int, device: str, seed: int, as_json: bool) -> None:
    """Score CHECKPOINT (a causal LM folder, a LoRA adapter folded into the base its provenance names, or a
    store URI such as s3://bucket/...) with lm-evaluation-harness. Needs: pip install 'mergeflow[lm-eval]'."""
    from operators.checkpoint import adapter_base_of
    from operators.checkpoint_files import (
        is_adapter_checkpoint,
        is_causal_lm_adapter,
        is_causal_lm_checkpoint,
    )
    from operators.harness import LmEvalUnavailable, lm_eval_scores

    if "://" in checkpoint:
        from pipeline.store import StoreError, fetch_checkpoint

        try:
            checkpoint = str(fetch_checkpoint(checkpoint))
        except (StoreError, OSError) as exc:
            fail(f"CHECKPOINT {checkpoint}: {exc}", EXIT_BAD_INPUT)
    src = Path(checkpoint)
    if not src.is_dir():
        fail(f"CHECKPOINT {checkpoint}: {'is a file' if src.exists() else 'no such directory'}; give a causal-LM "
             "checkpoint folder (mergeflow status RUN_ID lists a run's models)", EXIT_BAD_INPUT)
    adapter = is_adapter_checkpoint(src)
    if not (is_causal_lm_adapter(src) if adapter else is_causal_lm_checkpoint(src)):
        fail(f"CHECKPOINT {checkpoint} is not a causal LM (its config.json names no *ForCausalLM architecture); "
             "lm-eval scores causal language models", EXIT_BAD_INPUT)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    try:
        scores = lm_eval_scores(src, names, adapter_base=adapter_base_of(src) if adapter else None,
                                include_path=include_path, limit=limit, num_fewshot=num_fewshot,
                                batch_size=batch_size, device=device, seed=seed)
    except LmEvalUnavailable as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    except Exception as exc:  # the harness' own failures (a task's data it cannot read, ...)
        fail(f"lm-eval failed: {type(exc).__name__}: {exc}", EXIT_FAILED)
    if as_json:
        click.echo(json.dumps(scores.record(), indent=2, sort_keys=True))
        return
    from rich.table import Table

    table = Table("task", "metric", "value", "stderr", "n", title=f"lm-eval: {checkpoint}")
    for task, metrics in scores.scores.items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr"):
                continue
            err = metrics.get(f"{metric}_stderr")
            table.add_row(task, metric, f"{value:.4f}", "" if err is None else f"{err:.4f}",
                          str(scores.n_samples.get(task, "")))
    new_console().print(table)
