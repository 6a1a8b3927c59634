"""The soak: does a long run stay flat? (a benchmark, not a test)

Runs ATM for ``--rounds`` rounds (300 by default) on a private local Ray cluster, once with task workers
(a Ray task per expert, every round through the store) and once with resident workers (models kept in
memory, a checkpoint every ``--checkpoint-every`` rounds), on the pico BERT the tests use (two word
tasks; each round trains every expert a few steps), each in a fresh store and MLflow database. As each
round starts it samples:

- the driver's RSS and open file descriptors;
- each Ray worker process's RSS (the slots' task workers or resident actors; the largest and the sum);
- the MLflow database's size and the store's size.

It prints those at rounds 1, 50, 100, ... and the targets: memory flat (the driver's RSS and the
largest worker's grow ≤ 5% from round 50 to the last), descriptors flat, and the store growing only
where the spec says (every round with task workers; every N rounds with resident workers), with the
bytes each checkpointed round adds. Then ``--recurring`` recurring rounds back to back in the same
process (each a new data contribution, fused and gated; each its own local Ray cluster): the driver's
RSS and fds round after round, and whether any process of a round's cluster outlives it.
``--json FILE`` writes every sample.

    python benchmarks/soak.py                       # 300 ATM rounds each way, then 50 recurring (~40 min, 2 CPUs)
    python benchmarks/soak.py --rounds 60 --workers resident
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MB = 1e6


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _workers() -> list:
    """This driver's Ray worker processes (named ``ray::…`` by Ray: task workers and actors, idle or busy)."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
            if cmd and cmd[0].startswith("ray::") and not any(a in cmd[0] for a in ("Agent", "Dashboard")):
                out.append(p)
        except psutil.Error:
            pass
    return out


def sample(round_index: int, tmp: Path, started: float) -> dict:
    import psutil

    me = psutil.Process()
    rss = []
    for p in _workers():
        try:
            rss.append(p.memory_info().rss)
        except psutil.Error:
            pass
    return {"round": round_index, "t": time.perf_counter() - started, "driver_rss": me.memory_info().rss,
            "driver_fds": me.num_fds(), "workers": len(rss), "worker_rss_max": max(rss, default=0),
            "worker_rss_sum": sum(rss), "mlflow_db": (tmp / "mlflow.db").stat().st_size,
            "store": _tree_bytes(tmp / "store")}


def soak(workers: str, rounds: int, checkpoint_every: int, slots: int) -> dict:
    from pipeline.driver import run_workflow
    from pipeline.spec import parse_workflow
    from tests.helpers import make_tiny_bert, tiny_workflow_dict

    with tempfile.TemporaryDirectory(prefix=f"mergeflow-soak-{workers}-") as d:
        tmp = Path(d)
        base = make_tiny_bert(tmp / "base")
        spec = tiny_workflow_dict(tmp, base, strategy="atm")
        spec["finetune"] = {**spec["finetune"], "max_steps": 2 * rounds, "log_every": 1}  # 2 steps a round
        spec["resources"] = {"num_cpus": 1}
        spec["rounds"] = {"count": rounds, "workers": workers, "merge": {"method": "task_arithmetic"},
                          **({"checkpoint_every": checkpoint_every} if workers == "resident" else {})}
        wf = parse_workflow(spec)
        samples: list[dict] = []
        started = time.perf_counter()

        def report(msg: str) -> None:
            m = re.match(r"round (\d+): started", msg)
            if m:
                samples.append(sample(int(m.group(1)), tmp, started))
                if len(samples) % 25 == 0:
                    s = samples[-1]
                    print(f"  [{workers}] round {s['round']}: {s['t']:.0f}s, driver {s['driver_rss'] / MB:.0f} MB, "
                          f"largest worker {s['worker_rss_max'] / MB:.0f} MB, store {s['store'] / MB:.1f} MB",
                          file=sys.stderr, flush=True)

        result = run_workflow(wf, num_cpus=slots, report=report)
        samples.append({**sample(rounds, tmp, started), "end": True})
        rounds_dirs = sorted(p.name for p in (tmp / "store" / "tiny").glob("round-*"))
        return {"workers": workers, "rounds": rounds, "checkpoint_every": checkpoint_every if workers == "resident" else 1,
                "wall_s": time.perf_counter() - started, "samples": samples, "store_rounds": len(rounds_dirs),
                "mean_merged": result.summary()["mean"]["merged"]}


