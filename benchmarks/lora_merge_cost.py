"""What merging LoRA experts costs, per mode: time, peak memory, output size, approximation error.

Workload: a random-config Llama of ~110M parameters in float32 (hidden 768, intermediate 2048,
12 layers, vocabulary 16000, untied head; 200 MB shards) and four rank-16 LoRA adapters
(lora_alpha 32) on q_proj, k_proj, v_proj, o_proj, in peft's file format. Built once under --workdir.

Each row is one fresh ``python -m pipeline.cli merge CONFIG OUT --json`` process; its wall time and
peak RSS (wait4's ru_maxrss) are measured from outside. Rows:

- ``exact``: task arithmetic read straight from the adapters (ΔW computed row block by row block),
  a full checkpoint out;
- ``adapter``: one peft adapter out (concat; SVD at rank 16, a real truncation of the rank-64 ΔW).

With ``--all`` (about 8 minutes on 2 busy cores) also: SVD at the default rank 4 × 16 = 64 (exact
for task arithmetic), the four experts materialised as full checkpoints (W + ΔW, written by an exact merge of each adapter alone) merged with task arithmetic
(the reference cost of not using adapters), and TIES (density 0.2) in exact mode and in adapter mode
at rank 16.

    python benchmarks/lora_merge_cost.py [--all] [--workdir /tmp/lora-bench] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERTS = 4
RANK = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build(work: Path, with_full: bool) -> tuple[Path, dict[str, Path], dict[str, Path]]:
    """The base, four adapters and (``with_full``) their full-weight equivalents (built once)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from operators.merge.engine import merge_checkpoints

    base = work / "base"
    adapters = {f"t{i}": work / f"adapter{i}" for i in range(EXPERTS)}
    full = {n: work / f"full-{n}" for n in adapters}
    if all((p / "adapter_model.safetensors").exists() for p in adapters.values()):
        if with_full:
            for name, path in full.items():
                if not (path / "mergeflow.json").exists():
                    shutil.rmtree(path, ignore_errors=True)
                    merge_checkpoints(base, {name: adapters[name]}, "task_arithmetic", {"scaling": 1.0}, path,
                                      max_shard_bytes=200 * 10**6)
        return base, adapters, full
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print("building the ~110M-parameter Llama base and four rank-16 adapters ...", flush=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                      num_key_value_heads=12, vocab_size=16000, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(base, max_shard_size="200MB", safe_serialization=True)
    del model
    print(f"  parameters: {params / 1e6:.1f}M", flush=True)
    for i, (name, path) in enumerate(adapters.items()):
        path.mkdir()
        LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, task_type="CAUSAL_LM").save_pretrained(str(path))
        g = torch.Generator().manual_seed(100 + i)
        tensors = {}
        for layer in range(cfg.num_hidden_layers):
            for proj in TARGETS:
                key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, 768, generator=g) * 0.02
                tensors[f"{key}.lora_B.weight"] = torch.randn(768, RANK, generator=g) * 0.01
        save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
        if with_full:  # the expert as a full checkpoint: the exact merge of the adapter alone at λ = 1 is W + ΔW
            merge_checkpoints(base, {name: path}, "task_arithmetic", {"scaling": 1.0}, full[name],
                              max_shard_bytes=200 * 10**6)
    return base, adapters, full


def timed(cmd: list[str]) -> tuple[float, float, int, dict]:
    """Run ``cmd``; wall and CPU time (s), peak RSS (bytes; both from wait4) and its JSON summary (last line)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        text, errors = out.read().decode(), err.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{errors[-3000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, usage.ru_maxrss * 1024, json.loads(text.strip().splitlines()[-1]) if text.strip() else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mergeflow-lora-bench")
    ap.add_argument("--keep", action="store_true", help="keep the built models for a later run")
    ap.add_argument("--all", action="store_true", help="also full-checkpoint experts and TIES (slow)")
    args = ap.parse_args()
    import yaml

    base, adapters, full = build(args.workdir, args.all)
    ta, ties = {"scaling": 0.3}, {"density": 0.2, "scaling": 1.0}
    rows = [
        *([("full experts", "task_arithmetic", ta, full, None)] if args.all else []),
        ("exact", "task_arithmetic", ta, adapters, None),
        ("adapter concat", "task_arithmetic", ta, adapters, {"mode": "adapter", "factorization": "concat"}),
        ("adapter svd (r 16)", "task_arithmetic", ta, adapters, {"mode": "adapter", "rank": 16}),
        *([("adapter svd (r 64)", "task_arithmetic", ta, adapters, {"mode": "adapter"}),
           ("exact", "ties", ties, adapters, None),
           ("adapter svd (r 16)", "ties", ties, adapters, {"mode": "adapter", "rank": 16})] if args.all else []),
    ]
    _, idle_cpu, idle, _ = timed([sys.executable, "-c", "import torch, transformers, operators.merge.engine, pipeline.cli"])
    print(f"\n{EXPERTS} experts, rank-{RANK} LoRA on {', '.join(TARGETS)}; one fresh process per row; "
          f"a process that only imports torch, transformers and mergeflow peaks at {idle / 1e6:.0f} MB RSS "
          f"and uses {idle_cpu:.1f} CPU s; load average before: {os.getloadavg()[0]:.1f}\n")
    print(f"{'inputs / mode':<20} {'method':<16} {'wall s':>7} {'CPU s':>6} {'factorising s':>14} {'peak RSS MB':>12} "
          f"{'output MB':>10} {'rel. error':>11}  worst module")
    for i, (label, method, params, experts, lora) in enumerate(rows):
        cfg = {"base": str(base), "experts": {n: str(p) for n, p in experts.items()}, "method": method,
               "params": params, **({"lora": lora} if lora else {})}
        cfg_path = args.workdir / f"merge-{i}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        out = args.workdir / f"out-{i}"
        shutil.rmtree(out, ignore_errors=True)
        wall, cpu, rss, summary = timed([sys.executable, "-m", "pipeline.cli", "merge", str(cfg_path), str(out), "--json",
                                    "--quiet"])
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        lora_prov = json.loads((out / "mergeflow.json").read_text()).get("lora", {})
        fact = lora_prov.get("factorization_seconds")
        err = summary.get("adapter_error")
        worst = (f"{summary['adapter_worst_module']} ({summary['adapter_worst_module_error']:.3g})"
                 if err is not None else "")
        print(f"{label:<20} {method:<16} {wall:>7.1f} {cpu:>6.1f} {'-' if fact is None else f'{fact:.1f}':>14} "
              f"{rss / 1e6:>12.0f} "
              f"{size / 1e6:>10.1f} "
              f"{'-' if err is None else f'{err:.3g}':>11}  {worst}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
