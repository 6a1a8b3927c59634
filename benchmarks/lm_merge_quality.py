"""LoRA experts of a real pretrained causal LM, merged: do the merges keep the experts' skills and the base's
general ability? (a benchmark, not a test)

Runs ``workflows/lm-quickstart.yaml`` (SmolLM2-135M-Instruct from its package, four LoRA experts) as
``mergeflow compare`` does: one-shot task arithmetic, TIES and DARE-TIES of the same experts, and ATM at
the same compute (its rounds split each expert's budget), in one store and MLflow database under
``--workdir`` (a second run reuses every expert and merge). Then, for the base, each expert and each
variant's merged model:

- each task's headline score (choice accuracy among the task's answers; exact match of the greedy answer
  beside it), with 95% bootstrap intervals over the eval examples (``pipeline.compare.bootstrap_means``);
- normalized: the merged model's score over its task's expert's, per task and mean (the interval of the
  mean by bootstrap too, experts and merge resampled independently);
- general ability: perplexity on general English text no task trains on (``packaged:general_english``,
  chatterbot-corpus's everyday conversations), the merged model's over the base's;
- a few answers of the experts and of the best merge, side by side.

It prints the issue's targets and whether each is met:
  every expert >= 15 points above the base on its own task; the best one-shot merge >= 0.90 normalized;
  ATM at equal compute >= the best one-shot; merged perplexity within 5% of the base's.

    python benchmarks/lm_merge_quality.py                       # ~15 min on 2 CPU cores the first time
    python benchmarks/lm_merge_quality.py --workdir lmq --json  # keep the store; JSON on stdout
    python benchmarks/lm_merge_quality.py --sharpness sam:0.05 --merges task_arithmetic,ties,tsv_m  # SAM experts
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SPEC = ROOT / "workflows" / "lm-quickstart.yaml"
MERGES = ["task_arithmetic", "ties", "dare_ties"]
GENERAL_EXAMPLES = 256


def _load(model_dir: Path, adapter_base: Path | None = None):
    from operators.checkpoint import load_causal_lm
    from operators.finetune import lm_tokenizer

    return load_causal_lm(model_dir, adapter_base), lm_tokenizer(model_dir)


def perplexity(model_dir: Path, texts: list[str], adapter_base: Path | None = None) -> float:
    """Token-weighted perplexity of ``model_dir`` on ``texts`` (every token predicted; each text alone)."""
    from operators.data import Split
    from operators.evaluate import lm_metrics

    model, tokenizer = _load(model_dir, adapter_base)
    return lm_metrics(model, tokenizer, Split(texts=texts, labels=[]), max_length=64)["perplexity"]


def answers(model_dir: Path, prompts: list[str], adapter_base: Path | None = None) -> list[str]:
    from operators.evaluate import greedy_answers

    model, tokenizer = _load(model_dir, adapter_base)
    return greedy_answers(model, tokenizer, prompts, max_new_tokens=6)


def interval_of(evals: dict[str, dict[str, float]]) -> tuple[float, float]:
    from pipeline.compare import bootstrap_means, interval

    return interval(bootstrap_means(evals))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=None, help="store and MLflow database (default: a new temp dir)")
    ap.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--merges", default=",".join(MERGES), help=f"one-shot merges (default: {','.join(MERGES)})")
    ap.add_argument("--sharpness", default=None, metavar="METHOD:RHO",
                    help="train the experts sharpness-aware (finetune.sharpness, e.g. sam:0.05), at the same steps")
    args = ap.parse_args()

    import numpy as np

    from operators.checkpoint import resolve_model_path
    from operators.packaged_data import load_packaged
    from pipeline.compare import bootstrap_means, interval, run_comparison
    from pipeline.spec import load_workflow

    work = args.workdir or Path(tempfile.mkdtemp(prefix="mergeflow-lm-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    overrides = {"tracking.uri": f"sqlite:///{work / 'mlflow.db'}", "store.root": str(work / "store")}
    wf = load_workflow(SPEC, overrides)
    if args.sharpness:
        method, _, rho = args.sharpness.partition(":")
        wf = wf.model_copy(update={"finetune": wf.finetune.model_validate(
            {**wf.finetune.model_dump(), "sharpness": {"method": method, "rho": float(rho or 0.05)}})})
    start = time.perf_counter()
    comparison = run_comparison(wf, ["oneshot", "atm"], args.merges.split(","), ["mean"], work / "compare",
                                num_cpus=args.num_cpus, report=lambda m: print(m, file=sys.stderr, flush=True))
    wall = time.perf_counter() - start
    base_dir = resolve_model_path(wf.base_model)
    oneshot = next(v for v in comparison.variants if v.strategy == "oneshot").result.final
    tasks = [t.name for t in wf.tasks]
    base = oneshot.baseline
    experts = {t: oneshot.expert_evals[t][t] for t in tasks}
    general = load_packaged("general_english").column("text").to_pylist()[:GENERAL_EXAMPLES]
    base_ppl = perplexity(base_dir, general)
    rows = {}
    for v in comparison.variants:
        final = v.result.final
        merged = {t: final.merged_eval[t] for t in tasks}
        draws_merged = {t: bootstrap_means({t: merged[t]}, seed=i) for i, t in enumerate(tasks)}
        draws_expert = {t: bootstrap_means({t: experts[t]}, seed=100 + i) for i, t in enumerate(tasks)}
        norm_draws = np.mean([draws_merged[t] / np.maximum(draws_expert[t], 1e-9) for t in tasks], axis=0)
        rows[v.label] = {
            "tasks": {t: {"accuracy": merged[t]["accuracy"], "exact_match": merged[t].get("exact_match"),
                          "normalized": merged[t]["accuracy"] / experts[t]["accuracy"]} for t in tasks},
            "mean": float(np.mean([merged[t]["accuracy"] for t in tasks])),
            "mean_interval": interval_of(merged),
            "normalized": float(np.mean([merged[t]["accuracy"] / experts[t]["accuracy"] for t in tasks])),
            "normalized_interval": interval(norm_draws),
            "perplexity": perplexity(Path(final.merged.uri), general),
            "path": final.merged.uri,
        }
        rows[v.label]["perplexity_ratio"] = rows[v.label]["perplexity"] / base_ppl
    best = max((k for k in rows if k.startswith("oneshot")), key=lambda k: rows[k]["normalized"])
    lifts = {t: experts[t]["accuracy"] - base[t]["accuracy"] for t in tasks}
    lift_intervals = {t: interval(bootstrap_means({t: experts[t]}, seed=7) - bootstrap_means({t: base[t]}, seed=8))
                      for t in tasks}
    samples = {}
    for t in wf.tasks:
        from pipeline.context import task_data

        split = task_data(t).eval
        prompts, gold = split.prompts[:3], split.answers[:3]
        samples[t.name] = {"prompt": prompts, "gold": gold,
                           "expert": answers(Path(oneshot.experts[t.name].uri), prompts, adapter_base=base_dir),
                           "merged": answers(Path(rows[best]["path"]), prompts), "base": answers(base_dir, prompts)}
    report = {"wall_seconds": wall, "base": {t: base[t]["accuracy"] for t in tasks},
              "experts": {t: experts[t]["accuracy"] for t in tasks}, "expert_lift": lifts,
              "expert_lift_interval": lift_intervals, "base_perplexity": base_ppl, "variants": rows,
              "best_oneshot": best, "samples": samples}
    if args.json:
        print(json.dumps(report, indent=2, default=float))
    print_report(report, tasks)


def print_report(r: dict, tasks: list[str]) -> None:
    out = sys.stderr
    print(f"\nlm-quickstart (SmolLM2-135M-Instruct, LoRA r 8): compare of {len(r['variants'])} variants in "
          f"{r['wall_seconds']:.0f} s (wall, this machine)", file=out)
    print("| task | base | expert | expert - base (95% CI) |", file=out)
    print("|---|---|---|---|", file=out)
    for t in tasks:
        lo, hi = r["expert_lift_interval"][t]
        print(f"| {t} | {r['base'][t]:.3f} | {r['experts'][t]:.3f} | {r['expert_lift'][t]:+.3f} "
              f"({lo:+.3f}, {hi:+.3f}) |", file=out)
    print("\n| variant | " + " | ".join(tasks) + " | mean (95% CI) | normalized (95% CI) | general ppl / base |",
          file=out)
    print("|---" * (len(tasks) + 4) + "|", file=out)
    for label, v in r["variants"].items():
        cells = " | ".join(f"{v['tasks'][t]['accuracy']:.3f}" for t in tasks)
        (mlo, mhi), (nlo, nhi) = v["mean_interval"], v["normalized_interval"]
        print(f"| {label} | {cells} | {v['mean']:.3f} ({mlo:.3f}-{mhi:.3f}) | {v['normalized']:.3f} "
              f"({nlo:.3f}-{nhi:.3f}) | {v['perplexity']:.2f} / {r['base_perplexity']:.2f} = "
              f"{v['perplexity_ratio']:.3f} |", file=out)
    best = r["variants"][r["best_oneshot"]]
    atm = next((v for k, v in r["variants"].items() if k.startswith("atm")), None)
    checks = [
        ("every expert >= 15 points above the base", all(x >= 0.15 for x in r["expert_lift"].values())),
        (f"best one-shot ({r['best_oneshot']}) >= 0.90 normalized: {best['normalized']:.3f}", best["normalized"] >= 0.90),
        ("ATM at equal compute >= the best one-shot" + (f": {atm['normalized']:.3f}" if atm else ""),
         atm is not None and atm["normalized"] >= best["normalized"]),
        (f"best one-shot's general perplexity within 5% of the base's: x{best['perplexity_ratio']:.3f}",
         best["perplexity_ratio"] <= 1.05),
    ]
    print("\ntargets:", file=out)
    for text, ok in checks:
        print(f"  {'MET    ' if ok else 'NOT MET'} {text}", file=out)
    print("\nanswers (base / expert / best merge; gold):", file=out)
    for t, s in r["samples"].items():
        for i, prompt in enumerate(s["prompt"]):
            word = prompt.split('"')[1] if '"' in prompt else prompt[-30:]
            print(f"  {t} {word!r}: {s['base'][i]!r} / {s['expert'][i]!r} / {s['merged'][i]!r}; {s['gold'][i]!r}",
                  file=out)


if __name__ == "__main__":
    main()