def soak_recurring(rounds: int, slots: int) -> dict:
    """``rounds`` recurring rounds back to back in this process (each a new data contribution, fine-tuned
    and fused into the champion, gated, registered; each its own local Ray cluster): the driver's RSS and
    fds, and any process of a round's cluster still alive after it (there should be none)."""
    from click.testing import CliRunner

    from pipeline.cli import main as cli
    from pipeline.recurring.round import run_round
    from pipeline.spec import parse_workflow
    from tests.helpers import make_tiny_bert, tiny_workflow_dict, write_task_file

    with tempfile.TemporaryDirectory(prefix="mergeflow-soak-recurring-") as d:
        tmp = Path(d)
        spec = tiny_workflow_dict(tmp, make_tiny_bert(tmp / "base"))
        spec["recurring"] = {"contributions": str(tmp / "contributions"), "gate": {"max_task_drop": 0.05}}
        (tmp / "spec.yaml").write_text(json.dumps(spec))
        wf = parse_workflow(spec)
        samples, verdicts, started = [], {}, time.perf_counter()
        for i in range(1, rounds + 1):
            task = ("vowel", "length")[i % 2]
            src = write_task_file(tmp / "incoming" / f"{i}.parquet", task, n=96, seed=100 + i)
            res = CliRunner().invoke(cli, ["contribute", str(tmp / "spec.yaml"), str(src), "--task", task,
                                           "--id", f"{i:04d}-{task}"])
            assert res.exit_code == 0, res.output
            out = run_round(wf, num_cpus=slots, report=lambda _m: None)
            verdicts[out.status] = verdicts.get(out.status, 0) + 1
            time.sleep(1.0)  # the watchdog reaps what shutdown left within a second or so
            from pipeline.reaper import leftovers

            leftover = {p.pid for p in _workers()} | set(leftovers())  # its workers, or orphans of its cluster
            samples.append({**sample(i, tmp, started), "leftover_processes": len(leftover)})
            if i % 10 == 0:
                x = samples[-1]
                print(f"  [recurring] round {i}: {x['t']:.0f}s, driver {x['driver_rss'] / MB:.0f} MB, fds "
                      f"{x['driver_fds']}, {dict(verdicts)}", file=sys.stderr, flush=True)
        return {"workers": "recurring", "rounds": rounds, "wall_s": time.perf_counter() - started,
                "samples": samples, "verdicts": verdicts}


