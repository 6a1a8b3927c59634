"""The streaming engine: equals an in-memory merge, writes loadable shards, refuses bad inputs
before writing anything, and never leaves a partial output behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from operators.merge import get_method
from operators.merge.engine import MergeError, merge_checkpoints
from operators.tensor_io import INDEX_FILE, load_state_dict


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []


def test_streaming_equals_in_memory_on_multi_shard(tiny_base, tiny_experts, tmp_path):
    out = tmp_path / "merged"
    report = merge_checkpoints(tiny_base, tiny_experts, "task_arithmetic", {"scaling": 0.4}, out, max_shard_bytes=20_000)
    assert (out / INDEX_FILE).is_file(), "small shards force a sharded output with an index"
    assert len([f for f in report.output_files if f.endswith(".safetensors")]) > 2
    merged = load_state_dict(out)
    base = load_state_dict(tiny_base)
    experts = {n: load_state_dict(p) for n, p in tiny_experts.items()}
    method = get_method("task_arithmetic")
    params = method.parse_params({"scaling": 0.4})
    assert set(merged) == set(base)
    for key, b in base.items():
        expected = method.fn(b, [experts[n][key] for n in sorted(experts)], [1.0, 1.0], params, None)
        assert torch.allclose(merged[key], expected.to(b.dtype), atol=1e-6), key
    assert report.tensors == len(base)
    assert report.bytes_written > 0 and report.bytes_read > 0


def test_output_is_a_loadable_checkpoint_with_heads_and_provenance(tiny_base, tiny_experts, tmp_path):
    from transformers import AutoModel

    out = tmp_path / "merged"
    merge_checkpoints(tiny_base, tiny_experts, "linear", {}, out, max_shard_bytes=20_000,
                      provenance={"round": 0})
    body = AutoModel.from_pretrained(str(out))
    assert body.config.hidden_size == 32
    assert sorted(p.name for p in (out / "heads").iterdir()) == ["length", "vowel"]
    # each head is copied byte-for-byte from its expert
    for task, path in tiny_experts.items():
        assert (out / "heads" / task / "head.safetensors").read_bytes() == (path / "heads" / task / "head.safetensors").read_bytes()
    prov = json.loads((out / "mergeflow.json").read_text())
    assert prov["kind"] == "merged" and prov["method"] == "linear" and prov["round"] == 0
    assert set(prov["experts"]) == {"vowel", "length"}
    assert (out / "vocab.txt").is_file(), "tokenizer copied from the base"


def test_lambda_zero_reproduces_the_base(tiny_base, tiny_experts, tmp_path):
    out = tmp_path / "m"
    merge_checkpoints(tiny_base, tiny_experts, "task_arithmetic", {"scaling": 0.0}, out)
    base = load_state_dict(tiny_base)
    for k, v in load_state_dict(out).items():
        assert torch.equal(v, base[k]), k


def test_expert_mapping_order_does_not_matter(tiny_base, tiny_experts, tmp_path):
    a = merge_checkpoints(tiny_base, dict(sorted(tiny_experts.items())), "task_arithmetic", {}, tmp_path / "a")
    b = merge_checkpoints(tiny_base, dict(sorted(tiny_experts.items(), reverse=True)), "task_arithmetic", {}, tmp_path / "b")
    assert a.experts == b.experts
    for k, v in load_state_dict(tmp_path / "a").items():
        assert torch.equal(v, load_state_dict(tmp_path / "b")[k])


# --- bad inputs: each refused with its own message, and nothing is left behind (corrupt checkpoints: their
# catalogue is tests/test_corrupt_checkpoints.py) ---------------------------------------------------------

@pytest.mark.parametrize("method,params,message", [
    ("ties", {"density": 0.0}, "params.density: density must be in (0, 1]: the fraction of each task vector kept (got 0.0)"),
    ("ties", {"density": 1.2}, "params.density: density must be in (0, 1]: the fraction of each task vector kept (got 1.2)"),
    ("ties", {"weights": {"vowel": -0.5}}, "params.weights: negative weights are not allowed for 'ties' (got {'vowel': -0.5})"),
    ("dare_ties", {"drop_rate": 1.0}, "params.drop_rate: Input should be less than 1 (got 1.0)"),
    ("consensus", {"k": 3}, "params.k: 3 is more than the 2 experts being merged"),
])
def test_parameters_out_of_range_refused_and_nothing_written(tiny_base, tiny_experts, tmp_path, method, params, message):
    out = tmp_path / "out" / "m"
    with pytest.raises(ValueError) as info:
        merge_checkpoints(tiny_base, tiny_experts, method, params, out)
    assert message in str(info.value)
    assert not out.exists() and _siblings(out) == []


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"scaling": 0.7}),
    ("ties", {"density": 0.3, "scope": "tensor"}),
    ("ties", {"density": 0.3}),
    ("consensus", {"k": 1, "scaling": 0.5}),
    ("breadcrumbs", {"density": 0.4, "gamma": 0.05, "scaling": 1.0}),
    ("linear", {}),
])
def test_merging_in_row_blocks_equals_merging_whole_tensors(tiny_base, tiny_experts, tmp_path, method, params):
    """The engine splits large matrices of element-wise methods; the pico model's are split here."""
    merge_checkpoints(tiny_base, tiny_experts, method, params, tmp_path / "whole")
    merge_checkpoints(tiny_base, tiny_experts, method, params, tmp_path / "blocks", chunk_elements=100,
                      max_shard_bytes=30_000)
    whole, blocks = load_state_dict(tmp_path / "whole"), load_state_dict(tmp_path / "blocks")
    assert sorted(whole) == sorted(blocks)
    for k in whole:
        assert torch.allclose(whole[k], blocks[k], atol=1e-6), k
    # the streamed shards are ordinary safetensors files
    for shard in (tmp_path / "blocks").glob("model-*.safetensors"):
        assert load_file(shard)


