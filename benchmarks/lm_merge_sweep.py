"""How far can a merge's knobs take the SmolLM2 LoRA experts? (a benchmark, not a test)

Takes the four one-shot experts that ``benchmarks/lm_merge_quality.py`` (or ``make lm-quickstart``) trained
into ``--workdir``'s store, merges them in process over a grid (task arithmetic's λ, TIES' density and
scaling, DARE-TIES, TSV-M, Iso-C and Iso-CTS), and scores each merged model's choice accuracy per task twice:

- on a **validation** slice (a seeded sample of ``--validation`` rows of each task's train split: the
  experts drew 320 of its 1,600-1,920 rows, so about one in five of these was trained on) — the slice a
  recipe is chosen on;
- on the **eval** split the workflow reports (96 examples a task).

It prints every configuration's mean normalized score (merged / expert, per task, averaged) on both, and
the configuration chosen on validation with its eval score: a fair recipe search. The best eval score of
the grid is printed too, marked as chosen on the test data: an upper bound of what these knobs reach,
not a result.

    python benchmarks/lm_merge_quality.py --workdir lmq     # trains the experts (once)
    python benchmarks/lm_merge_sweep.py --workdir lmq       # ~10 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SPEC = ROOT / "workflows" / "lm-quickstart.yaml"
GRID: list[tuple[str, dict]] = [
    ("task_arithmetic", {"scaling": 0.3}),
    ("task_arithmetic", {"scaling": 0.5}),
    ("task_arithmetic", {"scaling": 0.7}),
    ("task_arithmetic", {"scaling": 1.0}),
    ("ties", {"density": 0.2, "scaling": 1.0}),
    ("ties", {"density": 0.2, "scaling": 1.5}),
    ("ties", {"density": 0.2, "scaling": 2.0}),
    ("ties", {"density": 0.5, "scaling": 1.0}),
    ("ties", {"density": 0.5, "scaling": 1.5}),
    ("dare_ties", {"drop_rate": 0.5, "scaling": 1.5, "seed": 0}),
    ("tsv_m", {"scaling": 1.0}),
    ("tsv_m", {"scaling": 1.5}),
    ("iso_c", {"scaling": 1.0}),
    ("iso_c", {"scaling": 1.5}),
    ("iso_cts", {"scaling": 1.0}),
]


def one_shot_experts(store: Path, tasks: list[str], steps: int) -> dict[str, Path]:
    """Each task's one-shot expert in the store (round 0, trained for the spec's whole budget)."""
    found: dict[str, Path] = {}
    for task in tasks:
        for d in sorted((store / "lm-quickstart" / "round-000" / "experts").glob(f"{task}-*")):
            prov = json.loads((d / "mergeflow.json").read_text())
            if (d / "_COMPLETE").exists() and prov["finetune"]["max_steps"] == steps:
                found[task] = d
    missing = sorted(set(tasks) - set(found))
    if missing:
        sys.exit(f"no one-shot expert for {missing} under {store}: run benchmarks/lm_merge_quality.py --workdir "
                 f"{store.parent} first")
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="lm_merge_quality.py's --workdir (its store)")
    ap.add_argument("--validation", type=int, default=96, help="validation rows a task (sampled from the train split)")
    ap.add_argument("--methods", default=None, help="only these methods of the grid (comma-separated)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from operators.checkpoint import load_causal_lm, resolve_model_path
    from operators.data import Split
    from operators.evaluate import choice_accuracy
    from operators.finetune import lm_tokenizer
    from operators.merge.engine import merge_checkpoints
    from pipeline.context import task_data
    from pipeline.spec import load_workflow

    torch.set_num_threads(2)
    wf = load_workflow(SPEC)
    base = resolve_model_path(wf.base_model)
    tokenizer = lm_tokenizer(base)
    tasks = [t.name for t in wf.tasks]
    experts = one_shot_experts(args.workdir / "store", tasks, wf.finetune.max_steps)
    splits = {}
    for t in wf.tasks:
        data = task_data(t)
        n = len(data.train)
        # a seeded sample, not the split's tail: the train splits come grouped by label, and a slice of one
        # label would let every model choose right (the choices are the slice's distinct answers)
        tail = sorted(random.Random(0).sample(range(n), args.validation))
        tr = data.train
        splits[t.name] = {
            "validation": Split(texts=[tr.texts[i] for i in tail], labels=[], prompts=[tr.prompts[i] for i in tail],
                                answers=[tr.answers[i] for i in tail]),
            "eval": data.eval}

    def scores(model) -> dict[str, dict[str, float]]:
        return {part: {t: choice_accuracy(model, tokenizer, splits[t][part], max_length=wf.finetune.max_length)
                       for t in tasks} for part in ("validation", "eval")}

    start = time.perf_counter()
    reference = {}
    for t, d in experts.items():  # each expert on its own task: the normalizer
        model = load_causal_lm(d, base)
        reference[t] = {part: choice_accuracy(model, tokenizer, splits[t][part], max_length=wf.finetune.max_length)
                        for part in ("validation", "eval")}
    rows = []
    work = Path(tempfile.mkdtemp(prefix="mergeflow-sweep-"))
    try:
        for method, params in [g for g in GRID if args.methods is None or g[0] in args.methods.split(",")]:
            out = work / f"{method}-{len(rows)}"
            merge_checkpoints(base, experts, method, params, out)
            s = scores(load_causal_lm(out))
            shutil.rmtree(out)
            row = {"method": method, "params": params, "scores": s}
            for part in ("validation", "eval"):
                row[f"{part}_normalized"] = sum(s[part][t] / reference[t][part] for t in tasks) / len(tasks)
                row[f"{part}_mean"] = sum(s[part].values()) / len(tasks)
            rows.append(row)
            print(f"{method:16s} {json.dumps(params):40s} validation {row['validation_normalized']:.3f}  "
                  f"eval {row['eval_normalized']:.3f} (mean {row['eval_mean']:.3f})  "
                  + " ".join(f"{t}={s['eval'][t]:.3f}" for t in tasks), file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    chosen = max(rows, key=lambda r: r["validation_normalized"])
    oracle = max(rows, key=lambda r: r["eval_normalized"])
    report = {"experts": reference, "grid": rows, "chosen_on_validation": chosen, "best_on_eval": oracle,
              "seconds": time.perf_counter() - start}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print("experts (eval): " + " ".join(f"{t}={reference[t]['eval']:.3f}" for t in tasks))
    print(f"{'method':16s} {'params':40s} {'validation':>10s} {'eval':>6s}   (mean normalized choice accuracy)")
    for r in rows:
        print(f"{r['method']:16s} {json.dumps(r['params']):40s} {r['validation_normalized']:10.3f} "
              f"{r['eval_normalized']:6.3f}")
    print(f"chosen on validation: {chosen['method']} {json.dumps(chosen['params'])}: eval normalized "
          f"{chosen['eval_normalized']:.3f} (mean {chosen['eval_mean']:.3f}); target 0.90: "
          f"{'MET' if chosen['eval_normalized'] >= 0.90 else 'NOT MET'}")
    print(f"best of the grid on eval (chosen on the test data: an upper bound, not a result): {oracle['method']} "
          f"{json.dumps(oracle['params'])}: {oracle['eval_normalized']:.3f}")
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
