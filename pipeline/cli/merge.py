"""Merging checkpoints outside a workflow: ``mergeflow merge`` (the work is in ``operators.merge``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from pipeline.cli.common import EXIT_BAD_INPUT, fail, parse_size
from pipeline.cli.group import main


@main.command()
@click.argument("config", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--shard-size", default="2GB", show_default=True, help="Output shard size (e.g. 200MB, 5GB).")
@click.option("--threads", type=int, default=None, help="Torch threads (default: all cores).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary (time, peak memory, bytes) on stdout.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def merge(config: str, out: str, shard_size: str, threads: int | None, as_json: bool, quiet: bool) -> None:
    """Merge the checkpoints CONFIG names into OUT, streaming tensor by tensor.

    CONFIG is a mergeflow merge config (base, experts, method, params) or a mergekit YAML config
    (merge_method, base_model, models, parameters, dtype), read with mergekit's semantics.
    """
    import json
    import resource

    import torch
    from tqdm import tqdm

    from operators.merge.engine import MergeError, merge_checkpoints
    from operators.merge.merge_config import MergeConfigError, load_merge_config
    from operators.merge.passthrough import stack_layers
    from operators.tensor_io import CheckpointError
    from pipeline.store import fetch_checkpoint

    if threads:
        torch.set_num_threads(threads)
    try:
        shard_bytes = parse_size(shard_size)
        plan = load_merge_config(config, fetch=fetch_checkpoint)
    except (MergeConfigError, ValueError) as exc:
        fail(f"{config}: {exc}", EXIT_BAD_INPUT)
    bar = None if quiet else tqdm(total=None, unit="tensor", desc=f"{plan.method}", file=sys.stderr, leave=False)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    start = time.perf_counter()
    try:
        made = {"config": str(Path(config).resolve()), "config_format": plan.source_format}
        if plan.method == "passthrough":  # layers stacked from slices of models: no merge arithmetic
            report = stack_layers(plan.slices, out, out_dtype=plan.out_dtype, max_shard_bytes=shard_bytes,
                                  provenance=made, progress=progress)
        else:
            vocab = None
            if plan.tokenizer_source is not None:  # vocabularies laid out in the output tokenizer's
                from operators.merge.vocab import plan_vocab

                vocab = plan_vocab(plan.base, plan.experts, plan.tokenizer_source, plan.pad_to_multiple_of)
            report = merge_checkpoints(plan.base, plan.experts, plan.method, plan.params, out,
                                       max_shard_bytes=shard_bytes, progress=progress, out_dtype=plan.out_dtype,
                                       provenance=made, adapter_bases=plan.adapter_bases or None,
                                       lora_mode=plan.lora_mode, adapter_rank=plan.adapter_rank,
                                       adapter_factorization=plan.adapter_factorization,
                                       tensor_params=plan.tensor_params, vocab=vocab)
    except (MergeError, CheckpointError, ValueError) as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    finally:
        if bar is not None:
            bar.close()
    summary = {
        "output": str(Path(out).resolve()),
        "method": plan.method,
        "config_format": plan.source_format,
        "experts": report.experts,
        "tensors": report.tensors,
        "seconds": round(time.perf_counter() - start, 3),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "bytes_read": report.bytes_read,
        "bytes_written": report.bytes_written,
        "output_files": report.output_files,
        "notes": plan.notes,
        **({"lora_mode": report.lora_mode} if report.lora_mode else {}),
        **({"adapter_rank": report.adapter_rank, "adapter_error": report.adapter_error,
            "adapter_worst_module": report.adapter_worst_module,
            "adapter_worst_module_error": report.adapter_worst_module_error} if report.lora_mode == "adapter" else {}),
    }
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"merged {len(report.experts)} models with {plan.method} into {out}: {report.tensors} tensors, "
                   f"{report.bytes_written / 1e6:.0f} MB written in {summary['seconds']:.1f} s, "
                   f"peak RSS {summary['peak_rss_bytes'] / 1e6:.0f} MB")
        if report.lora_mode == "adapter":
            click.echo(f"adapter rank {report.adapter_rank}: relative error {report.adapter_error:.3g} "
                       f"(worst {report.adapter_worst_module}: {report.adapter_worst_module_error:.3g})")
        for note in plan.notes:
            click.echo(f"note: {note}")


@main.command("extract-lora")
@click.argument("finetuned", type=click.Path())
@click.argument("base", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--rank", type=click.IntRange(min=1), default=None, help="One rank for every module.")
@click.option("--energy", type=float, default=None,
              help="Per module, the smallest rank keeping this share of ΔW's squared singular values (e.g. 0.99).")
@click.option("--max-rank", type=click.IntRange(min=1), default=None, help="Cap on the per-module rank (with --energy).")
@click.option("--skip-other", is_flag=True,
              help="Drop changes a LoRA cannot hold (norms, biases, embeddings, the output head); they are listed.")
@click.option("--json", "as_json", is_flag=True, help="Print the report (rank and relative error per module) as JSON.")
def extract_lora(finetuned: str, base: str, out: str, rank: int | None, energy: float | None, max_rank: int | None,
                 skip_other: bool, as_json: bool) -> None:
    """Write a peft LoRA adapter of FINETUNED − BASE into OUT (truncated SVD of each linear layer's ΔW).

    The adapter loads with peft's PeftModel.from_pretrained on BASE; each module's relative error
    ‖ΔW − BA‖ / ‖ΔW‖ is reported and recorded in OUT/mergeflow.json.
    """
    import json

    from operators.errors import MergeError
    from operators.extract_lora import extract_lora as extract
    from operators.tensor_io import CheckpointError

    try:
        report = extract(finetuned, base, out, rank=rank, energy=energy, max_rank=max_rank, skip_other=skip_other)
    except (MergeError, CheckpointError, ValueError) as exc:
        fail(str(exc), EXIT_BAD_INPUT)
    if as_json:
        click.echo(json.dumps({"output": str(Path(out).resolve()), **report.as_dict()}))
        return
    ranks = sorted({m["rank"] for m in report.modules.values()})
    click.echo(f"extracted a LoRA of {len(report.modules)} modules (rank {ranks[0]}"
               f"{f'-{ranks[-1]}' if len(ranks) > 1 else ''}) into {out} in {report.seconds:.1f} s: relative error "
               f"{report.error:.3g} (worst {report.worst_module}: {report.worst_error:.3g})")
    if report.skipped:
        click.echo(f"dropped {len(report.skipped)} changed tensors a LoRA cannot hold: {', '.join(report.skipped)}")


@main.command("moe")
@click.argument("config", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--shard-size", default="2GB", show_default=True, help="Output shard size (e.g. 200MB, 5GB).")
def moe(config: str, out: str, shard_size: str) -> None:
    """Build a Mixtral mixture of experts from dense experts (a mergekit-moe YAML CONFIG) into OUT.

    Attention, norms and embeddings come from base_model; each layer's experts are the experts' MLPs; the
    routers come from the prompts' hidden states (gate_mode hidden), their embeddings, or are random.
    """
    from operators.errors import MergeError
    from operators.moe import build_moe
    from operators.tensor_io import CheckpointError

    try:
        summary = build_moe(config, out, max_shard_bytes=parse_size(shard_size))
    except (MergeError, CheckpointError, ValueError) as exc:
        fail(f"{config}: {exc}" if not str(exc).startswith(str(config)) else str(exc), EXIT_BAD_INPUT)
    click.echo(f"built a Mixtral MoE of {len(summary['experts'])} experts ({summary['experts_per_token']} per token, "
               f"gates: {summary['gate_mode']}) into {out}")
