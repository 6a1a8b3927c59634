"""A merge split by tensors into parts (``resources.merge_workers``): bytes, time and peak memory per part
against the merge in one process (a benchmark, not a test).

Workload: merge_speed.py's ~134M-parameter float32 Llama and three experts (built once under --workdir).
Each run is a fresh process, measured by its own VmHWM (merge_speed.timed):

- ``one``: ``merge_checkpoints`` of the whole model (shards of the split's size, so the files can be compared);
- ``statistics``: a method's whole-model pass alone (TIES' model-wide top-k), once, as the workflow runs it
  before the parts (``whole_model_statistics``; its result, a few floats, handed to every part);
- ``part i``: ``merge_checkpoints(part=(i, n))``, each part alone (what a node runs: its tensors read, its
  shards written), one after the other so that each peak is its own;
- ``idle``: a process that imports the same modules and merges nothing: the floor under every peak.

Then the parts are put together (``assemble_parts``) and every file compared with the one-process merge's.
Printed: per run the wall time, peak RSS, peak above the floor and bytes read; the target "peak per part
≤ 1/3 of the one-process merge + one tensor" is checked on both the raw peak and the peak above the floor.

    python benchmarks/split_merge.py [--parts 3] [--methods task_arithmetic,ties]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from merge_speed import build_models, timed  # noqa: E402

PARAMS = {"task_arithmetic": {"scaling": 0.5}, "ties": {"density": 0.2, "scaling": 1.0}}


def child(code: str) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); {code}"]


def digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())
            if p.is_file() and p.name != "mergeflow.json"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "mergeflow-bench"))
    ap.add_argument("--parts", type=int, default=3)
    ap.add_argument("--methods", default="task_arithmetic,ties")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    paths = build_models(work)

    from operators.merge.output import output_plan
    from operators.merge.split import assemble_parts, part_shard_bytes
    from operators.tensor_io import TensorReader

    base, experts = paths["base"], {k: str(v) for k, v in paths.items() if k != "base"}
    with TensorReader(base) as ref:
        plan = output_plan(ref.keys(), ref, None)
        largest = max(ref.nbytes(k) for k in ref.keys())
        model_bytes = sum(ref.nbytes(k) for k in ref.keys())
    shard = part_shard_bytes(plan, 2 * 1024**3, args.parts)
    n = args.parts
    _, idle = timed(child("import torch, transformers; from operators.merge.engine import merge_checkpoints"))
    mib = 2**20
    print(f"model {model_bytes / 1e9:.2f} GB float32 (+3 experts), largest tensor {largest / mib:.0f} MiB; {n} parts, "
          f"shards of {shard / mib:.0f} MiB; idle process (imports only): {idle / mib:.0f} MiB")
    for method in args.methods.split(","):
        out = work / f"split-{method}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        call = (f"from operators.merge.engine import merge_checkpoints; import json; r = merge_checkpoints("
                f"{str(base)!r}, {experts!r}, {method!r}, {PARAMS[method]!r}, OUT, max_shard_bytes={shard}PART); "
                "print(json.dumps({'bytes_read': r.bytes_read, 'seconds': r.seconds}))")
        one_wall, one_peak = timed(child(call.replace("OUT", repr(str(out / "one"))).replace("PART", "")))
        stats_file = out / "stats.json"
        stats_wall, stats_peak = timed(child(
            "from operators.merge.engine import whole_model_statistics; import json; "
            f"s = whole_model_statistics({str(base)!r}, {experts!r}, {method!r}, {PARAMS[method]!r}); "
            f"open({str(stats_file)!r}, 'w').write(json.dumps(s))"))
        given = f", whole_model_stats=json.load(open({str(stats_file)!r}))"
        rows = []
        for i in range(n):
            wall, peak = timed(child(call.replace("OUT", repr(str(out / f"part-{i}")))
                                     .replace("PART", f", part=({i}, {n}){given}")))
            record = json.loads((out / f"part-{i}" / "part.json").read_text())
            rows.append((i, wall, peak, record["bytes_read"], record["files"]))
        summary = assemble_parts(base, experts, [out / f"part-{i}" for i in range(n)], out / "assembled")
        same = digests(out / "assembled") == digests(out / "one")
        target = one_peak / n + largest
        print(f"\n{method}: one process {one_wall:.1f} s, peak {one_peak / mib:.0f} MiB ({(one_peak - idle) / mib:.0f} "
              f"above the idle floor); put together in {summary['assemble_seconds']:.2f} s; files identical: {same}")
        print("| run | wall s | peak RSS MiB | above floor MiB | GB read | shards |")
        print("|---|---|---|---|---|---|")
        if json.loads(stats_file.read_text()) is not None:
            print(f"| statistics (once) | {stats_wall:.1f} | {stats_peak / mib:.0f} | {(stats_peak - idle) / mib:.0f} | "
                  f"{model_bytes * 4 * 2 / 1e9:.2f} (two passes) | - |")
        total_read = sum(r[3] for r in rows)
        for i, wall, peak, read, files in rows:
            print(f"| part {i} | {wall:.1f} | {peak / mib:.0f} | {(peak - idle) / mib:.0f} | {read / 1e9:.2f} | "
                  f"{', '.join(files)} |")
        worst = max(r[2] for r in rows)
        print(f"parts read {total_read / 1e9:.2f} GB in all (each about 1/{n}); worst part peak {worst / mib:.0f} MiB "
              f"against the target 1/{n} of one process + one tensor = {target / mib:.0f} MiB: "
              f"{'MET' if worst <= target else 'NOT met'}; above the floor: {(worst - idle) / mib:.0f} MiB against "
              f"{((one_peak - idle) / n + largest) / mib:.0f} MiB: "
              f"{'MET' if worst - idle <= (one_peak - idle) / n + largest else 'NOT met'}")


if __name__ == "__main__":
    main()
