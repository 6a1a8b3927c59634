"""A mixture of experts from the causal-LM workflow's tasks (``mergeflow moe``), against the dense merges of the
same experts (a benchmark, not a test).

Each task of ``workflows/lm-quickstart.yaml`` gets a LoRA expert of SmolLM2-135M-Instruct on the MLP projections
only (gate, up, down: the weights a Mixtral layer routes between; attention, norms and embeddings stay the
base's, as mergekit-moe takes them), with the spec's other settings, folded into a full checkpoint. ``mergeflow
moe`` builds a Mixtral of the four (routers from each task's prompts' hidden states, ``gate_mode: hidden``, 8
prompts of its train split each, 2 experts per token). Reported per task on its eval split (the spec's
choice accuracy): the base, the task's own expert, the dense merges of the same experts (mean, task arithmetic
λ = 1, TIES density 0.2), and the MoE; and a greedy answer of the MoE to one prompt of each task.

    python benchmarks/moe_lm.py                  # trains 4 experts (minutes on CPU), cached under --workdir
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MLP = ["gate_proj", "up_proj", "down_proj"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default=str(ROOT / "workflows" / "lm-quickstart.yaml"))
    ap.add_argument("--workdir", default=str(ROOT / ".mergeflow" / "bench-moe-lm"))
    ap.add_argument("--prompts", type=int, default=8, help="positive prompts per expert (its train split's first)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from operators.checkpoint import load_causal_lm, quiet_transformers, resolve_model_path
    from operators.data import load_task_data
    from operators.evaluate import evaluate, greedy_answers
    from operators.finetune import finetune, lm_tokenizer
    from operators.merge.engine import merge_checkpoints
    from operators.moe import build_moe
    from pipeline.spec import FinetuneSpec, load_workflow

    torch.set_num_threads(args.threads)
    quiet_transformers()
    wf = load_workflow(args.spec)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    base = resolve_model_path(wf.base_model)
    data = {t.name: load_task_data(t.name, t.dataset, t.label_names, t.type) for t in wf.tasks}
    adapters, full, seconds = {}, {}, {}
    for t in wf.tasks:
        s = wf.finetune_for(t)
        s = FinetuneSpec.model_validate({**s.model_dump(), "lora": {**s.lora.model_dump(), "target_modules": MLP}})
        adapters[t.name], full[t.name] = work / "adapters" / t.name, work / "full" / t.name
        if not (adapters[t.name] / "mergeflow.json").is_file():
            r = finetune(base, data[t.name], s, adapters[t.name], torch_threads=args.threads)
            seconds[t.name] = r.seconds
            print(f"expert {t.name}: {r.seconds:.0f}s, loss {r.final_loss:.3f}", flush=True)
        if not (full[t.name] / "mergeflow.json").is_file():  # base + B·A·scaling: the expert as a dense model
            merge_checkpoints(base, {t.name: adapters[t.name]}, "linear", {}, full[t.name])
    moe_dir = work / "moe"
    if not (moe_dir / "mergeflow.json").is_file():
        cfg = {"base_model": str(base), "gate_mode": "hidden", "experts_per_token": 2, "dtype": "float32",
               "experts": [{"source_model": str(full[t]), "positive_prompts": data[t].train.prompts[:args.prompts]}
                           for t in data]}
        (work / "moe.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
        t0 = time.perf_counter()
        build_moe(work / "moe.yaml", moe_dir)
        print(f"moe: built in {time.perf_counter() - t0:.0f}s", flush=True)
    dense = {"mean (linear)": ("linear", {}), "task arithmetic λ=1": ("task_arithmetic", {"scaling": 1.0}),
             "TIES density 0.2, λ=1": ("ties", {"density": 0.2, "scaling": 1.0})}
    models = {"base": base}
    for label, (method, params) in dense.items():
        out = work / "dense" / method
        if not (out / "mergeflow.json").is_file():
            merge_checkpoints(base, adapters, method, params, out)
        models[label] = out
    models["MoE (4 experts, top-2)"] = moe_dir
    rows: dict[str, dict[str, float]] = {}
    for label, ckpt in [*models.items(), *((f"expert {t}", full[t]) for t in data)]:
        tasks = [label.removeprefix("expert ")] if label.startswith("expert ") else list(data)
        rows[label] = {t: evaluate(ckpt, data[t], headline=wf.task(t).headline_metric,
                                   max_length=wf.finetune_for(wf.task(t)).max_length)["accuracy"] for t in tasks}
        print(f"{label}: {rows[label]}", flush=True)
    own = {t: rows[f"expert {t}"][t] for t in data}
    moe = load_causal_lm(moe_dir)
    tok = lm_tokenizer(moe_dir)
    samples = {t: (data[t].eval.prompts[0], greedy_answers(moe, tok, [data[t].eval.prompts[0]], max_new_tokens=8)[0],
                   data[t].eval.answers[0]) for t in data}
    n_params = sum(p.numel() for p in moe.parameters())
    print(f"\nMLP-only LoRA experts (r {wf.finetune.lora.r}), {args.prompts} prompts per router row; MoE "
          f"{n_params / 1e6:.1f}M parameters (base {sum(p.numel() for p in load_causal_lm(base).parameters()) / 1e6:.1f}M)")
    tasks = list(data)
    print("| model | " + " | ".join(tasks) + " | mean | mean normalized |")
    print("|---|" + "---|" * (len(tasks) + 2))
    print("| experts (each on its own task) | " + " | ".join(f"{own[t]:.3f}" for t in tasks)
          + f" | {sum(own.values()) / len(own):.3f} | 1.000 |")
    for label in models:
        r = rows[label]
        print(f"| {label} | " + " | ".join(f"{r[t]:.3f}" for t in tasks) + f" | {sum(r.values()) / len(r):.3f} | "
              f"{sum(r[t] / own[t] for t in tasks) / len(tasks):.3f} |")
    for t, (prompt, answer, gold) in samples.items():
        print(f"MoE on {t}: {prompt.splitlines()[1] if len(prompt.splitlines()) > 1 else prompt!r} -> {answer!r} "
              f"(gold {gold!r})")
    (work / "results.json").write_text(json.dumps({"rows": rows, "own": own, "samples": samples,
                                                   "moe_parameters": n_params, "finetune_seconds": seconds}, indent=2))


if __name__ == "__main__":
    main()
