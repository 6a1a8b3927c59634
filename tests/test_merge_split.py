"""A merge split by tensors into parts, then put together (``operators.merge.split``): the same files, byte for
byte, as one process writes at the same shard size; each part reads only its tensors; refusals by name."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from operators.errors import MergeError
from operators.merge.engine import merge_checkpoints, whole_model_statistics
from operators.merge.output import output_plan
from operators.merge.split import PART_FILE, assemble_parts, part_shard_bytes
from operators.tensor_io import INDEX_FILE, TensorReader


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()
            and p.name != "mergeflow.json"}


def _shard_bytes(base: Path, parts: int) -> int:
    ref = TensorReader(base)
    try:
        return part_shard_bytes(output_plan(ref.keys(), ref, None), 2 * 1024**3, parts)
    finally:
        ref.close()


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.5, "scaling": 1.0}),
                                           ("task_arithmetic", {"scaling": 0.7})])
def test_three_parts_put_together_are_the_one_process_merge_byte_for_byte(tiny_base, tiny_experts, tmp_path,
                                                                          method, params):
    parts = [tmp_path / f"part-{i}" for i in range(3)]
    stats = whole_model_statistics(tiny_base, tiny_experts, method, params)  # TIES' model-wide top-k: once
    assert (stats is None) == (method == "task_arithmetic")
    reports = [merge_checkpoints(tiny_base, tiny_experts, method, params, parts[i], part=(i, 3),
                                 whole_model_stats=stats) for i in range(3)]
    # every part wrote whole shards of the plan and no index, config or head
    for d in parts:
        assert not (d / INDEX_FILE).exists() and not (d / "config.json").exists() and not (d / "heads").exists()
        assert json.loads((d / PART_FILE).read_text())["files"]
    assert sum(r.tensors for r in reports) == len(TensorReader(tiny_base).keys())
    assert all(r.tensors > 0 for r in reports), "each of three parts has some of the tiny model's tensors"
    # each part read only its own tensors (base + two experts of each)
    total = sum(r.bytes_read for r in reports)
    assert all(r.bytes_read < total * 0.75 for r in reports)

    summary = assemble_parts(tiny_base, tiny_experts, parts, tmp_path / "merged",
                             provenance={"workflow": "test"})
    one = merge_checkpoints(tiny_base, tiny_experts, method, params, tmp_path / "one",
                            max_shard_bytes=_shard_bytes(tiny_base, 3))
    assert len(one.output_files) > 3, "several shards, and an index"
    got, want = _digests(tmp_path / "merged"), _digests(tmp_path / "one")
    assert got == want, "every file (shards, index, config, tokenizer, heads) is the one-process merge's"
    prov = json.loads((tmp_path / "merged" / "mergeflow.json").read_text())
    assert prov["method"] == method and prov["split"]["parts"] == 3 and prov["workflow"] == "test"
    assert summary["tensors"] == one.tensors and not any(d.exists() and any(d.glob("*.safetensors")) for d in parts)


def test_parts_that_do_not_belong_together_are_refused(tiny_base, tiny_experts, tmp_path):
    a = [tmp_path / f"a-{i}" for i in range(2)]
    for i in range(2):
        merge_checkpoints(tiny_base, tiny_experts, "task_arithmetic", {"scaling": 0.5}, a[i], part=(i, 2))
    b1 = tmp_path / "b-1"
    merge_checkpoints(tiny_base, tiny_experts, "task_arithmetic", {"scaling": 0.9}, b1, part=(1, 2))
    with pytest.raises(MergeError, match="differ in params"):
        assemble_parts(tiny_base, tiny_experts, [a[0], b1], tmp_path / "out")
    with pytest.raises(MergeError, match="not parts 0 to 2"):
        assemble_parts(tiny_base, tiny_experts, [a[0], a[1], a[1]], tmp_path / "out")
    with pytest.raises(MergeError, match="no part.json"):
        assemble_parts(tiny_base, tiny_experts, [a[0], tmp_path], tmp_path / "out")
    assert not (tmp_path / "out").exists(), "nothing is written when the parts are refused"
    with pytest.raises(MergeError, match="numbered 0 to 1"):
        merge_checkpoints(tiny_base, tiny_experts, "task_arithmetic", {"scaling": 0.5}, tmp_path / "c", part=(2, 2))


def test_a_workflow_merge_in_parts_is_the_merge_in_one_step(tiny_base, tmp_path):
    """resources.merge_workers through the workflow (in process): the parts go through the store and are put
    together by the merge step; the published merge holds the one-step merge's tensors, bit for bit, and records
    its parts."""
    from mlflow import MlflowClient

    from pipeline.driver import run_workflow
    from pipeline.spec import parse_workflow
    from tests.helpers import tiny_workflow_dict

    split = parse_workflow(tiny_workflow_dict(tmp_path / "split", tiny_base, resources={"num_cpus": 1,
                                                                                          "merge_workers": 3}))
    lines: list[str] = []
    done = run_workflow(split, address="in-process", report=lines.append).rounds[0]
    b = done.merged
    assert any("merged in 3 parts" in line for line in lines), lines
    # the one-step merge of the same experts, with the same method and parameters
    merge_checkpoints(tiny_base, {t: e.path for t, e in done.experts.items()}, split.merge.method, split.merge.params,
                      tmp_path / "one")
    a = Path(tmp_path / "one")
    # the one-step merge wrote one file (the tiny model is under 2 GiB); the parts wrote shards of a third
    prov = json.loads((Path(b.path) / "mergeflow.json").read_text())
    assert prov["split"]["parts"] == 3 and [p["part"] for p in prov["parts"]] == [0, 1, 2]
    assert all(p["peak_rss_bytes"] > 0 for p in prov["parts"])
    from operators.tensor_io import TensorReader

    with TensorReader(a) as x, TensorReader(Path(b.path)) as y:
        assert x.keys() == y.keys()
        for k in x.keys():
            assert x.get(k).view(-1).view(torch.uint8).equal(y.get(k).view(-1).view(torch.uint8)), k
    assert not list(Path(split.store.root).rglob("*.parts/*")), "the parts' folders are gone"
    run = MlflowClient(tracking_uri=split.tracking.uri).get_run(b.run_id)
    assert run.data.metrics["merge_parts"] == 3 and "merge_part_2_peak_rss_mb" in run.data.metrics
