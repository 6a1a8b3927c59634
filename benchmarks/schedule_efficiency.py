"""Scheduling efficiency: K experts of known cost on W worker slots of a local multi-node Ray cluster
(a benchmark, not a test).

Starts a cluster by hand, as a user would (`ray start --head --num-cpus=0`, then W worker nodes of one
CPU each with `ray start --address`), and fine-tunes K experts from the packaged MiniLM whose budgets
differ (``--steps``, listed shortest first: the worst order for first-come-first-served). The experts
go through mergeflow's own round machinery (``Rounds.finetune``: Ray tasks, store, MLflow), so what is
measured is what a workflow's expert phase costs. It prints:

- each expert's step time: the whole Ray task on its worker (load, train, score, write, log;
  ``step_seconds``);
- makespan: ``Rounds.finetune`` from submission to the last expert collected;
- ideal: Σ step time ÷ W, and the bound max(ideal, longest step) no order can beat;
- makespan ÷ ideal (target ≤ 1.10);
- what first-come-first-served in the spec's order would have given with the same step times
  (list scheduling simulated on the measured times, labelled as such), to show what ordering the
  longest expert first buys;
- all of it twice: on fresh workers (cold: each slot's first expert pays its process's imports and
  model load outside any step) and again on the same workers (warm: what every later round sees).

    python benchmarks/schedule_efficiency.py                       # W=2 worker nodes, 6 experts
    python benchmarks/schedule_efficiency.py --workers 3 --steps 10,10,20,20,30,40,40
    python benchmarks/schedule_efficiency.py --workers 3 --steps 10,20,20,30,30,40 --expert-workers 1,1,2,1,1,2
                                              # a mix: two experts on Ray Train groups of two workers

With multi-worker experts the ideal counts slot-seconds: a group holds its workers' slots while they run
(``workers_seconds``: load, train, score, report), × workers; its step also waits for the group's slots and
Ray Train's start (``ray_train_seconds``), which hold none, or only part, of them.
"""

from __future__ import annotations

