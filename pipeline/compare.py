"""``mergeflow compare``: strategies side by side on the same tasks at the same fine-tuning budget.

Every variant runs the same workflow (same tasks, data and per-task budget) with one strategy and
one merge; one-shot experts spend each task's whole budget at once, ATM and ColD Fusion spread it
over their rounds (``Workflow.round_finetune_for``). Variants share the store, so one-shot merges
with different methods reuse the same experts, and ColD Fusion reuses ATM's first-round experts.

Written to the output folder and logged as artifacts of a parent MLflow run (each variant's
workflow run is its child):
  compare.md / compare.json  per task and mean: accuracy and normalized accuracy of the base
                             (linear probe), the one-shot experts and every variant
  compare.png                mean accuracy against cumulative fine-tuning budget, per variant,
                             with the final round's 95% interval
Each mean accuracy gets a 95% bootstrap interval over the eval examples (seeded); a variant whose
difference from the best variant has a 95% interval that includes 0 is marked "within noise".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.driver import WorkflowResult, run_workflow
from pipeline.lineage import Lineage
from pipeline.spec import Workflow

MEAN = "mean"  # the uniform average of the round's models (ATM's and ColD Fusion's default)


@dataclass
class Variant:
    strategy: str
    merge: str
    result: WorkflowResult | None = None

    @property
    def label(self) -> str:
        return f"{self.strategy}+{self.merge}"


@dataclass
class Comparison:
    run_id: str
    variants: list[Variant]
    table: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> column -> value
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # label -> (budget, mean acc)
    files: list[Path] = field(default_factory=list)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # label -> 95% interval of the mean
    within_noise: dict[str, bool] = field(default_factory=dict)  # label -> not distinguishable from the best


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


def interval(draws) -> tuple[float, float]:
    """The central 95% of bootstrap draws."""
    import numpy as np

    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def noise_marks(evals: dict[str, dict[str, dict[str, float]]], seed: int = 0) -> dict[str, bool]:
    """Per label: True when its mean accuracy is within noise of the best label's (the 95% bootstrap
    interval of the difference includes 0; the best itself is True)."""
    draws = {label: bootstrap_means(e, seed=seed + i) for i, (label, e) in enumerate(sorted(evals.items()))}
    best = max(draws, key=lambda k: float(draws[k].mean()))
    marks = {}
    for label, d in draws.items():
        lo, hi = interval(draws[best] - d)
        marks[label] = label == best or lo <= 0.0 <= hi
    return marks


def variant_workflow(wf: Workflow, strategy: str, merge: str) -> Workflow:
    """``wf`` with one strategy and merge; its own registered model so aliases do not collide."""
    data = wf.model_dump(mode="json")
    spec = {"method": "linear", "params": {}} if merge == MEAN else {
        "method": merge, "params": _params_for(wf, strategy, merge)}
    data["strategy"] = strategy
    if strategy == "oneshot":
        data["merge"] = spec
    else:
        data["rounds"]["merge"] = spec
    data["tracking"]["registered_model"] = f"{wf.registered_model_name}-{strategy}-{merge}"
    return Workflow.model_validate(data)


def _params_for(wf: Workflow, strategy: str, method: str) -> dict[str, Any]:
    """The spec's parameters when it configures this method for this kind of strategy, else defaults."""
    spec = wf.merge if strategy == "oneshot" else wf.rounds.merge
    return dict(spec.params) if spec.method == method else {}


