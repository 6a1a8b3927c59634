"""Round overhead: what many short rounds cost beyond their training (a benchmark, not a test).

Runs, one after another in fresh stores, the quickstart one-shot and ATM at R rounds with the same
total training budget (each task's epochs split over the rounds), each on a private local Ray
cluster with ``--slots`` CPUs, and reads back from MLflow where the wall time went:

- wall: the workflow's own wall time (``run_workflow``, from preflight to the last record);
- train: the sum over every expert of the time inside its optimiser loop (``train_seconds``);
- ideal: train ÷ slots, the makespan if the slots did nothing but train;
- overhead: (wall − ideal) ÷ wall;
- per round (means over the rounds): start (round run created → first expert run created), expert
  (an expert run's duration: load model and data, train, evaluate its own task, write, log) of which
  train, merge (the merge run, until the merged checkpoint is published), evaluate (merged model and
  experts, until the last evaluation run ends), record (→ round run end: metrics, registry).

    python benchmarks/round_overhead.py                      # one-shot, ATM-8, ATM-32 on the quickstart
    python benchmarks/round_overhead.py --rounds 4 --max-train 400   # smaller: tasks capped at 400 rows
    python benchmarks/round_overhead.py --json > round_overhead.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _workflow(strategy: str, rounds: int, tmp: Path, max_train: int | None):
    from pipeline.spec import load_workflow

    overrides = {"tracking.uri": f"sqlite:///{tmp / 'mlflow.db'}", "store.root": str(tmp / "store"),
                 "strategy": strategy}
    wf = load_workflow(ROOT / "workflows" / "quickstart.yaml", overrides)
    data = wf.model_dump(mode="json")
    data["rounds"]["count"] = rounds
    if max_train:
        for t in data["tasks"]:
            t["dataset"]["max_train_examples"] = max_train
    from pipeline.spec import parse_workflow

    return parse_workflow(data)


def _phases(lineage, workflow_run: str) -> dict[str, float]:
    """Mean seconds per round of each phase, from the runs' timestamps and metrics."""
    runs = lineage.find_runs(f"tags.`mergeflow.workflow_run_id` = '{workflow_run}'")
    by_round: dict[str, list[dict]] = {}
    for r in runs:
        by_round.setdefault(r["tags"].get("mergeflow.round", "?"), []).append(r)
    rows = []
    for rnd, rs in by_round.items():
        kind = {k: [r for r in rs if r["tags"].get("mergeflow.kind") == k] for k in
                ("round", "expert", "merge", "evaluation", "baseline")}
        if not kind["round"] or not kind["expert"]:
            continue
        rr = kind["round"][0]
        experts = kind["expert"]
        first_expert = min(r["start_time"] for r in experts)
        merge = kind["merge"][0] if kind["merge"] else None
        evals = kind["evaluation"]
        eval_end = max([r["end_time"] or 0 for r in evals] + [merge["end_time"] or 0 if merge else 0])
        merge_publish = merge["start_time"] + 1000 * merge["metrics"].get("merge_seconds", 0) if merge else 0
        rows.append({
            "start": (first_expert - rr["start_time"]) / 1000,
            "expert": statistics.mean((r["end_time"] - r["start_time"]) / 1000 for r in experts),
            "train": statistics.mean(r["metrics"].get("train_seconds", 0.0) for r in experts),
            "experts_phase": (max(r["end_time"] for r in experts) - first_expert) / 1000,
            "merge": ((merge_publish - max(r["end_time"] for r in experts)) / 1000) if merge else 0.0,
            "evaluate": (eval_end - (merge_publish or max(r["end_time"] for r in experts))) / 1000 if evals else 0.0,
            "record": (rr["end_time"] - max(eval_end, max(r["end_time"] for r in experts))) / 1000,
            "round": (rr["end_time"] - rr["start_time"]) / 1000,
        })
    return {k: statistics.mean(r[k] for r in rows) for k in rows[0]} if rows else {}


def measure(strategy: str, rounds: int, slots: int, max_train: int | None) -> dict:
    from pipeline.driver import run_workflow
    from pipeline.lineage import Lineage

    with tempfile.TemporaryDirectory(prefix="mergeflow-round-overhead-") as tmp:
        wf = _workflow(strategy, rounds, Path(tmp), max_train)
        start = time.perf_counter()
        result = run_workflow(wf, num_cpus=slots, report=lambda m: None)
        wall = time.perf_counter() - start
        lineage = Lineage(wf.tracking.uri, result.experiment_id)
        experts = lineage.find_runs(f"tags.`mergeflow.workflow_run_id` = '{result.run_id}' and "
                                    "tags.`mergeflow.kind` = 'expert'")
        train = sum(r["metrics"].get("train_seconds", 0.0) for r in experts)
        return {"config": "one-shot" if strategy == "oneshot" else f"ATM-{rounds}", "wall_s": wall, "train_s": train,
                "ideal_s": train / slots, "overhead": (wall - train / slots) / wall, "experts": len(experts),
                "rounds": len(result.rounds), "mean_merged": result.summary()["mean"]["merged"],
                "per_round": _phases(lineage, result.run_id)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", default="8,32", help="ATM round counts (comma-separated)")
    ap.add_argument("--slots", type=int, default=2, help="CPUs of the local Ray cluster (expert slots)")
    ap.add_argument("--max-train", type=int, default=None, help="cap each task's train split (smaller runs)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    configs = [("oneshot", 1)] + [("atm", int(r)) for r in args.rounds.split(",") if r]
    results = []
    for strategy, rounds in configs:
        res = measure(strategy, rounds, args.slots, args.max_train)
        results.append(res)
        p = res["per_round"]
        print(f"{res['config']:>9}: wall {res['wall_s']:6.1f}s  train {res['train_s']:6.1f}s  ideal {res['ideal_s']:6.1f}s  "
              f"overhead {res['overhead']:5.1%}  ({res['experts']} experts, {res['rounds']} rounds, mean merged "
              f"{res['mean_merged']:.3f})", flush=True)
        print(f"{'':>11}per round: {p.get('round', 0):5.1f}s = start {p.get('start', 0):4.1f} + experts "
              f"{p.get('experts_phase', 0):5.1f} (each {p.get('expert', 0):4.1f}, of which train {p.get('train', 0):4.1f}) "
              f"+ merge {p.get('merge', 0):4.1f} + evaluate {p.get('evaluate', 0):4.1f} + record {p.get('record', 0):4.1f}",
              flush=True)
    one = results[0]["wall_s"]
    for r in results[1:]:
        print(f"{r['config']}: wall {r['wall_s'] / one:.2f}x the one-shot's (target <= 1.25x)")
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
