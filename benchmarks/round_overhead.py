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

- experts whole, packed longest first: the ideal when each round's experts cannot be split (per round,
  the experts' training times packed longest first on the slots; summed over the rounds), and the
  overhead beyond it: what the system adds, apart from experts of unequal cost.

ATM runs with both kinds of workers by default: ``tasks`` (a Ray task per expert, through the store)
and ``resident`` (``rounds.workers: resident`` with ``rounds.checkpoint_every``).

    python benchmarks/round_overhead.py                      # one-shot; ATM-8 and ATM-32, task and resident workers
    python benchmarks/round_overhead.py --workers resident --checkpoint-every 8,32
    python benchmarks/round_overhead.py --equal pos          # K experts of equal cost (4 copies of one task)
    python benchmarks/round_overhead.py --rounds 4 --max-train 400   # smaller: tasks capped at 400 rows
    python benchmarks/round_overhead.py --spec workflows/lora-causal-lm.yaml --rounds 8   # LoRA experts of a Llama
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
DEFAULT_SPEC = ROOT / "workflows" / "quickstart.yaml"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _workflow(strategy: str, rounds: int, tmp: Path, max_train: int | None, workers: str = "tasks",
              checkpoint_every: int = 1, equal: str | None = None, spec: Path = DEFAULT_SPEC):
    from pipeline.spec import load_workflow

    overrides = {"tracking.uri": f"sqlite:///{tmp / 'mlflow.db'}", "store.root": str(tmp / "store"),
                 "strategy": strategy}
    wf = load_workflow(spec, overrides)
    data = wf.model_dump(mode="json")
    data["rounds"]["count"] = rounds
    data["rounds"]["workers"] = workers
    data["rounds"]["checkpoint_every"] = checkpoint_every if workers == "resident" else 1
    if equal:  # K experts of equal cost: the same task (data, labels, budget) under K names
        same = next(t for t in data["tasks"] if t["name"] == equal)
        data["tasks"] = [{**same, "name": f"{equal}{i}"} for i in range(len(data["tasks"]))]
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
        if not {"start", "experts", "merged"} <= set(r):
            continue
        nxt = rounds[order[i + 1]]["start"] if i + 1 < len(order) else end
        rows.append({"round": nxt - r["start"], "experts": r["experts"] - r["start"], "merge": r["merged"] - r["experts"],
                     "after_merge": nxt - r["merged"]})
        if "registered" in r:  # rounds kept in memory between checkpoints are not scored or registered
            rows[-1]["evaluate_record"] = r["registered"] - r["merged"]
    if not rows:
        return {}
    out = {k: statistics.mean(row[k] for row in rows) for k in rows[0] if k != "evaluate_record"}
    scored = [row["evaluate_record"] for row in rows if "evaluate_record" in row]
    out["evaluate_record"] = statistics.mean(scored) if scored else 0.0
    out["scored_rounds"] = len(scored)
    return out


PHASES = ("load", "train", "evaluate", "write", "log", "other")


def packed(experts: list[dict], slots: int) -> float:
    """The makespan of perfect slots that only train, with each round's experts whole (indivisible) and
    packed longest first on ``slots`` slots, summed over the rounds: the ideal a round-by-round strategy
    can reach when its experts differ in cost (``ideal`` = train ÷ slots assumes they split evenly)."""
    by_round: dict[str, list[float]] = {}
    for r in experts:
        by_round.setdefault(r["tags"].get("mergeflow.round", "0"), []).append(r["metrics"].get("train_seconds", 0.0))
    total = 0.0
    for times in by_round.values():
        load = [0.0] * slots
        for t in sorted(times, reverse=True):
            load[load.index(min(load))] += t
        total += max(load)
    return total


