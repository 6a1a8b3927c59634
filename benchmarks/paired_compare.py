"""Two or more merged models on the same eval examples: mean accuracy with 95% intervals, and each model's
difference from the first with a *paired* 95% bootstrap interval (a benchmark, not a test).

Paired: every draw resamples the same eval examples (within each task) for all models, so the interval
of a difference is that of the difference, not of two independent means; a difference whose interval
excludes 0 is outside noise at 95%. Each model is scored with its own task heads (``heads/`` in the
checkpoint), as the pipeline scores it.

    python benchmarks/paired_compare.py --spec workflows/quickstart.yaml \\
        --model "one-shot Iso-CTS=/path/to/merged" --model "ATM-32, TSV-M rounds=/path/to/round-031/merged/..."
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BOOTSTRAP = 2000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default=str(ROOT / "workflows" / "quickstart.yaml"))
    ap.add_argument("--model", action="append", required=True, metavar="LABEL=PATH", help="a merged checkpoint (twice or more)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from operators.checkpoint import load_task_model, quiet_transformers
    from operators.data import load_task_data
    from operators.evaluate import predict
    from pipeline.spec import load_workflow

    torch.set_num_threads(args.threads)
    quiet_transformers()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    wf = load_workflow(args.spec)
    models = dict(m.split("=", 1) for m in args.model)
    data = {t.name: load_task_data(t.name, t.dataset, t.label_names, t.type) for t in wf.tasks}
    max_length = max(wf.finetune_for(t).max_length for t in wf.tasks)
    correct: dict[str, dict[str, np.ndarray]] = {}
    for label, path in models.items():
        tok = AutoTokenizer.from_pretrained(path)
        correct[label] = {}
        for t, d in data.items():
            pred = predict(load_task_model(path, t), tok, d.eval, max_length=max_length)
            correct[label][t] = (pred == np.asarray(d.eval.labels)).astype(np.float64)
        print(f"{label}: " + ", ".join(f"{t}={c.mean():.3f}" for t, c in correct[label].items()), flush=True)

    rng = np.random.default_rng(0)
    draws = {t: rng.integers(0, len(d.eval), size=(BOOTSTRAP, len(d.eval))) for t, d in data.items()}
    means = {label: sum(c[t][draws[t]].mean(1) for t in data) / len(data) for label, c in correct.items()}
    first = next(iter(models))
    print(f"\n{BOOTSTRAP} paired bootstrap draws (eval examples resampled within each task, seed 0)")
    print("| model | mean accuracy [95% CI] | difference from the first [95% CI] | outside noise |")
    print("|---|---|---|---|")
    for label, c in correct.items():
        mean = sum(c[t].mean() for t in data) / len(data)
        lo, hi = np.percentile(means[label], [2.5, 97.5])
        if label == first:
            print(f"| {label} | {mean:.3f} [{lo:.3f}, {hi:.3f}] | | |")
            continue
        diff = means[label] - means[first]
        dlo, dhi = np.percentile(diff, [2.5, 97.5])
        d = mean - sum(correct[first][t].mean() for t in data) / len(data)
        print(f"| {label} | {mean:.3f} [{lo:.3f}, {hi:.3f}] | {d:+.3f} [{dlo:+.3f}, {dhi:+.3f}] | "
              f"{'yes' if dlo > 0 or dhi < 0 else 'no'} |")


if __name__ == "__main__":
    main()
