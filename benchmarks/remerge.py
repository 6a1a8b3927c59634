"""A second merge of the same experts: what a re-merge costs once the experts are in the store (a
benchmark, not a test).

Runs the quickstart one-shot in a fresh store on a private local Ray cluster with ``--slots`` CPUs,
then the same workflow with another task-arithmetic λ (``--scaling``) on the same store: its experts
are reused from the store, and so are the base's baselines and the experts' scores
(``<workflow>/baselines``, ``<workflow>/evaluations``); only the new merge is made and scored. Prints
both wall times (``run_workflow``, preflight to the last record) and what the second reused.

    python benchmarks/remerge.py                     # λ 0.5 (the spec's), then 0.4
    python benchmarks/remerge.py --scaling 0.3 --slots 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=ROOT / "workflows" / "quickstart.yaml")
    parser.add_argument("--scaling", type=float, default=0.4, help="the second merge's task-arithmetic λ")
    parser.add_argument("--slots", type=int, default=2)
    args = parser.parse_args()

    from pipeline.driver import run_workflow
    from pipeline.spec import load_workflow, parse_workflow

    tmp = Path(tempfile.mkdtemp(prefix="mergeflow-remerge-"))
    wf = load_workflow(args.spec, {"tracking.uri": f"sqlite:///{tmp / 'mlflow.db'}", "store.root": str(tmp / "store"),
                                   "strategy": "oneshot"})
    lines: list[str] = []
    start = time.perf_counter()
    first = run_workflow(wf, num_cpus=args.slots, report=lines.append)
    first_wall = time.perf_counter() - start
    data = wf.model_dump(mode="json")
    data["merge"]["params"]["scaling"] = args.scaling
    again: list[str] = []
    start = time.perf_counter()
    second = run_workflow(parse_workflow(data), num_cpus=args.slots, report=again.append)
    second_wall = time.perf_counter() - start
    reused = sum("already in the store, reused" in line for line in again)
    print(f"first run ({wf.merge.method}, {wf.merge.params}): wall {first_wall:6.1f}s  "
          f"mean merged {first.summary()['mean']['merged']:.3f}")
    print(f"another merge of the same experts (scaling {args.scaling}): wall {second_wall:6.1f}s  "
          f"mean merged {second.summary()['mean']['merged']:.3f}  ({reused} experts reused; "
          f"baselines and scores kept in {tmp / 'store' / wf.name}: "
          f"{len(list((tmp / 'store' / wf.name / 'baselines').glob('*.json')))} baselines, "
          f"{len(list((tmp / 'store' / wf.name / 'evaluations').glob('*.json')))} scores)")


if __name__ == "__main__":
    main()
