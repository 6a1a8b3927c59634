"""Few-shot composition (LoraHub) on the causal-LM workflow: for each task in turn as the "new" one, its own
expert is set aside and the other tasks' LoRA experts of SmolLM2-135M are weighed by ``mergeflow compose``
(CMA-ES over the weights, few-shot loss + 0.05 Σ|w| on N labelled examples of the new task), a benchmark, not a
test. Reported per target task, on its held-out eval split (choice accuracy): the composed model, the uniform
merge of the same experts (w = 1/K), the base, and the task's own expert (what training on the task gives).

    python benchmarks/compose_lm.py                                   # every task of lm-quickstart as target
    python benchmarks/compose_lm.py --targets number --examples 32 --evaluations 40

Experts come from the store (``--store``, ``--tracking-uri``): a store where ``mergeflow run`` or ``mergeflow
compare`` already trained the one-shot experts of the spec reuses them; a fresh one trains them first.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default=str(ROOT / "workflows" / "lm-quickstart.yaml"))
    ap.add_argument("--targets", default=None, help="comma-separated target tasks (default: every task)")
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--evaluations", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store", default=None, help="override store.root (where the experts are)")
    ap.add_argument("--tracking-uri", default=None, help="override tracking.uri")
    ap.add_argument("--num-cpus", type=int, default=None)
    ap.add_argument("--out", default=None, help="where to write results.json (default: print only)")
    args = ap.parse_args()

    from operators.evaluate import evaluate
    from pipeline.compose import compose_target
    from pipeline.context import StepContext, base_ref, expert_key, expert_path, local_dir, task_data
    from pipeline.spec import load_workflow
    from pipeline.store import CheckpointStore

    wf = load_workflow(args.spec, {"tracking.uri": args.tracking_uri, "store.root": args.store})
    targets = args.targets.split(",") if args.targets else [t.name for t in wf.tasks]
    rows = {}
    for target in targets:
        with tempfile.TemporaryDirectory() as tmp:
            rec = compose_target(wf, target, args.examples, Path(tmp) / "composed", evaluations=args.evaluations,
                                 seed=args.seed, num_cpus=args.num_cpus, report=lambda s: print(s, flush=True))
        task = wf.task(target)
        # the target's own expert (trained on its whole train split), when the store holds it: the upper mark
        store = CheckpointStore(wf.store.root)
        key = expert_key(base_ref(wf), task, wf.finetune_for(task), task_data(task).digest)
        path = expert_path(store, wf, 0, target, key)
        own = None
        if store.exists(path):
            ctx = StepContext(wf, wf.tracking.uri, "", "", wf.base_model)
            own = evaluate(store.materialize(path), task_data(task), headline=task.headline_metric,
                           max_length=wf.finetune_for(task).max_length,
                           adapter_base=local_dir(ctx, base_ref(wf)))["accuracy"]
        rows[target] = {k: v["accuracy"] for k, v in rec["held_out"].items()} | {"own expert": own,
                                                                                 "weights": rec["weights"],
                                                                                 "few_shot_loss": rec["few_shot_loss"],
                                                                                 "seconds": rec["search_seconds"]}
        print(json.dumps({target: rows[target]}), flush=True)
    print(f"\n{args.examples} examples, {args.evaluations} candidates, seed {args.seed}")
    print("| target | composed | uniform | base | own expert | weights | few-shot loss composed / uniform / base | "
          "search |")
    print("|---|---|---|---|---|---|---|---|")
    for t, r in rows.items():
        own = f"{r['own expert']:.3f}" if r["own expert"] is not None else "—"
        fl = r["few_shot_loss"]
        print(f"| {t} | {r['composed']:.3f} | {r['uniform']:.3f} | {r['base']:.3f} | {own} | "
              + ", ".join(f"{n} {w:+.2f}" for n, w in r["weights"].items())
              + f" | {fl['composed']:.3f} / {fl['uniform']:.3f} / {fl['base']:.3f} | {r['seconds']:.0f}s |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
