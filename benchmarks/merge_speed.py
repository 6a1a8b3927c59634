"""Merge speed and memory: mergeflow against mergekit on the same inputs (a benchmark, not a test).

Workload: a Llama-architecture model of ~134M parameters in float32 (hidden 768, intermediate 2048,
12 layers, 12 heads, vocabulary 32000, untied head), saved in 200 MB shards; three experts are the
base plus small Gaussian noise. The script builds them once under --workdir.

Each tool merges the same mergekit YAML config (TIES at density 0.2, and task arithmetic), run as
a fresh process (`mergeflow merge` / `mergekit-yaml`), alternating tools, several repetitions. Wall
time and the peak RSS of that process (its own VmHWM, polled; wait4's ru_maxrss would carry this
script's own size over fork and exec) are recorded; medians and ratios printed.
mergekit (0.1.5) goes into its own virtual environment under --workdir (installed on first use,
with this environment's torch build so no CUDA wheel is pulled), or give --mergekit-bin.

    python benchmarks/merge_speed.py                 # full comparison
    python benchmarks/merge_speed.py --skip-mergekit # mergeflow only
    python benchmarks/merge_speed.py --skip-mergekit --methods task_arithmetic,tsv_m,iso_c,iso_cts,cart
                                                     # the SVD merges against task arithmetic
    python benchmarks/merge_speed.py --reps 1 --methods della,sce,multislerp,karcher,nuslerp,nearswap,passthrough,arcee_fusion
                                                     # mergekit's other methods, both tools

After the timed runs the outputs of the two tools are compared tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT_VERSION = "0.1.5"

CONFIGS = {
    "ties": """merge_method: ties
base_model: {base}
models:
  - model: {e0}
    parameters: {{weight: 1.0, density: 0.2}}
  - model: {e1}
    parameters: {{weight: 1.0, density: 0.2}}
  - model: {e2}
    parameters: {{weight: 1.0, density: 0.2}}
parameters: {{normalize: true}}
dtype: float32
""",
    "task_arithmetic": """merge_method: task_arithmetic
base_model: {base}
models:
  - model: {e0}
    parameters: {{weight: 0.3}}
  - model: {e1}
    parameters: {{weight: 0.3}}
  - model: {e2}
    parameters: {{weight: 0.3}}
dtype: float32
""",
    "della": """merge_method: della
base_model: {base}
models:
  - model: {e0}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {e1}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {e2}
    parameters: {{weight: 1.0, density: 0.5}}
parameters: {{epsilon: 0.15, lambda: 1.0}}
dtype: float32
""",
    "sce": """merge_method: sce
base_model: {base}
models:
  - model: {e0}
  - model: {e1}
  - model: {e2}
parameters: {{select_topk: 0.5}}
dtype: float32
""",
    "multislerp": """merge_method: multislerp
base_model: {base}
models:
  - model: {e0}
    parameters: {{weight: 1.0}}
  - model: {e1}
    parameters: {{weight: 1.0}}
  - model: {e2}
    parameters: {{weight: 1.0}}
dtype: float32
""",
    "karcher": """merge_method: karcher
models:
  - model: {e0}
  - model: {e1}
  - model: {e2}
dtype: float32
""",
    "nuslerp": """merge_method: nuslerp
base_model: {base}
models:
  - model: {e0}
    parameters: {{weight: 1.0}}
  - model: {e1}
    parameters: {{weight: 2.0}}
dtype: float32
""",
    "nearswap": """merge_method: nearswap
base_model: {base}
models:
  - model: {e0}
parameters: {{t: 0.001}}
dtype: float32
""",
    "passthrough": """merge_method: passthrough
slices:
  - sources:
      - model: {e0}
        layer_range: [0, 8]
  - sources:
      - model: {e1}
        layer_range: [4, 12]
dtype: float32
""",
    "arcee_fusion": """merge_method: arcee_fusion
base_model: {base}
models:
  - model: {e0}
