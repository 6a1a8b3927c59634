"""The LoRA causal-LM workflow's operators on one device, timed: experts, both merge modes, scores.

    python benchmarks/lora_causal_lm.py [--spec workflows/lora-causal-lm.yaml] [--device cuda] [--json]

Runs what ``mergeflow run workflows/lora-causal-lm.yaml`` runs (the same spec, data, settings and
seeds), through the same operators, sequentially in this process and without Ray or MLflow, so that
it also runs where those are not installed (a bare GPU machine). It prints, per expert: training
tokens/s and examples/s, peak GPU memory, trainable parameters, adapter size; per merge mode (exact
TIES, adapter SVD at the sum of ranks and at rank 8, adapter concat for task arithmetic): seconds,
output size, the adapter error; and the exact-match table (base, expert, merged). Merge memory on
a large model is measured by ``benchmarks/lora_merge_cost.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default="workflows/lora-causal-lm.yaml")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from operators.checkpoint import resolve_model_path
    from operators.data import load_task_data
    from operators.evaluate import evaluate
    from operators.finetune import finetune
    from operators.merge.engine import merge_checkpoints
    from pipeline.spec import load_workflow

    torch.set_num_threads(args.threads)
    wf = load_workflow(args.spec)
    base = resolve_model_path(wf.base_model)
    work = Path(tempfile.mkdtemp(prefix="mergeflow-lora-bench-"))
    data = {t.name: load_task_data(t.name, t.dataset, t.label_names, t.type) for t in wf.tasks}
    headline = {t.name: t.headline_metric for t in wf.tasks}

    def score(ckpt: Path, adapter_base: Path | None = None) -> dict[str, float]:
        return {n: evaluate(ckpt, d, adapter_base=adapter_base, headline=headline[n], device=args.device,
                            max_length=wf.finetune.max_length)["accuracy"] for n, d in data.items()}

    report: dict = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                    "experts": {}, "merges": {}, "scores": {}}
    report["scores"]["base"] = score(base)
    experts: dict[str, Path] = {}
    for task in wf.tasks:
        out = work / "experts" / task.name
        res = finetune(base, data[task.name], wf.finetune_for(task), out, device=args.device)
        experts[task.name] = out
        report["experts"][task.name] = {
            "steps": res.steps, "seconds": round(res.seconds, 2), "tokens_per_s": round(res.tokens_per_second),
            "examples_per_s": round(res.examples_seen / res.seconds, 1), "precision": res.precision,
            "peak_gpu_mib": round(res.peak_gpu_bytes / 2**20, 1), "trainable_params": res.trainable_parameters,
            "adapter_kib": round(dir_bytes(out) / 1024, 1)}
    report["scores"]["expert"] = {n: evaluate(experts[n], d, adapter_base=base, headline=headline[n],
                                              device=args.device)["accuracy"] for n, d in data.items()}

    variants = [
        ("exact ties", wf.merge.method, wf.merge.params, dict(lora_mode="exact")),
        ("adapter svd (sum of ranks)", wf.merge.method, wf.merge.params, dict(lora_mode="adapter")),
        ("adapter svd rank 8", wf.merge.method, wf.merge.params, dict(lora_mode="adapter", adapter_rank=8)),
        ("exact task_arithmetic", "task_arithmetic", {"scaling": 0.5}, dict(lora_mode="exact")),
        ("adapter concat task_arithmetic", "task_arithmetic", {"scaling": 0.5},
         dict(lora_mode="adapter", adapter_factorization="concat")),
    ]
    for label, method, params, opts in variants:
        out = work / "merged" / label.replace(" ", "-").replace("(", "").replace(")", "")
        start = time.perf_counter()
        rep = merge_checkpoints(base, experts, method, params, out, **opts)
        seconds = time.perf_counter() - start
        adapter = opts["lora_mode"] == "adapter"
        report["merges"][label] = {"seconds": round(seconds, 3), "output_kib": round(dir_bytes(out) / 1024, 1),
                                   "adapter_rank": rep.adapter_rank if adapter else None,
                                   "relative_error": rep.adapter_error if adapter else 0.0}
        report["scores"][label] = score(out, base if adapter else None)

    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"device: {args.device} {report['gpu'] or ''}   spec: {args.spec}   base: {wf.base_model}")
    print("\nexperts (LoRA)          steps  seconds  tokens/s  examples/s  precision  peak GPU MiB  trainable  adapter KiB")
    for n, e in report["experts"].items():
        print(f"  {n:<20} {e['steps']:>7} {e['seconds']:>8} {e['tokens_per_s']:>9} {e['examples_per_s']:>11} "
              f"{e['precision']:>10} {e['peak_gpu_mib']:>13} {e['trainable_params']:>10} {e['adapter_kib']:>12}")
    print("\nmerge (memory: see benchmarks/lora_merge_cost.py)  seconds  output KiB  rank  rel. error")
    for label, m in report["merges"].items():
        print(f"  {label:<48} {m['seconds']:>8} {m['output_kib']:>11} "
              f"{str(m['adapter_rank'] or '-'):>5} {m['relative_error']:>11.2e}")
    tasks = list(data)
    print("\nscore (" + ", ".join(f"{t}: {headline[t]}" for t in tasks) + ")")
    print(f"  {'model':<33} " + " ".join(f"{t:>10}" for t in tasks) + f" {'mean':>8}")
    for label, row in report["scores"].items():
        print(f"  {label:<33} " + " ".join(f"{row[t]:>10.3f}" for t in tasks) + f" {sum(row.values()) / len(row):>8.3f}")


if __name__ == "__main__":
    main()
