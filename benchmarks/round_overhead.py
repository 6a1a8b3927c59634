"""Round overhead: what many short rounds cost beyond their training (a benchmark, not a test).

Runs, one after another in fresh stores, the quickstart one-shot and ATM at R rounds with the same
total training budget (each task's epochs split over the rounds), each on a private local Ray
cluster with ``--slots`` CPUs, and reads back from MLflow where the wall time went:

- wall: the workflow's own wall time (``run_workflow``, from preflight to the last record);
- train: the sum over every expert of the time inside its optimiser loop (``train_seconds``);
- ideal: train ÷ slots, the makespan if the slots did nothing but train;
- overhead: (wall − ideal) ÷ wall;
- expert steps per round and slot: the experts' own time on their slots (``step_seconds``), split into
  load (start checkpoint → ready model), train, evaluate (own task), write (checkpoint, checksums,
  publish), log (MLflow calls) and other, summed over a round's experts ÷ slots;
- per round (means over the rounds, from when the driver reported each step done): experts (round
  started → its last expert finished: schedule, load model and data, train, score, write, log), merge,
  then → the next round started (the last round: → the end, with the workflow's summary and lineage
  graph); beside them evaluate+record (merged → merged model registered), which overlaps the next
  round's experts where the strategy scores a round while the next one trains.

    python benchmarks/round_overhead.py                      # one-shot, ATM-8, ATM-32 on the quickstart
    python benchmarks/round_overhead.py --rounds 4 --max-train 400   # smaller: tasks capped at 400 rows
    python benchmarks/round_overhead.py --json > round_overhead.json
"""

from __future__ import annotations

import argparse
import json
import re
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


def _phases(lines: list[tuple[float, str]], end: float) -> dict[str, float]:
    """Mean seconds per round of each phase, from when the driver reported each step done.

    experts: round started → its last expert finished (schedule, load model and data, train, score its
    own task, write, log); merge: → merged; after_merge: → the next round started; evaluate+record: merged
    → the merged model registered (evaluation of the merged model and of experts not yet scored, metrics,
    registry), which may overlap the next round.
    """
    rounds: dict[int, dict[str, float]] = {}
    for t, msg in lines:
        m = re.match(r"round (\d+): (.*)", msg)
        if not m:
            continue
        k, what = int(m.group(1)), m.group(2)
        r = rounds.setdefault(k, {})
        if what.startswith("started"):
            r["start"] = t
        elif what.startswith("expert ") and " finished" in what:
            r["experts"] = t
        elif what.startswith("merged "):
            r["merged"] = t
        elif what.startswith("registered ") or what.startswith("merged model already registered"):
            r["registered"] = t
    order = sorted(rounds)
    rows = []
    for i, k in enumerate(order):
        r = rounds[k]
        if not {"start", "experts", "merged", "registered"} <= set(r):
            continue
        nxt = rounds[order[i + 1]]["start"] if i + 1 < len(order) else end
        rows.append({"round": nxt - r["start"], "experts": r["experts"] - r["start"], "merge": r["merged"] - r["experts"],
                     "evaluate_record": r["registered"] - r["merged"], "after_merge": nxt - r["merged"]})
    return {k: statistics.mean(row[k] for row in rows) for k in rows[0]} if rows else {}


PHASES = ("load", "train", "evaluate", "write", "log", "other")


def measure(strategy: str, rounds: int, slots: int, max_train: int | None) -> dict:
    from pipeline.driver import run_workflow
    from pipeline.lineage import Lineage

    with tempfile.TemporaryDirectory(prefix="mergeflow-round-overhead-") as tmp:
        wf = _workflow(strategy, rounds, Path(tmp), max_train)
        lines: list[tuple[float, str]] = []
        start = time.perf_counter()
        result = run_workflow(wf, num_cpus=slots, report=lambda m: lines.append((time.perf_counter(), m)))
        wall = time.perf_counter() - start
        lineage = Lineage(wf.tracking.uri, result.experiment_id)
        experts = lineage.find_runs(f"tags.`mergeflow.workflow_run_id` = '{result.run_id}' and "
                                    "tags.`mergeflow.kind` = 'expert'")
        train = sum(r["metrics"].get("train_seconds", 0.0) for r in experts)
        # where each expert's step went on its slot, summed over the experts, per round and per slot
        n_rounds = max(1, len(result.rounds))
        slot = {k: sum(r["metrics"].get(f"phase_{k}_seconds", 0.0) for r in experts) / n_rounds / slots
                for k in PHASES}
        slot["step"] = sum(r["metrics"].get("step_seconds", 0.0) for r in experts) / n_rounds / slots
        return {"slot_per_round": slot, "config": "one-shot" if strategy == "oneshot" else f"ATM-{rounds}", "wall_s": wall, "train_s": train,
                "ideal_s": train / slots, "overhead": (wall - train / slots) / wall, "experts": len(experts),
                "rounds": len(result.rounds), "mean_merged": result.summary()["mean"]["merged"],
                "per_round": _phases(lines, start + wall), "train_per_round_s": train / max(1, len(result.rounds))}


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
        print(f"{'':>11}per round: {p.get('round', 0):5.1f}s = experts {p.get('experts', 0):5.1f} (training "
              f"{res['train_per_round_s'] / args.slots:4.1f} of it, ideally) + merge {p.get('merge', 0):4.1f} + "
              f"then {p.get('after_merge', 0):4.1f} to the next round; evaluate+record {p.get('evaluate_record', 0):4.1f} "
              "from the merge on", flush=True)
        q = res["slot_per_round"]
        print(f"{'':>11}expert steps per round and slot: {q['step']:5.1f}s = "
              + " + ".join(f"{k} {q[k]:4.1f}" for k in PHASES), flush=True)
    one = results[0]["wall_s"]
    for r in results[1:]:
        print(f"{r['config']}: wall {r['wall_s'] / one:.2f}x the one-shot's (target <= 1.25x)")
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