dtype: float32
""",
}

# Methods mergekit does not have (the subspace merges): mergeflow's own config, timed against task arithmetic.
NATIVE = """base: {base}
experts: {{e0: {e0}, e1: {e1}, e2: {e2}}}
method: {method}
dtype: float32
"""


def build_models(work: Path) -> dict[str, Path]:
    """The base and three experts (built once; reused on later runs)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = {"base": work / "base", **{f"e{i}": work / f"expert{i}" for i in range(3)}}
    if all((p / "model.safetensors.index.json").exists() for p in paths.values()):
        return paths
    print("building the 134M-parameter Llama base and three experts ...", flush=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                      num_key_value_heads=12, vocab_size=32000, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    print(f"  parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M", flush=True)
    shutil.rmtree(paths["base"], ignore_errors=True)
    model.save_pretrained(paths["base"], max_shard_size="200MB", safe_serialization=True)
    del model
    index = json.loads((paths["base"] / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    for i in range(3):
        out = paths[f"e{i}"]
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        g = torch.Generator().manual_seed(100 + i)
        for f in files:
            tensors = load_file(paths["base"] / f)
            noisy = {k: (v + 1e-3 * torch.randn(v.shape, generator=g)).contiguous() for k, v in tensors.items()}
            save_file(noisy, out / f, metadata={"format": "pt"})
        for f in ("config.json", "model.safetensors.index.json", "generation_config.json"):
            if (paths["base"] / f).exists():
                shutil.copy2(paths["base"] / f, out / f)
    return paths


def ensure_mergekit(work: Path) -> Path:
    venv = work / "mergekit-venv"
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    import torch

    print(f"installing mergekit {MERGEKIT_VERSION} into {venv} (one time) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "-q"]
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    subprocess.run([*pip, torch_pin], check=True)  # the same torch build as here (CPU on CI machines)
    constraint = work / "mergekit-constraint.txt"
    constraint.write_text(torch_pin + "\n")
    subprocess.run([*pip, f"mergekit=={MERGEKIT_VERSION}", "-c", str(constraint)], check=True)
    return exe


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Run ``cmd`` as a child process; its wall time (s) and peak RSS (bytes).

    The peak is the child's own high-water mark (``VmHWM`` of /proc/PID/status, read every 20 ms until it
    exits; it only grows). Not wait4's ``ru_maxrss``: Linux carries a process's maximum across fork and exec,
    so a child of this (large) process would report at least this process's size.
    """
    import tempfile

    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a chatty child cannot block on a full pipe
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
        peak = 0
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                peak = max(peak, int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM:")).split()[1]))
            except (OSError, StopIteration, ValueError):
                pass
            time.sleep(0.02)
        wall = time.perf_counter() - start
        log.seek(0)
        err = log.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return wall, peak * 1024


def compare_outputs(a: Path, b: Path) -> tuple[float, int, int]:
    """Max |difference| and the count of differing elements over all tensors of two checkpoints."""
    import torch

    sys.path.insert(0, str(ROOT))
    from operators.tensor_io import TensorReader

    ra, rb = TensorReader(a), TensorReader(b)
    worst, differ, total = 0.0, 0, 0
    for k in ra.keys():
        x, y = ra.get(k).float(), rb.get(k).float()
        d = (x - y).abs()
        worst = max(worst, float(d.max()))
        differ += int((~torch.isclose(x, y, rtol=1e-5, atol=1e-6)).sum())
        total += x.numel()
    return worst, differ, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "mergeflow-bench")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--methods", default="ties,task_arithmetic")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--mergekit-bin", type=Path, default=None, help="an existing mergekit-yaml executable")
    args = ap.parse_args()

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    models = build_models(work)
    mergeflow = [sys.executable, "-m", "pipeline.cli", "merge"]
    mergekit = None if args.skip_mergekit else (args.mergekit_bin or ensure_mergekit(work))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    import platform

    import torch

    print(f"machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; torch {torch.__version__}")
    results: dict[str, dict[str, list[tuple[float, int]]]] = {}
    for method in args.methods.split(","):
        cfg = work / f"{method}.yaml"
        template = CONFIGS.get(method, NATIVE)
        cfg.write_text(template.format(method=method, **{k: str(v) for k, v in models.items()}))
        results[method] = {"mergeflow": [], "mergekit": []}
        for rep in range(args.reps):
            for tool in ("mergeflow", "mergekit"):
                if tool == "mergekit" and (mergekit is None or method not in CONFIGS):
                    continue
                out = work / "out" / f"{method}-{tool}"
                shutil.rmtree(out, ignore_errors=True)
                if tool == "mergeflow":
                    cmd = [*mergeflow, str(cfg), str(out), "--shard-size", "200MB", "--quiet"]
                else:
                    cmd = [str(mergekit), str(cfg), str(out), "--out-shard-size", "50M", "--quiet",
                           "--no-write-model-card"]
                wall, rss = timed(cmd, env)
                results[method][tool].append((wall, rss))
                print(f"  {method:16s} {tool:9s} rep {rep + 1}: {wall:6.1f} s  peak RSS {rss / 2**20:6.0f} MiB",
                      flush=True)

    print()
    print(f"{'method':16s} {'tool':9s} {'median s':>9s} {'peak RSS MiB':>13s}")
    for method, by_tool in results.items():
        med = {}
        for tool, runs in by_tool.items():
            if not runs:
                continue
            med[tool] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
            print(f"{method:16s} {tool:9s} {med[tool][0]:9.1f} {med[tool][1] / 2**20:13.0f}")
        if method != "task_arithmetic" and "task_arithmetic" in results and method not in CONFIGS:
            ta = statistics.median(r[0] for r in results["task_arithmetic"]["mergeflow"])
            print(f"{method:16s} {med['mergeflow'][0] / ta:.2f}x task arithmetic's time")
        if "mergekit" in med:
            speed = med["mergekit"][0] / med["mergeflow"][0]
            mem = med["mergeflow"][1] / med["mergekit"][1]
            print(f"{method:16s} mergeflow is {speed:.1f}x faster, at {100 * mem:.0f}% of mergekit's peak RSS")
            worst, differ, total = compare_outputs(work / "out" / f"{method}-mergeflow", work / "out" / f"{method}-mergekit")
            print(f"{method:16s} outputs: max |Δ| {worst:.3g}; {differ} of {total} elements differ beyond "
                  "rtol 1e-5/atol 1e-6")


if __name__ == "__main__":
    main()