def measure(strategy: str, rounds: int, slots: int, max_train: int | None, workers: str = "tasks",
            checkpoint_every: int = 1, equal: str | None = None, spec: Path = DEFAULT_SPEC) -> dict:
    from pipeline.driver import run_workflow
    from pipeline.lineage import Lineage

    with tempfile.TemporaryDirectory(prefix="mergeflow-round-overhead-") as tmp:
        wf = _workflow(strategy, rounds, Path(tmp), max_train, workers, checkpoint_every, equal, spec)
        lines: list[tuple[float, str]] = []
        start = time.perf_counter()
        result = run_workflow(wf, num_cpus=slots, report=lambda m: lines.append((time.perf_counter(), m)))
        wall = time.perf_counter() - start
        lineage = Lineage(wf.tracking.uri, result.experiment_id)
        experts = lineage.find_runs(f"tags.`mergeflow.workflow_run_id` = '{result.run_id}' and "
                                    "tags.`mergeflow.kind` = 'expert'")
        train = sum(r["metrics"].get("train_seconds", 0.0) for r in experts)
        lpt = packed(experts, slots)
        # where each expert's step went on its slot, summed over the experts, per round and per slot
        n_rounds = max(1, sum(bool(re.match(r"round \d+: started", m)) for _, m in lines))  # scored or not
        slot = {k: sum(r["metrics"].get(f"phase_{k}_seconds", 0.0) for r in experts) / n_rounds / slots
                for k in PHASES}
        slot["step"] = sum(r["metrics"].get("step_seconds", 0.0) for r in experts) / n_rounds / slots
        config = "one-shot" if strategy == "oneshot" else f"ATM-{rounds}" + (
            f" resident/{checkpoint_every}" if workers == "resident" else "")
        return {"slot_per_round": slot, "config": config, "wall_s": wall, "train_s": train,
                "ideal_s": train / slots, "overhead": (wall - train / slots) / wall,
                "packed_s": lpt, "overhead_packed": (wall - lpt) / wall, "experts": len(experts),
                "rounds": n_rounds, "scored_rounds": len(result.rounds), "mean_merged": result.summary()["mean"]["merged"],
                "per_round": _phases(lines, start + wall), "train_per_round_s": train / n_rounds,
                "driver_mlflow_s": lineage.client.get_run(result.run_id).data.metrics.get("driver_mlflow_seconds", float("nan"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", default="8,32", help="ATM round counts (comma-separated)")
    ap.add_argument("--slots", type=int, default=2, help="CPUs of the local Ray cluster (expert slots)")
    ap.add_argument("--max-train", type=int, default=None, help="cap each task's train split (smaller runs)")
    ap.add_argument("--workers", default="tasks,resident",
                    help="ATM's workers: tasks (a Ray task per expert, through the store), resident, or both")
    ap.add_argument("--checkpoint-every", default="8",
                    help="resident ATM: rounds per checkpoint (comma-separated: one run each)")
    ap.add_argument("--skip-oneshot", action="store_true", help="only the ATM runs (no ratio to the one-shot)")
    ap.add_argument("--equal", metavar="TASK", default=None,
                    help="K experts of equal cost: every task replaced by a copy of TASK (e.g. pos)")
    ap.add_argument("--spec", type=Path, default=DEFAULT_SPEC,
                    help="the workflow to run (default: the quickstart; e.g. workflows/lora-causal-lm.yaml)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    configs = [] if args.skip_oneshot else [("oneshot", 1, "tasks", 1)]
    for r in (int(r) for r in args.rounds.split(",") if r):
        for w in args.workers.split(","):
            everies = [int(e) for e in args.checkpoint_every.split(",")] if w == "resident" else [1]
            configs += [("atm", r, w, e) for e in everies]
    results = []
    for strategy, rounds, workers, every in configs:
        res = measure(strategy, rounds, args.slots, args.max_train, workers, every, args.equal, args.spec)
        results.append(res)
        p = res["per_round"]
        print(f"{res['config']:>9}: wall {res['wall_s']:6.1f}s  train {res['train_s']:6.1f}s  ideal {res['ideal_s']:6.1f}s  "
              f"overhead {res['overhead']:5.1%}  ({res['experts']} experts, {res['rounds']} rounds, mean merged "
              f"{res['mean_merged']:.3f})", flush=True)
        print(f"{'':>11}experts whole, packed longest first: ideal {res['packed_s']:6.1f}s, overhead beyond it "
              f"{res['overhead_packed']:5.1%}", flush=True)
        print(f"{'':>11}per round: {p.get('round', 0):5.1f}s = experts {p.get('experts', 0):5.1f} (training "
              f"{res['train_per_round_s'] / args.slots:4.1f} of it, ideally) + merge {p.get('merge', 0):4.1f} + "
              f"then {p.get('after_merge', 0):4.1f} to the next round; evaluate+record {p.get('evaluate_record', 0):4.1f} "
              f"from the merge on ({p.get('scored_rounds', 0)} scored rounds)", flush=True)
        q = res["slot_per_round"]
        print(f"{'':>11}expert steps per round and slot: {q['step']:5.1f}s = "
              + " + ".join(f"{k} {q[k]:4.1f}" for k in PHASES)
              + f"; the driver's MLflow calls {res['driver_mlflow_s'] / res['rounds']:4.2f}s a round", flush=True)
    one = results[0]["wall_s"] if not args.skip_oneshot else float("nan")
    for r in results[0 if args.skip_oneshot else 1:]:
        print(f"{r['config']}: wall {r['wall_s'] / one:.2f}x the one-shot's (target <= 1.25x), mean merged "
              f"{r['mean_merged']:.3f}")
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
