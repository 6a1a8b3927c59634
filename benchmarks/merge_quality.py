"""Merge quality on the quickstart tasks: fixed coefficients against merges that learn from data
(a benchmark, not a test).

For every task of the spec (default ``workflows/quickstart.yaml``) a validation slice is held out of
the train split (``--validation-fraction``, default 0.1, ATM-on-validation's default); one expert
per task is fine-tuned on the rest with the spec's settings. Then, on the same experts:

- base (linear probe): a fresh head on the frozen base body, trained on the same rows as the experts;
- task arithmetic, λ = 0.5 (the quickstart's fixed value);
- task arithmetic, λ searched on {0.1, …, 1.0} (TALL-masks / TSV grid, ALGORITHMS.md §3);
- TIES (density 0.2, dis-mean), λ searched on {0.1, …, 2.5} (LiNeS' {0.1..1.5} ∪ the official 0.8–2.5);
- both searches again with every candidate scored with the heads aligned to its body (as
  ``merge.heads: aligned`` publishes it);
- RegMean, α = 0.95, N = 256 (FusionBench defaults), and α searched on {0.7, 0.8, 0.9, 1.0} (MergeLM);
- Fisher merging, N = 256, L2-normalised, floor 1e-6 (FusionBench defaults);
- TSV-M (α = 1, and α searched on {0.3, …, 4.0}), Iso-C and Iso-CTS (common fraction 0.8), α searched
  likewise; CART (rank ratio 0.12, λ = 2 and λ searched on {0.5, …, 5.0}); WUDI (the paper's Adam, and its
  exact minimum);
- recipe search (``merge.recipe``: CMA-ES over mergekit's TIES per-task weight and density and λ, one value
  per parameter and as 3-knot gradients over the layers; mergekit's task arithmetic, weight and λ), against
  a grid over λ alone with the same number of evaluations (``--recipe-evaluations``, default: the grids');
- AdaMerging task-wise, layer-wise and AdaMerging++ (TIES k = 20 first), the paper's defaults (λ init
  0.3, clamp [0, 1], Adam lr 1e-3, 500 steps, 16 inputs per task per step), learned on the *unlabeled*
  validation slices.

Each merge is scored with the experts' own heads (the default everywhere); with every head aligned
to the merged body without labels (``merge.heads: aligned``, ``operators.learn.heads``: each output layer
refit by ridge least squares to reproduce its expert's logits on 256 of the task's training inputs),
with per-task scores, interval and cost; and, as its own column, with every head refit on the merged
body with labels (a fresh linear probe on the experts' training rows, seeded:
``operators.evaluate.linear_probe``), with its cost. Searches pick by mean normalised accuracy on the validation slices; every score in the table is on
the eval split, never seen by training or selection. normalized = merged / expert, per task; the
mean accuracy has a 95% bootstrap interval (eval examples resampled within each task, 1000 draws,
seed 0).
Costs: each expert's fine-tune time, its statistics' time as a share of it, and each search's time
against one evaluation pass per candidate.

    python benchmarks/merge_quality.py                         # the full quickstart (minutes)
    python benchmarks/merge_quality.py --max-train-examples 400 --epochs-scale 0.5   # a quick look
    python benchmarks/merge_quality.py --rows ta,ties,subspace --sharpness sam:0.05 --workdir sam   # SAM experts

Work (experts, statistics) is cached under --workdir and reused on a second run with the same flags.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TA_GRID = [round(0.1 * i, 1) for i in range(1, 11)]
TIES_GRID = [round(0.1 * i, 1) for i in range(1, 26)]
REGMEAN_ALPHA_GRID = [0.7, 0.8, 0.9, 1.0]
SUBSPACE_GRID = [0.3, 0.5, 0.7, 0.9, 1.0, 1.2, 1.5, 1.8, 2.1, 2.5, 3.0, 3.5, 4.0]  # α of TSV-M, Iso-C, Iso-CTS, WUDI (merged once)
CART_GRID = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0]  # CART's λ (the paper's prior 2.0 for 8 tasks)
BOOTSTRAP = 1000
ROW_GROUPS = ("ta", "ties", "aligned", "regmean", "fisher", "subspace", "recipe", "adamerging")
# mergeflow's TIES as mergekit's ties computes it (per-tensor top-k, weights divisor, positive sign on ties)
MERGEKIT_TIES = {"density": 0.5, "scope": "tensor", "divisor": "weights", "zero_sign": "positive"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default=str(ROOT / "workflows" / "quickstart.yaml"))
    ap.add_argument("--workdir", default=str(ROOT / ".mergeflow" / "bench-merge-quality"))
    ap.add_argument("--validation-fraction", type=float, default=0.1)
    ap.add_argument("--examples", type=int, default=256, help="N inputs per task for Gram / Fisher statistics")
    ap.add_argument("--max-train-examples", type=int, default=None, help="cap each task's train split (seeded)")
    ap.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every task's epochs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fresh", action="store_true", help="remove the workdir first")
    ap.add_argument("--adamerging-steps", type=int, default=500, help="AdaMerging's Adam steps (paper: 500)")
    ap.add_argument("--skip-adamerging", action="store_true")
    ap.add_argument("--rows", default=",".join(ROW_GROUPS), type=lambda s: s.split(","),
                    help=f"which rows (comma-separated): {', '.join(ROW_GROUPS)}")
    ap.add_argument("--sharpness", default=None, metavar="METHOD:RHO",
                    help="train the experts sharpness-aware (finetune.sharpness, e.g. sam:0.05 or asam:0.5)")
    ap.add_argument("--recipe-evaluations", type=int, default=None,
                    help="candidates of each recipe search (default: as many as the λ grid it is compared with)")
    ap.add_argument("--only-adamerging", action="store_true", help="only the AdaMerging rows (experts cached)")
    ap.add_argument("--adamerging", default="task,layer,layer++", type=lambda s: s.split(","),
                    help="which AdaMerging variants: task, layer, task++, layer++ (++: TIES k = 20 first)")
    args = ap.parse_args()

    import torch

    from operators.checkpoint import quiet_transformers, resolve_model_path
    from operators.data import hold_out, load_task_data
    from operators.evaluate import evaluate, linear_probe
    from operators.finetune import finetune
    from operators.learn.coefficients import learn_coefficients
    from operators.learn.heads import align_heads
    from operators.learn.search import search_coefficient
    from operators.learn.statistics import compute_statistics, sample_rows
    from operators.merge.engine import merge_checkpoints
    from pipeline.spec import FinetuneSpec, load_workflow

    torch.set_num_threads(args.threads)
    quiet_transformers()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    wf = load_workflow(args.spec)
    work = Path(args.workdir)
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    base = resolve_model_path(wf.base_model)
    cache_file = work / "cache.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    key = json.dumps([args.spec, args.validation_fraction, args.max_train_examples, args.epochs_scale, args.examples]
                     + ([args.sharpness] if args.sharpness else []))
    sharpness = None
    if args.sharpness:
        method, _, rho = args.sharpness.partition(":")
        sharpness = {"method": method, "rho": float(rho or 0.05)}
    if cache.get("key") != key:
        cache = {"key": key}
        for d in ("experts", "stats"):
            shutil.rmtree(work / d, ignore_errors=True)

    def save() -> None:
        cache_file.write_text(json.dumps(cache, indent=2))

    fit, val, full = {}, {}, {}
    for t in wf.tasks:
        ds = t.dataset
        if args.max_train_examples:
            ds = ds.model_copy(update={"max_train_examples": args.max_train_examples})
        data = load_task_data(t.name, ds, t.label_names, t.type)
        full[t.name] = data
        fit[t.name], val[t.name] = hold_out(data, args.validation_fraction, t.dataset.split_seed)
    print(f"tasks: {', '.join(f'{n} (fit {len(fit[n].train)}, validation {len(val[n].train)}, eval {len(full[n].eval)})' for n in fit)}",
          flush=True)

    experts, ft_seconds, expert_acc = {}, cache.setdefault("finetune_seconds", {}), cache.setdefault("expert_acc", {})
    for t in wf.tasks:
        out = work / "experts" / t.name
        settings = wf.finetune_for(t)
        if settings.max_steps is None:
            settings = FinetuneSpec.model_validate({**settings.model_dump(), "epochs": settings.epochs * args.epochs_scale})
        if sharpness:  # the same steps, each sharpness-aware (two passes)
            settings = FinetuneSpec.model_validate({**settings.model_dump(), "sharpness": sharpness})
        if t.name not in ft_seconds or not out.is_dir():
            shutil.rmtree(out, ignore_errors=True)
            r = finetune(base, fit[t.name], settings, out, torch_threads=args.threads)
            ft_seconds[t.name] = r.seconds
            expert_acc[t.name] = evaluate(out, fit[t.name], max_length=settings.max_length)["accuracy"]
            save()
        experts[t.name] = out
        print(f"expert {t.name}: {ft_seconds[t.name]:.1f}s fine-tune, eval accuracy {expert_acc[t.name]:.3f}", flush=True)
    max_length = max(wf.finetune_for(t).max_length for t in wf.tasks)

    probe = cache.get("probe")
    if probe is None:
        probe = {n: linear_probe(base, fit[n], max_length=max_length, seed=wf.finetune.seed)["accuracy"] for n in fit}
        cache["probe"] = probe
        save()

    print(f"base linear probe: {probe}", flush=True)
    stats, stat_seconds = {}, cache.setdefault("stat_seconds", {})
    for kind in ("gram", "fisher"):
        for n in fit:
            d = work / "stats" / f"{n}-{kind}"
            if f"{n}-{kind}" not in stat_seconds or not d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
                stat_seconds[f"{n}-{kind}"] = compute_statistics(experts[n], fit[n], kind, d, examples=args.examples,
                                                                 max_length=max_length).seconds
                save()
                print(f"{kind} statistics of {n}: {stat_seconds[f'{n}-{kind}']:.1f}s", flush=True)
            stats.setdefault(kind, {})[n] = str(d)

    validation = {n: v.train for n, v in val.items()}
    rows: dict[str, dict[str, float]] = {}
    correct: dict[str, dict[str, np.ndarray]] = {}
    refit: dict[str, dict[str, float]] = {}
    aligned: dict[str, dict[str, float]] = {}

    def correctness(ckpt: Path, task: str) -> np.ndarray:
        """Per eval example: 1 if the body of ``ckpt`` with ``task``'s head predicts its label."""
        from transformers import AutoTokenizer

        from operators.checkpoint import load_task_model
        from operators.evaluate import predict

        model = load_task_model(ckpt, task)
        pred = predict(model, AutoTokenizer.from_pretrained(str(ckpt)), full[task].eval, max_length=max_length)
        return (pred == np.asarray(full[task].eval.labels)).astype(np.float64)

    def interval(label: str) -> tuple[float, float]:
        """95% bootstrap interval of the mean accuracy over tasks (eval examples resampled per task, seeded)."""
        rng = np.random.default_rng(0)
        means = np.zeros(BOOTSTRAP)
        for n in fit:
            c = correct[label][n]
            means += c[rng.integers(0, len(c), size=(BOOTSTRAP, len(c)))].mean(1)
        means /= len(fit)
        return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
    costs: dict[str, dict] = {}

    def score(label: str, method: str, params: dict, tensor_params=None) -> None:
        out = work / "merged" / label.replace(" ", "_")
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        merge_checkpoints(base, experts, method, params, out, tensor_params=tensor_params)
        merge_s = time.perf_counter() - t0
        correct[label] = {n: correctness(out, n) for n in fit}
        rows[label] = {n: float(correct[label][n].mean()) for n in fit}
        costs.setdefault(label, {})["merge_seconds"] = merge_s
        t0 = time.perf_counter()  # heads aligned without labels (merge.heads: aligned), in place, on the rows trained on
        report = align_heads(out, experts, align_inputs, max_length=max_length)
        costs[label]["align_seconds"] = time.perf_counter() - t0
        correct[label + " [aligned]"] = {n: correctness(out, n) for n in fit}
        aligned[label] = {n: float(correct[label + " [aligned]"][n].mean()) for n in fit}
        costs[label]["align_mse"] = {n: [f.mse_before, f.mse_after] for n, f in report.fits.items()}
        t0 = time.perf_counter()  # the heads refit on the merged body: a linear probe on the experts' rows
        refit[label] = {n: linear_probe(out, fit[n], max_length=max_length, seed=wf.finetune.seed)["accuracy"]
                        for n in fit}
        costs[label]["refit_seconds"] = time.perf_counter() - t0
        shutil.rmtree(out, ignore_errors=True)
        print(f"{label}: " + ", ".join(f"{n}={a:.3f}" for n, a in rows[label].items())
              + f" ({time.perf_counter() - t0:.0f}s with evaluation)", flush=True)

    align_inputs = {n: [fit[n].train.texts[i] for i in sample_rows(len(fit[n].train), args.examples, 0)] for n in fit}

    def searched(label: str, method: str, params: dict, aligned_heads: bool = False) -> None:
        res = search_coefficient(base, experts, method, params, validation, max_length=max_length,
                                 align=align_inputs if aligned_heads else None)
        print(f"{label}: chose {res.param}={res.chosen:g} in {res.seconds:.0f}s", flush=True)
        chosen = {**{k: v for k, v in params.items() if not (isinstance(v, dict) and "search" in v)},
                  res.param: res.chosen}
        costs[label] = {"chosen": res.chosen, "candidates": len(res.candidates), "search_seconds": res.seconds,
                        "eval_pass_seconds": res.eval_pass_seconds, "cost_ratio": res.cost_ratio,
                        "validation_score": res.best_score, "fast_path": res.fast_path,
                        "curve": {c.value: round(c.score, 4) for c in res.candidates}}
        score(label, method, chosen)

    rows_wanted = set() if args.only_adamerging else set(args.rows)
    if "ta" in rows_wanted:
        score("task arithmetic λ=0.5", "task_arithmetic", {"scaling": 0.5})
        searched("task arithmetic, λ searched", "task_arithmetic", {"scaling": {"search": TA_GRID}})
    if "ties" in rows_wanted:
        searched("TIES, λ searched", "ties", {"density": 0.2, "scaling": {"search": TIES_GRID}})
    if "aligned" in rows_wanted:  # the same searches with each candidate scored as merge.heads: aligned publishes it
        searched("task arithmetic, λ searched with aligned heads", "task_arithmetic", {"scaling": {"search": TA_GRID}},
                 aligned_heads=True)
        searched("TIES, λ searched with aligned heads", "ties", {"density": 0.2, "scaling": {"search": TIES_GRID}},
                 aligned_heads=True)
    if "regmean" in rows_wanted:
        score("RegMean α=0.95", "regmean", {"alpha": 0.95, "statistics": stats["gram"]})
        searched("RegMean, α searched", "regmean", {"alpha": {"search": REGMEAN_ALPHA_GRID},
                                                    "statistics": stats["gram"]})
    if "fisher" in rows_wanted:
        score("Fisher merging", "fisher", {"statistics": stats["fisher"]})
    if "subspace" in rows_wanted:
        # subspace merges (no data): the papers' α = 1, and α searched on the validation slices as the papers do
        score("TSV-M α=1", "tsv_m", {"scaling": 1.0})
        searched("TSV-M, α searched", "tsv_m", {"scaling": {"search": SUBSPACE_GRID}})
        searched("Iso-C, α searched", "iso_c", {"scaling": {"search": SUBSPACE_GRID}})
        searched("Iso-CTS, α searched", "iso_cts", {"common_fraction": 0.8, "scaling": {"search": SUBSPACE_GRID}})
        score("CART λ=2", "cart", {"rank_ratio": 0.12, "scaling": 2.0})
        searched("CART, λ searched", "cart", {"rank_ratio": 0.12, "scaling": {"search": CART_GRID}})
        score("WUDI (Adam, 300 steps)", "wudi", {})
        score("WUDI exact", "wudi", {"solver": "exact"})
        searched("WUDI exact, α searched", "wudi", {"solver": "exact", "scaling": {"search": SUBSPACE_GRID}})

    recipe_scorer = []

    def recipe(label: str, method: str, search: tuple[str, ...], evaluations: int, layers: int = 1) -> None:
        from operators.learn.recipe import RecipeScorer, RecipeSpace, cma_search, recipe_plan

        if not recipe_scorer:
            recipe_scorer.append(RecipeScorer(base, experts, validation, max_length=max_length))
        scorer = recipe_scorer[0]
        res = cma_search(RecipeSpace(method, search, layers), base, experts,
                         lambda configs: [scorer.score(c) for c in configs], evaluations=evaluations, seed=0)
        print(f"{label}: best of {len(res.candidates)} candidates ({res.generations} generations of {res.population}, "
              f"{res.dimension} numbers) validation {res.best.score:.4f} (the usual values {res.candidates[0].score:.4f}) "
              f"in {res.seconds:.0f}s", flush=True)
        costs[label] = {"recipe": res.best.config, "candidates": len(res.candidates), "search_seconds": res.seconds,
                        "validation_score": res.best.score, "start_validation_score": res.candidates[0].score,
                        "generations": res.generations, "population": res.population}
        plan = recipe_plan(res.best.config, experts)
        score(label, plan.method, plan.params, plan.tensor_params)

    if "recipe" in rows_wanted:  # against λ grids of the same size, on the same validation slices
        n_ties, n_ta = args.recipe_evaluations or len(TIES_GRID), args.recipe_evaluations or len(TA_GRID)
        grid = TIES_GRID[:n_ties] if n_ties <= len(TIES_GRID) else \
            [round(2.5 * (i + 1) / n_ties, 4) for i in range(n_ties)]  # as many λ as candidates, over (0, 2.5]
        searched(f"TIES (mergekit's), λ searched ({len(grid)} values)", "ties", {**MERGEKIT_TIES, "scaling": {"search": grid}})
        recipe(f"TIES (mergekit's), recipe searched ({n_ties} candidates)", "ties", ("weight", "density", "lambda"),
               n_ties)
        recipe(f"TIES (mergekit's), per-layer recipe searched ({n_ties} candidates)", "ties",
               ("weight", "density", "lambda"), n_ties, layers=3)
        recipe(f"task arithmetic, recipe searched ({n_ta} candidates)", "task_arithmetic", ("weight", "lambda"), n_ta)

    def adamerged(label: str, params: dict) -> None:
        inputs = {n: v.texts for n, v in validation.items()}  # unlabeled: the labels are never read
        res = learn_coefficients(base, experts, inputs, params, max_length=max_length, log_every=50,
                                 on_log=lambda step, h: print(f"  {label}: step {step}, entropy {h:.4f}", flush=True))
        print(f"{label}: learned in {res.seconds:.0f}s, entropy {res.initial_entropy:.3f} -> {res.final_entropy:.3f}, "
              f"mean λ {res.mean_coefficient}", flush=True)
        costs[label] = {"learn_seconds": res.seconds, "steps": res.steps, "initial_entropy": res.initial_entropy,
                        "final_entropy": res.final_entropy, "mean_coefficient": res.mean_coefficient}
        score(label, "adamerging", {**params, "coefficients": res.coefficients})

    if not args.skip_adamerging and "adamerging" in args.rows:
        steps = args.adamerging_steps
        # fewer steps than the paper's 500: the learning rate scales up so λ can travel as far (500 × 1e-3)
        ada = {"steps": steps, "learning_rate": 1e-3 * 500 / steps}
        for variant in args.adamerging:
            granularity, plus = variant.removesuffix("++"), variant.endswith("++")
            label = f"AdaMerging{'++' if plus else ''}, {granularity}-wise" + (f" ({steps} steps)" if steps != 500 else "")
            adamerged(label, {**ada, "granularity": granularity, **({"ties_density": 0.2} if plus else {})})

    tasks = list(fit)
    mean = lambda d: sum(d[n] for n in tasks) / len(tasks)  # noqa: E731
    print()
    print(f"validation_fraction {args.validation_fraction}, N = {args.examples}, max_train_examples "
          f"{args.max_train_examples}, epochs x{args.epochs_scale}, {args.threads} threads")
    head = ("| model | " + " | ".join(tasks) + " | mean acc [95% CI] | mean normalized | aligned heads: "
            + " | ".join(tasks) + " | aligned heads: mean acc [95% CI] | aligned heads: mean normalized | "
            "refit heads: mean acc | refit heads: mean normalized |")
    print(head)
    print("|" + "---|" * (2 * len(tasks) + 7))
    blank = " | " * (len(tasks) + 3)
    print("| base (linear probe) | " + " | ".join(f"{probe[n]:.3f}" for n in tasks) + f" | {mean(probe):.3f} | "
          f"{sum(probe[n] / expert_acc[n] for n in tasks) / len(tasks):.3f}{blank}|")
    correct["experts"] = {n: correctness(experts[n], n) for n in tasks}
    lo, hi = interval("experts")
    print("| experts | " + " | ".join(f"{expert_acc[n]:.3f}" for n in tasks)
          + f" | {mean(expert_acc):.3f} [{lo:.3f}, {hi:.3f}] | 1.000{blank}|")
    results = {}
    for label, accs in rows.items():
        norm = sum(accs[n] / expert_acc[n] for n in tasks) / len(tasks)
        results[label] = {"accuracy": accs, "mean": mean(accs), "normalized": norm, **costs.get(label, {})}
        chosen = f" ({costs[label]['chosen']:g})" if "chosen" in costs.get(label, {}) else ""
        lo, hi = interval(label)
        results[label]["ci95"] = [lo, hi]
        rnorm = sum(refit[label][n] / expert_acc[n] for n in tasks) / len(tasks)
        results[label] |= {"refit_accuracy": refit[label], "refit_mean": mean(refit[label]), "refit_normalized": rnorm}
        anorm = sum(aligned[label][n] / expert_acc[n] for n in tasks) / len(tasks)
        alo, ahi = interval(label + " [aligned]")
        results[label] |= {"aligned_accuracy": aligned[label], "aligned_mean": mean(aligned[label]),
                           "aligned_normalized": anorm, "aligned_ci95": [alo, ahi]}
        print(f"| {label}{chosen} | " + " | ".join(f"{accs[n]:.3f}" for n in tasks)
              + f" | {mean(accs):.3f} [{lo:.3f}, {hi:.3f}] | {norm:.3f} | "
              + " | ".join(f"{aligned[label][n]:.3f}" for n in tasks)
              + f" | {mean(aligned[label]):.3f} [{alo:.3f}, {ahi:.3f}] | {anorm:.3f} | {mean(refit[label]):.3f} | {rnorm:.3f} |")
    print()
    print("cost of statistics (share of the expert's fine-tune time, each timed when it was computed; cached work "
          "keeps its first timing: benchmarks/statistics_cost.py times both back to back):")
    for n in tasks:
        g, f = stat_seconds[f"{n}-gram"], stat_seconds[f"{n}-fisher"]
        print(f"  {n}: fine-tune {ft_seconds[n]:.1f}s; Gram {g:.1f}s ({g / ft_seconds[n]:.0%}); "
              f"Fisher {f:.1f}s ({f / ft_seconds[n]:.0%})")
    print("cost of the searches:")
    for label, c in costs.items():
        if "chosen" in c:
            print(f"  {label}: {c['candidates']} candidates in {c['search_seconds']:.1f}s, one evaluation pass "
                  f"{c['eval_pass_seconds']:.2f}s, {c['cost_ratio']:.2f}x the evaluation passes alone"
                  f"{' (affine fast path)' if c['fast_path'] else ''}; validation curve {c['curve']}")
    for label, c in costs.items():
        if "recipe" in c:
            print(f"  {label}: {c['candidates']} candidates ({c['generations']} generations of {c['population']}) in "
                  f"{c['search_seconds']:.1f}s; validation {c['validation_score']:.4f} (the usual values "
                  f"{c['start_validation_score']:.4f}); recipe {json.dumps(c['recipe']['models'])} "
                  f"{c['recipe'].get('parameters')}")
    for label, c in costs.items():
        if "learn_seconds" in c:
            print(f"  {label}: {c['steps']} Adam steps in {c['learn_seconds']:.1f}s; entropy "
                  f"{c['initial_entropy']:.3f} -> {c['final_entropy']:.3f}; mean λ per task "
                  + ", ".join(f"{t}={v:.2f}" for t, v in c["mean_coefficient"].items()))
    best = max(results, key=lambda k: results[k]["normalized"])
    print(f"best with the experts' heads: {best}: normalized {results[best]['normalized']:.3f} (target >= 0.85), "
          f"mean accuracy {results[best]['mean']:.3f} vs base probe {mean(probe):.3f}")
    best = max(results, key=lambda k: results[k]["aligned_normalized"])
    print(f"best with heads aligned to the merged body (no labels): {best}: normalized "
          f"{results[best]['aligned_normalized']:.3f} (target >= 0.98), mean accuracy {results[best]['aligned_mean']:.3f} "
          f"{results[best]['aligned_ci95']} vs base probe {mean(probe):.3f} (alignment {results[best]['align_seconds']:.1f}s "
          f"for {len(tasks)} heads)")
    best = max(results, key=lambda k: results[k]["refit_normalized"])
    print(f"best with heads refit on the merged body: {best}: normalized {results[best]['refit_normalized']:.3f}, "
          f"mean accuracy {results[best]['refit_mean']:.3f} vs base probe {mean(probe):.3f} "
          f"(refit cost {results[best]['refit_seconds']:.0f}s for {len(tasks)} heads)")
    (work / "results.json").write_text(json.dumps({"probe": probe, "experts": expert_acc, "merges": results,
                                                   "finetune_seconds": ft_seconds, "stat_seconds": stat_seconds},
                                                  indent=2))


if __name__ == "__main__":
    main()