def run_comparison(wf: Workflow, strategies: list[str], merges: list[str], round_merges: list[str], out_dir: Path,
                   *, address: str | None = None, num_cpus: int | None = None,
                   report: Callable[[str], None] = print) -> Comparison:
    """Run every variant (one-shot × ``merges``, iterated strategies × ``round_merges``) and compare."""
    lineage = Lineage.init(wf.tracking.uri, wf.experiment_name, wf.tracking.artifact_location)
    parent = lineage.start_run(f"compare:{wf.name}", kind="comparison", tags={
        "mergeflow.strategies": ",".join(strategies), "mergeflow.merges": ",".join(merges)})
    variants = [Variant(s, m) for s in strategies for m in (merges if s == "oneshot" else round_merges)]
    try:
        for v in variants:
            report(f"compare: running {v.label}")
            v.result = run_workflow(variant_workflow(wf, v.strategy, v.merge), address=address, num_cpus=num_cpus,
                                    report=report, parent_run_id=parent)
        comparison = Comparison(parent, variants)
        comparison.table = comparison_table(variants)
        comparison.curves = {v.label: [(r.budget, r.summary()["mean"]["merged"]) for r in v.result.rounds]
                             for v in variants}
        finals = {v.label: v.result.final.merged_eval for v in variants}
        comparison.intervals = {label: interval(bootstrap_means(e)) for label, e in finals.items()}
        comparison.within_noise = noise_marks(finals)
        comparison.files = write_outputs(comparison, out_dir)
        for f in comparison.files:
            lineage.log_artifact(parent, f)
        lineage.log_metrics(parent, {f"{v.strategy}.{v.merge}/mean_accuracy": comparison.table["mean"][f"{v.label} acc"]
                                     for v in variants} | {
            f"{v.strategy}.{v.merge}/mean_normalized_accuracy": comparison.table["mean"][f"{v.label} norm"]
            for v in variants})
    except BaseException:
        lineage.end_run(parent, "FAILED")
        raise
    lineage.end_run(parent)
    return comparison


def comparison_table(variants: list[Variant]) -> dict[str, dict[str, float]]:
    """Per task and mean. Normalised accuracy divides by the one-shot expert trained on the whole budget."""
    reference = next((v for v in variants if v.strategy == "oneshot"), variants[0]).result.final
    tasks = [t for t in reference.summary() if t != "mean"]
    table: dict[str, dict[str, float]] = {}
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


def table_markdown(table: dict[str, dict[str, float]]) -> str:
    cols = list(next(iter(table.values())))
    lines = ["| task | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {task} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |" for task, row in table.items()]
    return "\n".join(lines) + "\n"


def write_outputs(c: Comparison, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    md, js, png = out_dir / "compare.md", out_dir / "compare.json", out_dir / "compare.png"
    text = table_markdown(c.table)
    if c.intervals:
        text += ("\nMean accuracy with a 95% bootstrap interval over the eval examples (seeded); *within noise*: "
                 "the difference from the best variant is not distinguishable from 0 at 95%.\n\n"
                 "| variant | mean accuracy | 95% interval | |\n|---|---|---|---|\n")
        text += "".join(f"| {label} | {c.table['mean'][f'{label} acc']:.3f} | [{lo:.3f}, {hi:.3f}] | "
                        f"{'within noise of the best' if c.within_noise.get(label) else ''} |\n"
                        for label, (lo, hi) in c.intervals.items())
    md.write_text(text)
    js.write_text(json.dumps({"table": c.table, "curves": c.curves, "run_id": c.run_id,
                              "intervals95": c.intervals, "within_noise": c.within_noise,
                              "variants": [{"strategy": v.strategy, "merge": v.merge, "run_id": v.result.run_id}
                                           for v in c.variants]}, indent=2))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in c.curves.items():
        xs, ys = zip(*points, strict=True)
        line = ax.plot(xs, ys, marker="o", label=label)[0]
        if label in c.intervals:  # the final merge's 95% interval
            lo, hi = c.intervals[label]
            ax.errorbar([xs[-1]], [ys[-1]], yerr=[[ys[-1] - lo], [hi - ys[-1]]], color=line.get_color(), capsize=4)
    ax.axhline(c.table["mean"]["expert"], color="grey", linestyle="--", label="individual experts")
    ax.axhline(c.table["mean"]["base probe"], color="grey", linestyle=":", label="base (linear probe)")
    ax.set_xlabel("cumulative fine-tuning budget (fraction of each task's budget)")
    ax.set_ylabel("mean held-out accuracy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return [md, js, png]
