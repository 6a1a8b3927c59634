"""``mergeflow compare``: strategies side by side on the same tasks at the same fine-tuning budget.

Every variant runs the same workflow (same tasks, data and per-task budget) with one strategy and
one merge; one-shot experts spend each task's whole budget at once, ATM and ColD Fusion spread it
over their rounds (``Workflow.round_finetune_for``). Variants share the store, so one-shot merges
with different methods reuse the same experts, and ColD Fusion reuses ATM's first-round experts.

Written to the output folder and logged as artifacts of a parent MLflow run (each variant's
workflow run is its child, tagged ``mergeflow.seed`` and ``mergeflow.variant``):
  compare.md / compare.json  per task and mean: accuracy and normalized accuracy of the base
                             (linear probe), the one-shot experts and every variant
  compare.png                mean accuracy against cumulative fine-tuning budget, per variant,
                             with the final round's 95% interval
Each mean accuracy gets a 95% bootstrap interval over the eval examples (seeded); a variant whose
difference from the best variant has a 95% interval that includes 0 is marked "within noise".

Several seeds (``--seeds 0,1,2``, :func:`seeded_workflow`): every variant runs once per seed, seed by
seed. A seed is the fine-tuning seed (``finetune.seed``; per-task and per-round ``finetune.seed``
overrides and ``rounds.contributor_seed``, ColD Fusion's sampling, move by the same amount, so the
spec's own seed reproduces the spec). Data split seeds stay, so every seed is scored on the same
eval examples; merge parameters (a DARE mask seed) stay too (the base's linear probe follows finetune.seed). With ``--seeds``, each seed's variants
register as ``<model>-<strategy>-<merge>-seed<S>``; the store is shared (a new seed trains new
experts, a re-run reuses them). Without it, each variant runs once with the spec's seeds, as before.
With two or more seeds:
  - the table is the mean over seeds, each cell with its sample standard deviation (n − 1); a
    seed's normalized accuracy divides by that seed's expert, then is averaged. compare.md adds
    each seed's mean accuracy per variant; compare.json has ``seeds``, ``table`` (the mean),
    ``std``, ``curve_range`` and ``per_seed`` (each seed's table, curves and runs).
  - the plot draws each variant's curve averaged over seeds (round by round), shaded from the
    lowest to the highest seed (min–max), with the 95% interval of the seed-averaged final mean.
  - that interval and the "within noise" mark use the seed-averaged bootstrap: each seed's final
    results are bootstrapped as above and the draws averaged across seeds. Every seed uses the same
    bootstrap generator (common random numbers): the seeds are scored on the same examples, so a
    resample of the eval set moves them together (only per-task accuracy and count are kept, so
    this stands in for a paired resample); independent draws would treat their errors as unrelated
    and give a narrower interval. It is the eval-sampling noise of the seed average; the spread
    between seeds is the standard deviation.
  - the parent run's ``<strategy>.<merge>/mean_accuracy`` (and ``mean_normalized_accuracy``) are
    the means over seeds, with ``<strategy>.<merge>/mean_accuracy_std`` beside them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.driver import WorkflowResult, run_workflow
from pipeline.lineage import Lineage
from pipeline.spec import Workflow, parse_workflow

MEAN = "mean"  # the uniform average of the round's models (ATM's and ColD Fusion's default)
TAG_SEED = "mergeflow.seed"
TAG_VARIANT = "mergeflow.variant"

Table = dict[str, dict[str, float]]  # task (and "mean") -> column -> value
Curve = list[tuple[float, float]]  # (cumulative budget, mean accuracy) per round


@dataclass
class Variant:
    strategy: str
    merge: str
    result: WorkflowResult | None = None
    seed: int | None = None  # the --seeds value it ran with; None: the spec's own seeds

    @property
    def label(self) -> str:
        return f"{self.strategy}+{self.merge}"


@dataclass
class Comparison:
    run_id: str
    variants: list[Variant]  # every seed's, seed by seed
    table: Table = field(default_factory=dict)  # task -> column -> value (several seeds: the mean over seeds)
    curves: dict[str, Curve] = field(default_factory=dict)  # label -> (budget, mean acc) (several seeds: averaged)
    files: list[Path] = field(default_factory=list)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # label -> 95% interval of the mean
    within_noise: dict[str, bool] = field(default_factory=dict)  # label -> not distinguishable from the best
    seeds: list[int] = field(default_factory=list)  # the --seeds values; empty: the spec's own seeds
    std: Table = field(default_factory=dict)  # several seeds: sample standard deviation of each table cell
    seed_tables: dict[int, Table] = field(default_factory=dict)  # several seeds: each seed's table
    seed_curves: dict[int, dict[str, Curve]] = field(default_factory=dict)  # several seeds: each seed's curves
    curve_range: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # label -> (min, max) per round

    @property
    def labels(self) -> list[str]:
        return list(dict.fromkeys(v.label for v in self.variants))


BOOTSTRAP_DRAWS = 2000


def bootstrap_means(evals: dict[str, dict[str, float]], draws: int = BOOTSTRAP_DRAWS, seed: int = 0):
    """Bootstrap draws of the mean accuracy over tasks, resampling each task's eval examples.

    Resampling n examples of which a fraction p are right gives Binomial(n, p) right answers, so the
    bootstrap of a 0/1 score (accuracy, exact match) is drawn exactly from each task's accuracy and
    count ``n``; for other headline metrics it is the binomial approximation.

    Returns:
        A numpy array of ``draws`` means (seeded: the same inputs give the same draws).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    total = np.zeros(draws)
    for task in sorted(evals):
        n = int(evals[task].get("n") or 0)
        p = min(1.0, max(0.0, float(evals[task]["accuracy"])))
        total += rng.binomial(n, p, size=draws) / n if n > 0 else p
    return total / max(1, len(evals))