def summarize_recurring(res: dict) -> list[str]:
    s, n = res["samples"], res["rounds"]
    early, late = _at(s, min(20, n // 2)), s[-1]
    g = late["driver_rss"] / early["driver_rss"] - 1
    lines = [f"recurring rounds back to back, {n} rounds in one process: {res['wall_s']:.0f} s, "
             f"{res['wall_s'] / n:.1f} s a round (each its own local Ray cluster), outcomes {res['verdicts']}",
             f"  {'round':>5} {'driver RSS':>10} {'fds':>4} {'MLflow DB':>9} {'store':>9} {'cluster processes left':>22}"]
    for r in sorted({1, *range(10, n + 1, 10)}):
        x = _at(s, r)
        lines.append(f"  {x['round']:>5} {x['driver_rss'] / MB:>8.0f}MB {x['driver_fds']:>4} {x['mlflow_db'] / MB:>7.1f}MB "
                     f"{x['store'] / MB:>7.1f}MB {x['leftover_processes']:>22}")
    lines.append(f"  from round {early['round']} to {late['round']}: driver RSS {g:+.1%} (target ≤ +5%: "
                 f"{'MET' if g <= 0.05 else 'NOT MET'}); open fds {late['driver_fds'] - early['driver_fds']:+d}; "
                 f"most processes of a round's cluster alive after it: {max(x['leftover_processes'] for x in s)}")
    return lines


def _at(samples: list[dict], r: int) -> dict:
    return min(samples, key=lambda s: abs(s["round"] - r))


def summarize(res: dict) -> list[str]:
    n, end = res["rounds"], res["samples"][-1]  # the last sample: after the run (the cluster is gone)
    s = res["samples"][:-1]  # one as each round started
    early, late = _at(s, min(50, n // 2)), s[-1]
    lines = [f"{res['workers']} workers, {n} rounds (checkpoint every {res['checkpoint_every']}): "
             f"{res['wall_s']:.0f} s, {res['wall_s'] / n:.2f} s a round, mean merged accuracy {res['mean_merged']:.3f}",
             f"  {'round':>5} {'driver RSS':>10} {'fds':>4} {'workers':>7} {'largest worker':>14} {'all workers':>11} "
             f"{'MLflow DB':>9} {'store':>9}"]
    for r in sorted({1, *range(50, n + 1, 50), n}):
        x = _at(s, r)
        lines.append(f"  {x['round']:>5} {x['driver_rss'] / MB:>8.0f}MB {x['driver_fds']:>4} {x['workers']:>7} "
                     f"{x['worker_rss_max'] / MB:>12.0f}MB {x['worker_rss_sum'] / MB:>9.0f}MB "
                     f"{x['mlflow_db'] / MB:>7.1f}MB {x['store'] / MB:>7.1f}MB")
    growth = {k: late[k] / early[k] - 1 for k in ("driver_rss", "worker_rss_max") if early[k]}
    fds = late["driver_fds"] - early["driver_fds"]
    k = res["checkpoint_every"]
    expected = len({r for r in range(n) if (r + 1) % k == 0} | {n - 1})
    per_ckpt = (end["store"] - early["store"]) / max(1, len({r for r in range(early["round"], n)
                                                           if (r + 1) % k == 0} | {n - 1}))
    flat = all(g <= 0.05 for g in growth.values())
    lines.append(f"  from round {early['round']} to {late['round']}: driver RSS {growth.get('driver_rss', 0):+.1%}, "
                 f"largest worker {growth.get('worker_rss_max', 0):+.1%} (target ≤ +5%: {'MET' if flat else 'NOT MET'}); "
                 f"open fds {fds:+d}; MLflow DB +{(late['mlflow_db'] - early['mlflow_db']) / MB:.1f} MB "
                 f"({(late['mlflow_db'] - early['mlflow_db']) / max(1, late['round'] - early['round']) / 1e3:.0f} kB a round)")
    lines.append(f"  store: {res['store_rounds']} round folders for {n} rounds (as configured: {expected}), "
                 f"{end['store'] / MB:.1f} MB at the end, +{per_ckpt / MB:.2f} MB a checkpointed round")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--workers", default="tasks,resident")
    ap.add_argument("--checkpoint-every", type=int, default=10, help="resident workers: rounds per checkpoint")
    ap.add_argument("--slots", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--recurring", type=int, default=50, help="recurring rounds back to back afterwards (0: none)")
    ap.add_argument("--json", type=Path, default=None, help="also write every sample to this file (Ray's workers "
                                                                 "print to stdout)")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = []
    for w in [w for w in args.workers.split(",") if w]:
        res = soak(w, args.rounds, args.checkpoint_every, args.slots)
        results.append(res)
        print("\n".join(summarize(res)), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    if args.recurring:
        res = soak_recurring(args.recurring, args.slots)
        results.append(res)
        print("\n".join(summarize_recurring(res)), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
