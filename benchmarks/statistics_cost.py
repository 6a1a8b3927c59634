"""What the statistics of data-driven merges cost next to the fine-tune they follow (a benchmark, not a test).

For each task of the spec (default ``workflows/quickstart.yaml``), in one process and back to back, so
that both see the same machine load: fine-tune the expert with the spec's settings on the train split
minus the validation slice (as ``merge_quality.py`` does), then compute its statistics on N = 256 of
those rows: the Gram matrices (RegMean), the diagonal Fisher as the pipeline computes it (batched
per-example gradients) and, for comparison, with one backward pass per example. Prints each as a share of
the fine-tune time (the target: at most 25%) and checks that both Fisher paths agree.

    python benchmarks/statistics_cost.py                 # the quickstart's four tasks (minutes)
    python benchmarks/statistics_cost.py --tasks sentiment --threads 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default=str(ROOT / "workflows" / "quickstart.yaml"))
    ap.add_argument("--tasks", default=None, type=lambda s: s.split(","), help="comma-separated (default: all)")
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--validation-fraction", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from operators.checkpoint import load_task_model, quiet_transformers, resolve_model_path
    from operators.data import hold_out, load_task_data
    from operators.finetune import finetune
    from operators.learn.statistics import _fisher_per_example, compute_statistics, sample_rows
    from operators.merge.statistics import open_statistics
    from pipeline.spec import load_workflow

    torch.set_num_threads(args.threads)
    quiet_transformers()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    wf = load_workflow(args.spec)
    base = resolve_model_path(wf.base_model)
    work = Path(tempfile.mkdtemp(prefix="mergeflow-stats-"))
    rows = []
    try:
        for t in wf.tasks:
            if args.tasks and t.name not in args.tasks:
                continue
            data = load_task_data(t.name, t.dataset, t.label_names, t.type)
            fit, _ = hold_out(data, args.validation_fraction, t.dataset.split_seed)
            settings = wf.finetune_for(t)
            expert = work / t.name
            ft = finetune(base, fit, settings, expert, torch_threads=args.threads).seconds
            gram = compute_statistics(expert, fit, "gram", work / f"{t.name}-gram", examples=args.examples,
                                      max_length=settings.max_length).seconds
            fisher = compute_statistics(expert, fit, "fisher", work / f"{t.name}-fisher", examples=args.examples,
                                        max_length=settings.max_length).seconds
            model = load_task_model(expert, t.name)
            tok = AutoTokenizer.from_pretrained(str(expert))
            texts = [fit.train.texts[i] for i in sample_rows(len(fit.train), args.examples, 0)]
            t0 = time.perf_counter()
            loop = _fisher_per_example(model, model.base_model, tok, texts, settings.max_length, 0, "cpu")
            loop_s = time.perf_counter() - t0
            st = open_statistics(work / f"{t.name}-fisher", "fisher", expert=expert)
            worst = max(float((st.get(k) - v).abs().max()) / max(float(v.abs().max()), 1e-12)
                        for k, v in loop.items() if float(v.abs().max()) > 1e-12)
            rows.append((t.name, ft, gram, fisher, loop_s, worst))
            print(f"{t.name}: fine-tune {ft:.1f}s ({settings.epochs} epochs, {len(fit.train)} rows); Gram {gram:.1f}s "
                  f"({gram / ft:.0%}); Fisher {fisher:.1f}s ({fisher / ft:.0%}); Fisher with one backward pass per "
                  f"example {loop_s:.1f}s ({loop_s / ft:.0%}); largest relative difference {worst:.1e}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"N = {args.examples}, {args.threads} threads, torch {torch.__version__}")
    print("| task | fine-tune | Gram (RegMean) | Fisher, batched | Fisher, one backward per example |")
    print("|---|---|---|---|---|")
    for name, ft, gram, fisher, loop_s, _ in rows:
        print(f"| {name} | {ft:.1f}s | {gram:.1f}s ({gram / ft:.0%}) | {fisher:.1f}s ({fisher / ft:.0%}) | "
              f"{loop_s:.1f}s ({loop_s / ft:.0%}) |")
    worst_share = max(max(g, f) / ft for _, ft, g, f, _, _ in rows) if rows else float("nan")
    print(f"largest share of a fine-tune: {worst_share:.0%} (target <= 25%)")


if __name__ == "__main__":
    main()