def seed_averaged_draws(per_seed: Sequence[dict[str, dict[str, float]]], seed: int = 0):
    """Bootstrap draws of the mean accuracy averaged over training seeds: each seed's eval results
    drawn by :func:`bootstrap_means` with the same generator seed (the seeds are scored on the same
    examples; see the module docstring), then averaged draw by draw. One seed: its draws as they are."""
    return sum(bootstrap_means(e, seed=seed) for e in per_seed) / len(per_seed)


def interval(draws) -> tuple[float, float]:
    """The central 95% of bootstrap draws."""
    import numpy as np

    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def noise_marks(evals: dict[str, dict[str, dict[str, float]] | Sequence[dict[str, dict[str, float]]]],
                seed: int = 0) -> dict[str, bool]:
    """Per label: True when its mean accuracy is within noise of the best label's (the 95% bootstrap
    interval of the difference includes 0; the best itself is True).

    A label's value is its eval results (task -> metrics), or a list of them, one per training seed
    (then the seed-averaged draws of :func:`seed_averaged_draws` are compared).
    """
    draws = {label: seed_averaged_draws([e] if isinstance(e, dict) else list(e), seed=seed + i)
             for i, (label, e) in enumerate(sorted(evals.items()))}
    best = max(draws, key=lambda k: float(draws[k].mean()))
    marks = {}
    for label, d in draws.items():
        lo, hi = interval(draws[best] - d)
        marks[label] = label == best or lo <= 0.0 <= hi
    return marks


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: ``"0,1,2"`` → ``[0, 1, 2]`` (empty entries between commas are skipped).

    Raises:
        ValueError: no seed at all, an entry that is not a whole number, a negative one, or a seed given
            twice; the message names the value and the fix.
    """
    fix = "give non-negative integers separated by commas, e.g. --seeds 0,1,2"
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"no seeds given (got {text!r}); {fix}")
    seeds: list[int] = []
    for p in parts:
        if not re.fullmatch(r"[+-]?\d+", p):
            raise ValueError(f"{p!r} is not an integer (got {text!r}); {fix}")
        s = int(p)
        if s < 0:
            raise ValueError(f"seed {s} is negative (got {text!r}); {fix}")
        if s in seeds:
            raise ValueError(f"seed {s} is given twice (got {text!r}); give each seed once, e.g. --seeds 0,1,2")
        seeds.append(s)
    return seeds


def seeded_workflow(wf: Workflow, seed: int) -> Workflow:
    """``wf`` fine-tuned with ``seed``: ``finetune.seed`` becomes ``seed``, and the seeds that the spec
    sets beside it (per-task ``finetune.seed`` overrides, ``rounds.finetune.seed``, and
    ``rounds.contributor_seed`` for ColD Fusion's sampling) move by as much (``seed - finetune.seed``),
    so the spec's own seed gives the spec back. Data split seeds stay: every seed sees the same eval split.

    Raises:
        ValueError: when a seed that moves along would become negative (naming the field).
    """
    shift = seed - wf.finetune.seed
    data = wf.model_dump(mode="json")
    data["finetune"]["seed"] = seed
    moved: list[tuple[str, dict[str, Any], str]] = [
        (f"tasks[{i}].finetune.seed", t["finetune"], "seed") for i, t in enumerate(data["tasks"])
        if "seed" in t["finetune"]]
    if "seed" in data["rounds"]["finetune"]:
        moved.append(("rounds.finetune.seed", data["rounds"]["finetune"], "seed"))
    moved.append(("rounds.contributor_seed", data["rounds"], "contributor_seed"))
    for where, node, key in moved:
        if node[key] + shift < 0:
            raise ValueError(f"seed {seed} would move {where} from {node[key]} to {node[key] + shift} (it follows "
                             f"finetune.seed {wf.finetune.seed}); use seeds of at least {wf.finetune.seed - node[key]}")
        node[key] += shift
    return Workflow.model_validate(data)


def variant_workflow(wf: Workflow, strategy: str, merge: str, seed: int | None = None) -> Workflow:
    """``wf`` with one strategy and merge; its own registered model so aliases do not collide
    (``<model>-<strategy>-<merge>``, with ``-seed<S>`` when it runs one of several ``--seeds``). The
    merge keeps the spec's ``heads`` (``merge.heads`` for one-shot, ``rounds.merge.heads`` otherwise)."""
    data = wf.model_dump(mode="json")
    spec = {"method": "linear", "params": {}} if merge == MEAN else {
        "method": merge, "params": _params_for(wf, strategy, merge)}
    heads = (wf.merge if strategy == "oneshot" else wf.rounds.merge).heads
    if heads.mode != "experts":  # the spec's heads (e.g. aligned) apply to every variant's merge
        spec["heads"] = heads.model_dump(mode="json")
    data["strategy"] = strategy
    if strategy == "oneshot":
        data["merge"] = spec
        # where rounds run applies to rounds: a one-shot variant of a spec with resident rounds runs as one-shot does
        data["rounds"] |= {"workers": "tasks", "checkpoint_every": 1}
    else:
        data["rounds"]["merge"] = spec
    data["tracking"]["registered_model"] = f"{wf.registered_model_name}-{strategy}-{merge}" + (
        "" if seed is None else f"-seed{seed}")
    # a variant the spec cannot run (a merge that needs validation data it does not hold out, ...) is a
    # SpecError naming the field, as `validate` gives it
    return parse_workflow(data, f"{wf.name} as {strategy} with {merge}")


def _params_for(wf: Workflow, strategy: str, method: str) -> dict[str, Any]:
    """The spec's parameters when it configures this method for this kind of strategy, else defaults."""
    spec = wf.merge if strategy == "oneshot" else wf.rounds.merge
    return dict(spec.params) if spec.method == method else {}


def run_comparison(wf: Workflow, strategies: list[str], merges: list[str], round_merges: list[str], out_dir: Path,
                   *, seeds: Sequence[int] | None = None, address: str | None = None, num_cpus: int | None = None,
                   report: Callable[[str], None] = print) -> Comparison:
    """Run every variant (one-shot × ``merges``, iterated strategies × ``round_merges``) and compare.

    ``seeds``: run every variant once per seed (:func:`seeded_workflow`, seed by seed) and aggregate
    over them; ``None``: once, with the spec's own seeds.
    """
    seeds = list(seeds or [])
    workflows: dict[int | None, Workflow] = {s: seeded_workflow(wf, s) for s in seeds} or {None: wf}
    kinds = [(s, m) for s in strategies for m in (merges if s == "oneshot" else round_merges)]
    variants = [Variant(s, m, seed=seed) for seed in workflows for s, m in kinds]
    # every variant is validated before the first one trains: a bad one costs seconds, not the others' training
    planned = [variant_workflow(workflows[v.seed], v.strategy, v.merge, seed=v.seed) for v in variants]
    lineage = Lineage.init(wf.tracking.uri, wf.experiment_name, wf.tracking.artifact_location,
                           wf.tracking.retry_seconds)
    tags = {"mergeflow.strategies": ",".join(strategies), "mergeflow.merges": ",".join(merges)}
    if seeds:
        tags["mergeflow.seeds"] = ",".join(map(str, seeds))
    parent = lineage.start_run(f"compare:{wf.name}", kind="comparison", tags=tags)
    try:
        for i, (v, variant) in enumerate(zip(variants, planned, strict=True), 1):
            seeded = workflows[v.seed]
            report(f"compare: running {v.label}" + ("" if v.seed is None else
                                                    f" with seed {v.seed} ({i}/{len(variants)})"))
            v.result = run_workflow(variant, address=address, num_cpus=num_cpus, report=report,
                                    parent_run_id=parent)
            lineage.set_tags(v.result.run_id, {TAG_SEED: seeded.finetune.seed, TAG_VARIANT: v.label})
        comparison = summarize(parent, variants, seeds)
        comparison.files = write_outputs(comparison, out_dir)
        for f in comparison.files:
            lineage.log_artifact(parent, f)
        lineage.log_metrics(parent, parent_metrics(comparison))
    except BaseException:
        lineage.end_run(parent, "FAILED")
        raise
    lineage.end_run(parent)
    return comparison


def summarize(run_id: str, variants: list[Variant], seeds: Sequence[int] = ()) -> Comparison:
    """Table, curves, 95% intervals and noise marks of finished variants; with several seeds, each
    seed's table and curves and their aggregate (:func:`aggregate_tables`, :func:`aggregate_curves`)."""
    c = Comparison(run_id, variants, seeds=list(seeds))
    by_seed: dict[int | None, list[Variant]] = {}
    finals: dict[str, list[dict[str, dict[str, float]]]] = {}  # label -> each seed's final merged eval
    for v in variants:
        by_seed.setdefault(v.seed, []).append(v)
        finals.setdefault(v.label, []).append(v.result.final.merged_eval)
    if len(by_seed) == 1:
        (only,) = by_seed.values()
        c.table, c.curves = comparison_table(only), variant_curves(only)
    else:
        c.seed_tables = {s: comparison_table(vs) for s, vs in by_seed.items()}
        c.seed_curves = {s: variant_curves(vs) for s, vs in by_seed.items()}
        c.table, c.std = aggregate_tables(list(c.seed_tables.values()))
        c.curves, c.curve_range = aggregate_curves(list(c.seed_curves.values()))
    c.intervals = {label: interval(seed_averaged_draws(e)) for label, e in finals.items()}
    c.within_noise = noise_marks(finals)
    return c


def parent_metrics(c: Comparison) -> dict[str, float]:
    """The parent run's metrics: per variant, mean (normalized) accuracy; with several seeds, their
    means over seeds and ``.../mean_accuracy_std``."""
    metrics = {}
    for v in {v.label: v for v in c.variants}.values():
        key = f"{v.strategy}.{v.merge}"
        metrics[f"{key}/mean_accuracy"] = c.table["mean"][f"{v.label} acc"]
        metrics[f"{key}/mean_normalized_accuracy"] = c.table["mean"][f"{v.label} norm"]
        if c.std:
            metrics[f"{key}/mean_accuracy_std"] = c.std["mean"][f"{v.label} acc"]
    return metrics


def variant_curves(variants: list[Variant]) -> dict[str, Curve]:
    """Per variant, its rounds' (cumulative budget, mean accuracy of the merged model)."""
    return {v.label: [(r.budget, r.summary()["mean"]["merged"]) for r in v.result.rounds] for v in variants}


def comparison_table(variants: list[Variant]) -> Table:
    """Per task and mean. Normalised accuracy divides by the one-shot expert trained on the whole budget."""
    reference = next((v for v in variants if v.strategy == "oneshot"), variants[0]).result.final
    tasks = [t for t in reference.summary() if t != "mean"]
    table: Table = {}
    for task in tasks:
        row = reference.summary()[task]
        expert = row["expert"]
        table[task] = {"base probe": row.get("base_probe", float("nan")), "expert": expert}
        for v in variants:
            final = v.result.final
            acc = final.merged_eval[task]["accuracy"] if task in final.merged_eval else float("nan")
            table[task][f"{v.label} acc"] = acc
            table[task][f"{v.label} norm"] = acc / expert if expert > 0 else float("nan")
            if final.merged_probe:
                table[task][f"{v.label} probe"] = final.merged_probe[task]["accuracy"]
    cols = list(next(iter(table.values())))
    table["mean"] = {c: sum(table[t][c] for t in tasks) / len(tasks) for c in cols}
    return table


def aggregate_tables(tables: Sequence[Table]) -> tuple[Table, Table]:
    """Cell by cell over seeds' tables (same rows and columns): the mean and the sample standard
    deviation (n − 1; 0 for one table). The "mean" row's spread is that of each seed's mean over tasks."""
    n = len(tables)
    mean: Table = {}
    std: Table = {}
    for task, row in tables[0].items():
        mean[task], std[task] = {}, {}
        for col in row:
            xs = [t[task][col] for t in tables]
            m = sum(xs) / n
            mean[task][col] = m
            std[task][col] = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return mean, std


def aggregate_curves(per_seed: Sequence[dict[str, Curve]]) -> tuple[dict[str, Curve], dict[str, list[tuple[float, float]]]]:
    """Round by round over seeds: the mean (budget, accuracy) and the (lowest, highest) accuracy."""
    curves: dict[str, Curve] = {}
    ranges: dict[str, list[tuple[float, float]]] = {}
    for label in per_seed[0]:
        runs = [c[label] for c in per_seed]
        rounds = min(len(r) for r in runs)
        curves[label] = [(sum(r[k][0] for r in runs) / len(runs), sum(r[k][1] for r in runs) / len(runs))
                         for k in range(rounds)]
        ranges[label] = [(min(r[k][1] for r in runs), max(r[k][1] for r in runs)) for k in range(rounds)]
    return curves, ranges


def table_markdown(table: Table, std: Table | None = None) -> str:
    """A markdown table; with ``std``, each cell as mean ± standard deviation."""
    cols = list(next(iter(table.values())))

    def cell(task: str, col: str) -> str:
        return f"{table[task][col]:.3f}" + (f" ± {std[task][col]:.3f}" if std else "")

    lines = ["| task | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {task} | " + " | ".join(cell(task, c) for c in cols) + " |" for task in table]
    return "\n".join(lines) + "\n"


def seeds_markdown(c: Comparison) -> str:
    """Several seeds: the mean over tasks of the base probe, the experts and each variant, seed by seed."""
    seeds = list(c.seed_tables)
    rows = ["base probe", "expert", *(f"{label} acc" for label in c.labels)]
    lines = ["| mean accuracy | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
             "|---" * (len(seeds) + 2) + "|"]
    lines += [f"| {row.removesuffix(' acc')} | " + " | ".join(f"{c.seed_tables[s]['mean'][row]:.3f}" for s in seeds)
              + f" | {c.table['mean'][row]:.3f} ± {c.std['mean'][row]:.3f} |" for row in rows]
    return "\n".join(lines) + "\n"


def seeds_heading(c: Comparison) -> str:
    return (f"Mean ± sample standard deviation over {len(c.seed_tables)} seeds ({', '.join(map(str, c.seed_tables))}); "
            "a seed's normalized accuracy divides by that seed's expert.\n\n")


def write_outputs(c: Comparison, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    out_dir.mkdir(parents=True, exist_ok=True)
    md, js, png = out_dir / "compare.md", out_dir / "compare.json", out_dir / "compare.png"
    several = bool(c.seed_tables)
    if several:
        text = (seeds_heading(c) + table_markdown(c.table, c.std) + "\nMean accuracy over tasks, per seed:\n\n"
                + seeds_markdown(c))
    else:
        text = table_markdown(c.table)
    if c.intervals:
        text += ("\nMean accuracy with a 95% bootstrap interval over the eval examples (seeded"
                 + ("; each seed's draws averaged" if several else "") + "); *within noise*: "
                 "the difference from the best variant is not distinguishable from 0 at 95%.\n\n"
                 "| variant | mean accuracy | 95% interval | |\n|---|---|---|---|\n")
        text += "".join(f"| {label} | {c.table['mean'][f'{label} acc']:.3f} | [{lo:.3f}, {hi:.3f}] | "
                        f"{'within noise of the best' if c.within_noise.get(label) else ''} |\n"
                        for label, (lo, hi) in c.intervals.items())
    md.write_text(text)
    data: dict[str, Any] = {"table": c.table, "curves": c.curves, "run_id": c.run_id,
                            "intervals95": c.intervals, "within_noise": c.within_noise,
                            "variants": [{"strategy": v.strategy, "merge": v.merge, "run_id": v.result.run_id}
                                         | ({"seed": v.seed} if c.seeds else {}) for v in c.variants]}
    if c.seeds:
        data["seeds"] = c.seeds
    if several:
        data["std"] = c.std
        data["curve_range"] = c.curve_range
        data["per_seed"] = {str(s): {"table": t, "curves": c.seed_curves[s],
                                     "runs": {v.label: v.result.run_id for v in c.variants if v.seed == s}}
                            for s, t in c.seed_tables.items()}
    js.write_text(json.dumps(data, indent=2))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in c.curves.items():
        xs, ys = zip(*points, strict=True)
        line = ax.plot(xs, ys, marker="o", label=label)[0]
        if label in c.curve_range:  # lowest to highest seed, round by round
            lo, hi = zip(*c.curve_range[label], strict=True)
            if len(xs) > 1:
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
            else:
                ax.vlines(xs, lo, hi, color=line.get_color(), alpha=0.25, linewidth=5)
        if label in c.intervals:  # the final merge's 95% interval
            lo, hi = c.intervals[label]
            ax.errorbar([xs[-1]], [ys[-1]], yerr=[[max(0.0, ys[-1] - lo)], [max(0.0, hi - ys[-1])]],
                        color=line.get_color(), capsize=4)
    ax.axhline(c.table["mean"]["expert"], color="grey", linestyle="--", label="individual experts")
    ax.axhline(c.table["mean"]["base probe"], color="grey", linestyle=":", label="base (linear probe)")
    handles, _ = ax.get_legend_handles_labels()
    if several:
        handles.append(Patch(color="grey", alpha=0.3, label="min–max over seeds"))
        ax.set_title(f"mean of {len(c.seed_tables)} seeds ({', '.join(map(str, c.seed_tables))}); shaded: min–max "
                     "over seeds; bars: 95% bootstrap interval", fontsize=9)
    ax.set_xlabel("cumulative fine-tuning budget (fraction of each task's budget)")
    ax.set_ylabel("mean held-out accuracy")
    ax.legend(handles=handles, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return [md, js, png]