import argparse
import heapq
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
DATASETS = ["vader_sentiment", "nrc_emotion", "brill_pos", "word_language"]
LABELS = {"vader_sentiment": ["negative", "positive"], "nrc_emotion": ["anger", "fear", "joy", "sadness", "trust"],
          "brill_pos": ["adjective", "adverb", "noun", "verb"], "word_language": ["de", "en", "es", "fr"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(workers: int) -> tuple[str, dict[str, str]]:
    """A head that runs nothing (0 CPUs) and ``workers`` nodes of one CPU each, all on this machine."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0"}
    port = _free_port()
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, env=env, capture_output=True)
    address = f"127.0.0.1:{port}"
    for _ in range(workers):  # one after the other: nodes starting at once on one machine time out
        subprocess.run([str(BIN / "ray"), "start", f"--address={address}", "--num-cpus=1", "--disable-usage-stats"],
                       check=True, env=env, capture_output=True)
    return address, env


def fifo_makespan(durations: list[float], slots: int) -> float:
    """List scheduling in the given order on ``slots`` identical slots (each job to the first free slot)."""
    free = [0.0] * slots
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free)


def held_seconds(lineage, expert, workers: int) -> float:
    """How long an expert held its slots: its step, or for a Ray Train group the time its workers ran (the
    step also waits for the group's slots and Ray Train's start, when no slot of the group is held yet)."""
    if workers == 1:
        return expert.metrics["step_seconds"]
    return lineage.run_metrics(expert.run_id)["workers_seconds"]


def measure(steps: list[int], address: str, tmp: Path, workers: list[int] | None = None) -> dict:
    from pipeline.context import StepContext, base_ref
    from pipeline.driver import WORKER_PRELOAD, preflight
    from pipeline.lineage import Lineage
    from pipeline.runtime import RayRuntime
    from pipeline.spec import parse_workflow
    from pipeline.store import CheckpointStore
    from pipeline.strategies.rounds import Rounds

    tasks = []
    for i, n in enumerate(steps):
        ds = DATASETS[i % len(DATASETS)]
        w = workers[i] if workers else 1
        tasks.append({"name": f"t{i}-{n}steps" + (f"-{w}w" if w > 1 else ""),
                      "dataset": {"source": f"packaged:{ds}", "eval_fraction": 0.2},
                      "labels": LABELS[ds], "finetune": {"max_steps": n}, **({"workers": w} if w > 1 else {})})
    wf = parse_workflow({
        "name": "schedule-efficiency", "base_model": "packaged:all-minilm-l6-v2", "tasks": tasks,
        "finetune": {"freeze_embeddings": True, "batch_size": 32, "max_length": 16, "learning_rate": 1e-4},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"}, "store": {"root": str(tmp / "store")},
        "resources": {"num_cpus": 1, "max_retries": 0},
    })
    preflight(wf)
    lineage = Lineage.init(wf.tracking.uri, wf.experiment_name)
    run_id = lineage.start_run(wf.name, kind="workflow")
    ctx = StepContext(wf, wf.tracking.uri, lineage.experiment_id, run_id, wf.base_model)
    out = {}
    with RayRuntime(address=address, preload=WORKER_PRELOAD) as runtime:
        rounds = Rounds(ctx, runtime, lineage, CheckpointStore(wf.store.root), lambda _m: None)
        for index, phase in enumerate(("cold", "warm")):  # round 1: the same experts again, on warm workers
            round_run = rounds.start_round(index)
            start = time.perf_counter()
            experts = rounds.finetune(base_ref(wf), wf.tasks, index, round_run)
            out[phase] = {"makespan": time.perf_counter() - start,
                          "step_seconds": {t.name: experts[t.name].metrics["step_seconds"] for t in wf.tasks},
                          "train_seconds": {t.name: experts[t.name].metrics["train_seconds"] for t in wf.tasks},
                          "held_seconds": {t.name: held_seconds(lineage, experts[t.name], wf.workers_for(t))
                                           for t in wf.tasks}}
            lineage.end_run(round_run)
    lineage.end_run(run_id)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="worker nodes (one slot each)")
    ap.add_argument("--steps", default="10,20,20,30,30,40", help="each expert's max_steps, in spec order")
    ap.add_argument("--expert-workers", default=None, help="each expert's workers (tasks[].workers), e.g. 1,1,2,1,1,2: "
                    "a mix of one-worker experts and Ray Train groups; a group holds that many slots for its step")
    args = ap.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    per = [int(s) for s in args.expert_workers.split(",")] if args.expert_workers else [1] * len(steps)
    assert len(per) == len(steps), "--expert-workers needs one number per expert"
    address, env = start_cluster(args.workers)
    os.environ.update({k: env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")})
    try:
        with tempfile.TemporaryDirectory(prefix="mergeflow-schedule-") as tmp:
            res = measure(steps, address, Path(tmp), per)
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)
    w = args.workers
    print(f"{len(steps)} experts on {w} worker nodes x 1 slot (head runs nothing), packaged MiniLM, batch 32 x 16 tokens"
          + (f"; workers per expert {per}" if any(v > 1 for v in per) else ""))
    for phase, what in (("cold", "fresh worker processes (each slot's first expert imports torch and loads the model)"),
                        ("warm", "the same experts again on the same, now warm, workers")):
        r = res[phase]
        step_s, held = r["step_seconds"], r["held_seconds"]
        slots = dict(zip(step_s, per, strict=True))
        # a multi-worker expert holds its workers' slots while they run: slot-seconds, not seconds
        total, longest = sum(held[n] * slots[n] for n in step_s), max(held.values())
        ideal = total / w
        print(f"-- {phase}: {what}")
        for name, sec in step_s.items():
            group = f", its {slots[name]} workers ran {held[name]:5.1f}s" if slots[name] > 1 else ""
            print(f"  {name:>14}: step {sec:5.1f}s (training {r['train_seconds'][name]:5.1f}s{group})")
        print(f"  makespan {r['makespan']:.1f}s; ideal (slot-seconds {total:.1f} / {w}) {ideal:.1f}s; "
              f"no order beats max(ideal, longest {longest:.1f}s) = {max(ideal, longest):.1f}s")
        print(f"  makespan / ideal = {r['makespan'] / ideal:.3f} (target <= 1.10)")
        if any(v > 1 for v in per):
            continue  # (list scheduling of one-slot jobs: no model of groups that need several slots at once)
        fifo = fifo_makespan(list(step_s.values()), w)
        print(f"  first-come-first-served in spec order (shortest first), simulated on these step times: {fifo:.1f}s "
              f"= {fifo / ideal:.3f} x ideal")

if __name__ == "__main__":
    main()
