"""Where a streaming merge's time goes, against what the machine can move (a benchmark, not a test).

On merge_speed.py's workload (a 134M-parameter Llama in float32, three experts; built there once), times
each part of a task-arithmetic and a TIES merge on its own, in one process, files in the page cache:

- start: a fresh Python importing mergeflow's merge command (torch, safetensors, the engine);
- read: every tensor of the base and the three experts read with ``pread`` into fresh buffers, block by block
  as the engine reads them;
- compute: the method's function over those blocks, in memory (no reads, no writes);
- write: the merged tensors written as 200 MB safetensors shards;
- the whole ``mergeflow merge`` (a fresh process, as merge_speed.py times it);

and the machine's own rates: a memory copy (``torch`` ``copy_`` of 1 GiB), and the page cache's read rate
(``pread`` of the shards). The floor of a merge is its bytes (4 inputs read, 1 output written) at those rates.

    python benchmarks/merge_anatomy.py [--workdir /tmp/mergeflow-bench] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "mergeflow-bench")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from merge_speed import build_models

    from operators.merge import get_method
    from operators.merge.blocks import CHUNK_ELEMENTS, _plan_blocks
    from operators.merge.registry import TensorContext, resolve_weights
    from operators.tensor_io import ShardedWriter, TensorReader

    torch.set_num_threads(args.threads)
    models = build_models(args.workdir)
    names = ["e0", "e1", "e2"]
    readers = {n: TensorReader(p) for n, p in models.items()}
    base = readers["base"]
    keys = base.keys()
    gib = 2**30

    # the machine: memory copy, page-cache reads
    a = torch.empty(gib // 4, dtype=torch.float32).fill_(1.0)
    b = torch.empty_like(a)
    b.copy_(a)
    t = time.perf_counter()
    for _ in range(3):
        b.copy_(a)
    copy_gbs = 3 * 2 * gib / (time.perf_counter() - t) / 1e9  # read + write
    del a, b
    nbytes = sum(base.nbytes(k) for k in keys)

    # start: a fresh process importing the merge command
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import pipeline.cli.merge, operators.merge.engine, safetensors.torch"],
                   check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    start_s = time.perf_counter() - t

    rows = {}
    for method, params in (("task_arithmetic", {"scaling": 1.0, "weights": {n: 0.3 for n in names}}),
                           ("ties", {"density": 0.2, "scope": "tensor", "divisor": "weights", "zero_sign": "positive"})):
        spec = get_method(method)
        p = spec.parse_params(params)
        weights = resolve_weights(p, names)
        blocks = _plan_blocks(keys, base, spec, p, CHUNK_ELEMENTS)
        # read: every block of every input, as the engine reads them (fresh buffers)
        for _ in range(2):  # the second pass is timed: the page cache is warm, as in merge_speed's later reps
            t = time.perf_counter()
            held = []
            for blk in blocks:
                ins = [readers[n].get_flat(blk.key, blk.start, blk.stop).reshape(blk.view) for n in ["base", *names]]
                held.append(ins)
            read_s = time.perf_counter() - t
        # compute: the method over the blocks in memory (per-tensor statistics as the engine gets them)
        t = time.perf_counter()
        outs = []
        ctx = None
        for blk, ins in zip(blocks, held, strict=True):
            if blk.first:
                ctx = TensorContext(key=blk.key, experts=tuple(names))
                if spec.tensor_stats is not None and not blk.last:
                    whole = base.get(blk.key).float()
                    local = spec.tensor_stats(lambda i, k=blk.key, w=whole: readers[names[i]].get(k).float() - w,
                                              p, names, blk.key)
                    ctx = TensorContext(key=blk.key, experts=tuple(names), local=local)
            outs.append(spec.fn(ins[0] if spec.needs_base else None, ins[1:], weights, p, ctx))
        compute_s = time.perf_counter() - t
        del held
        # write: the merged blocks as 200 MB shards
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            w = ShardedWriter(Path(tmp), [(k, base.dtype(k), base.shape(k)) for k in keys], 200 * 10**6)
            t = time.perf_counter()
            for blk, o in zip(blocks, outs, strict=True):
                w.write(blk.key, o.to(base.dtype(blk.key)))
            w.close()
            write_s = time.perf_counter() - t
        del outs
        # the whole command, fresh process
        cfg = args.workdir / f"anatomy-{method}.yaml"
        cfg.write_text(json.dumps({"base": str(models["base"]), "experts": {n: str(models[n]) for n in names},
                                   "method": method, "params": params}))
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "pipeline.cli", "merge", str(cfg), str(Path(tmp) / "out"),
                            "--shard-size", "200MB", "--quiet", "--threads", str(args.threads)], check=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
            whole_s = time.perf_counter() - t
        rows[method] = {"read": read_s, "compute": compute_s, "write": write_s, "whole": whole_s}
    read_gbs = 4 * nbytes / rows["task_arithmetic"]["read"] / 1e9
    floor = (4 * nbytes + nbytes) / (copy_gbs * 1e9 / 2)  # every byte in and out once, at the copy's one-way rate
    print(f"machine: {os.cpu_count()} CPUs, {args.threads} torch threads; torch {torch.__version__}")
    print(f"model {nbytes / 1e6:.0f} MB a checkpoint (float32); a merge reads 4 checkpoints and writes 1")
    print(f"memory copy {copy_gbs:.1f} GB/s (read + write); page-cache pread {read_gbs:.1f} GB/s; "
          f"floor at the copy rate: {floor:.2f} s for the 5 checkpoints' bytes")
    print(f"start (fresh Python importing the merge command): {start_s:.2f} s")
    print("| merge | start | read | compute | write | sum | whole `mergeflow merge` | rest (checks, threads' overlap) |")
    print("|---|---|---|---|---|---|---|---|")
    for m, r in rows.items():
        total = start_s + r["read"] + r["compute"] + r["write"]
        print(f"| {m} | {start_s:.2f} | {r['read']:.2f} | {r['compute']:.2f} | {r['write']:.2f} | {total:.2f} | "
              f"{r['whole']:.2f} | {r['whole'] - total:+.2f} |")


if __name__ == "__main__":
    main()