def test_bad_params_and_existing_output_refused(tiny_base, tiny_experts, tmp_path):
    with pytest.raises(ValueError, match="params.scaling"):
        merge_checkpoints(tiny_base, tiny_experts, "task_arithmetic", {"scaling": -2}, tmp_path / "o1")
    assert not (tmp_path / "o1").exists()
    with pytest.raises(ValueError, match="not among the experts being merged"):
        merge_checkpoints(tiny_base, tiny_experts, "linear", {"weights": {"nope": 1}}, tmp_path / "o2")
    occupied = tmp_path / "o3"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="exists and is not empty"):
        merge_checkpoints(tiny_base, tiny_experts, "linear", {}, occupied)
    assert (occupied / "keep.txt").read_text() == "mine"


def test_failure_mid_write_leaves_nothing(tiny_base, tiny_experts, tmp_path):
    out = tmp_path / "out" / "m"

    def boom(done, total):
        if done == 5:
            raise RuntimeError("simulated crash while writing")

    with pytest.raises(RuntimeError, match="simulated crash"):
        merge_checkpoints(tiny_base, tiny_experts, "linear", {}, out, max_shard_bytes=1_000, progress=boom)
    assert not out.exists() and _siblings(out) == []


def test_methods_get_a_first_pass_statistic_and_the_tensor_name(tiny_base, tiny_experts, tmp_path):
    """The interface whole-model methods (TIES' global top-k, LiNeS' layer index) build on."""
    from operators.merge.registry import MERGE_METHODS, MergeParams, register

    seen_keys: list[str] = []

    def prepare(stream, params, names):
        # the largest |τ| over the whole model and every expert, streamed tensor by tensor
        return max(float((e.float() - b.float()).abs().max()) for _, b, es in stream() for e in es)

    @register("_test_global_clip", params=MergeParams, needs_base=True, paper="https://arxiv.org/abs/0000.00000",
              formula="θ = θ0 + τ_1 / max|τ|", prepare=prepare)
    def global_clip(base, experts, weights, params, ctx):
        seen_keys.append(ctx.key)
        return base.float() + (experts[0].float() - base.float()) / ctx.stats

    try:
        merge_checkpoints(tiny_base, {"vowel": tiny_experts["vowel"]}, "_test_global_clip", {}, tmp_path / "m")
    finally:
        del MERGE_METHODS["_test_global_clip"]
    base, expert = load_state_dict(tiny_base), load_state_dict(tiny_experts["vowel"])
    floats = [k for k in base if base[k].is_floating_point() and k in expert]
    top = max(float((expert[k] - base[k]).abs().max()) for k in floats)
    merged = load_state_dict(tmp_path / "m")
    assert sorted(seen_keys) == sorted(floats)
    for k in floats:
        assert torch.allclose(merged[k], base[k] + (expert[k] - base[k]) / top, atol=1e-7), k
