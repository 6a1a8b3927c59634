"""The catalogue of corrupt checkpoints: each is refused by name before anything is merged (or, for a merge
that overflows, before anything is published), with one line that says what is wrong; nothing is left
behind. And a fine-tune that diverges fails at the step where it did, with its last finite loss, and
saves nothing."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from operators.errors import MergeError, TrainingDiverged
from operators.merge.engine import merge_checkpoints
from operators.tensor_io import INDEX_FILE, CheckpointError

KEY = "encoder.layer.0.attention.self.query.weight"


def _edit_weights(edit: Callable[[dict[str, torch.Tensor]], None]):
    """A copy of the 'vowel' expert whose state dict ``edit`` changes, saved again as safetensors."""
    def build(tmp: Path, base: Path, experts: dict[str, Path]) -> dict:
        dst = shutil.copytree(experts["vowel"], tmp / "vowel")
        sd = load_file(str(dst / "model.safetensors"))
        edit(sd)
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
        return {"experts": {"vowel": dst, "length": experts["length"]}}
    return build


def _edit_bytes(edit: Callable[[bytes], bytes]):
    def build(tmp: Path, base: Path, experts: dict[str, Path]) -> dict:
        dst = shutil.copytree(experts["vowel"], tmp / "vowel")
        f = dst / "model.safetensors"
        f.write_bytes(edit(f.read_bytes()))
        return {"experts": {"vowel": dst}}
    return build


def _pickle_only(tmp: Path, base: Path, experts: dict[str, Path]) -> dict:
    dst = shutil.copytree(experts["vowel"], tmp / "vowel")
    (dst / "model.safetensors").rename(dst / "pytorch_model.bin")  # never unpickled: not even opened
    return {"experts": {"vowel": dst}}


def _sharded(tmp: Path, base: Path, experts: dict[str, Path]) -> Path:
    src = tmp / "sharded"
    merge_checkpoints(base, experts, "linear", {}, src, max_shard_bytes=20_000)
    return src


def _shard_missing(tmp: Path, base: Path, experts: dict[str, Path]) -> dict:
    src = _sharded(tmp, base, experts)
    sorted(src.glob("model-*.safetensors"))[1].unlink()
    return {"experts": {"vowel": src}}


def _tensor_in_wrong_shard(tmp: Path, base: Path, experts: dict[str, Path]) -> dict:
    src = _sharded(tmp, base, experts)
    index = json.loads((src / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    where = index["weight_map"][KEY]
    index["weight_map"][KEY] = next(s for s in shards if s != where)
    (src / INDEX_FILE).write_text(json.dumps(index))
    return {"experts": {"vowel": src}}


def _config(**changes):
    def build(tmp: Path, base: Path, experts: dict[str, Path]) -> dict:
        dst = shutil.copytree(experts["vowel"], tmp / "vowel")
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(changes)
        (dst / "config.json").write_text(json.dumps(cfg))
        return {"experts": {"vowel": dst, "length": experts["length"]}}
    return build


def _huge_task_vectors(value: float, **kw):
    """Both experts move one weight by ``value``: finite inputs whose merge overflows."""
    def build(tmp: Path, base: Path, experts: dict[str, Path]) -> dict:
        base_sd = load_file(str(base / "model.safetensors"))
        out = {}
        for name in ("vowel", "length"):
            dst = shutil.copytree(experts[name], tmp / name)
            sd = load_file(str(dst / "model.safetensors"))
            sd[KEY][0, 0] = base_sd[KEY][0, 0] + value
            save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
            out[name] = dst
        return {"experts": out, "method": "task_arithmetic", "params": {"scaling": 1.0}, **kw}
    return build


def _adapter(edit_config: dict | None = None, edit_tensors: Callable[[dict], None] | None = None):
    """A peft LoRA adapter (r 4 on q_proj and v_proj) of a tiny Llama, then broken."""
    def build(tmp: Path, base: Path, experts: dict[str, Path]) -> dict:
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaForCausalLM

        from tests.helpers import make_tiny_causal_lm

        llama = make_tiny_causal_lm(tmp / "llama")
        model = get_peft_model(LlamaForCausalLM.from_pretrained(str(llama)),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        model.save_pretrained(str(tmp / "adapter"))
        ad = tmp / "adapter"
        if edit_config:
            cfg = json.loads((ad / "adapter_config.json").read_text())
            (ad / "adapter_config.json").write_text(json.dumps({**cfg, **edit_config}))
        if edit_tensors:
            sd = load_file(str(ad / "adapter_model.safetensors"))
            edit_tensors(sd)
            save_file(sd, str(ad / "adapter_model.safetensors"))
        return {"base": llama, "experts": {"a": ad}}
    return build


def _lora_b_rank(sd: dict) -> None:
    key = next(k for k in sorted(sd) if k.endswith("lora_B.weight"))
    sd[key] = torch.zeros(sd[key].shape[0], 3)


# (case, how the broken input is made, the error, what its one line says)
CATALOGUE = [
    ("nan-in-an-expert", _edit_weights(lambda sd: sd[KEY].__setitem__((0, 0), float("nan"))), MergeError,
     rf"vowel: tensor '{KEY}' has 1 NaN/Inf values; the checkpoint is broken, re-create it"),
    ("inf-in-an-expert", _edit_weights(lambda sd: sd[KEY].__setitem__((1, 2), float("-inf"))), MergeError,
     rf"vowel: tensor '{KEY}' has 1 NaN/Inf values"),
    ("shape-not-the-bases", _edit_weights(lambda sd: sd.__setitem__(KEY, torch.zeros(16, 32))), MergeError,
     rf"expert 'vowel': tensor '{KEY}' has shape \[16, 32\], base has \[32, 32\]"),
    ("dtype-not-the-bases", _edit_weights(lambda sd: sd.__setitem__(KEY, sd[KEY].to(torch.float16))), MergeError,
     rf"expert 'vowel': tensor '{KEY}' has dtype torch.float16, base has torch.float32. Convert"),
    ("tensor-missing", _edit_weights(lambda sd: sd.pop(KEY)), MergeError,
     rf"does not have the base's tensors: missing \['{KEY}'\] \(1\), extra \[\] \(0\)"),
    ("tensor-extra", _edit_weights(lambda sd: sd.__setitem__("encoder.layer.9.extra.weight", torch.zeros(2))),
     MergeError, r"extra \['encoder.layer.9.extra.weight'\] \(1\)"),
    ("shard-truncated", _edit_bytes(lambda b: b[: len(b) // 2]), CheckpointError, r"corrupt or truncated"),
    ("shard-header-not-json", _edit_bytes(lambda b: b[:8] + b"\x00garbage, not a JSON header....." + b[40:]),
     CheckpointError, r"model.safetensors: cannot read safetensors file \(header is not JSON"),
    ("pickle-only-weights", _pickle_only, CheckpointError, r"mergeflow loads safetensors only"),
    ("index-names-a-missing-shard", _shard_missing, CheckpointError,
     rf"model-\d+-of-\d+.safetensors: shard listed in {INDEX_FILE} is missing"),
    ("index-puts-a-tensor-in-the-wrong-shard", _tensor_in_wrong_shard, CheckpointError,
     r"the index lists 1 tensors that are not in their shards"),
    ("config-of-another-architecture", _config(model_type="gpt2"), MergeError,
     r"expert 'vowel' .* has a different architecture from the base: config.json model_type='gpt2' vs base 'bert'"),
    ("config-of-another-size", _config(hidden_size=16), MergeError,
     r"different architecture from the base: config.json hidden_size=16 vs base 32"),
    ("adapter-config-rank-not-its-tensors", _adapter(edit_config={"r": 8}), CheckpointError,
     r"adapter_config.json: module '.*' has r=8 by its r/rank_pattern, but its stored lora_A has rank 4"),
    ("adapter-a-and-b-ranks-differ", _adapter(edit_tensors=_lora_b_rank), CheckpointError,
     r"lora_A \[4, 32\] and lora_B \[32, 3\] have different ranks; the adapter is corrupt"),
    ("merge-overflows-float32", _huge_task_vectors(3.0e38), MergeError,
     rf"task_arithmetic: the merged tensor '{KEY}' has 1 NaN/Inf values, from finite inputs; nothing was published"),
    ("merge-overflows-its-float16-output", _huge_task_vectors(4.0e4, out_dtype=torch.float16), MergeError,
     rf"task_arithmetic: the merged tensor '{KEY}' has 1 NaN/Inf values once cast to float16, from finite inputs"),
]


@pytest.mark.parametrize("build,exc,message", [c[1:] for c in CATALOGUE], ids=[c[0] for c in CATALOGUE])
def test_a_corrupt_checkpoint_is_refused_by_name_and_nothing_is_published(tiny_base, tiny_experts, tmp_path, build,
                                                                         exc, message):
    case = build(tmp_path / "in", tiny_base, tiny_experts)
    out = tmp_path / "out" / "merged"
    with pytest.raises(exc, match=message) as info:
        merge_checkpoints(case.get("base", tiny_base), case["experts"], case.get("method", "linear"),
                          case.get("params", {}), out, **({"out_dtype": case["out_dtype"]} if "out_dtype" in case else {}))
    assert "\n" not in str(info.value), "one line"
    assert not out.exists(), "nothing published"
    assert not out.parent.exists() or list(out.parent.iterdir()) == [], "no partial directory left behind"


def test_the_merge_overflow_check_lets_the_largest_finite_merge_through(tiny_base, tiny_experts, tmp_path):
    # the same experts one step short of overflow: published, and the value is the task arithmetic's sum
    case = _huge_task_vectors(3.0e4, out_dtype=torch.float16)(tmp_path / "in", tiny_base, tiny_experts)
    merge_checkpoints(tiny_base, case["experts"], "task_arithmetic", {"scaling": 1.0}, tmp_path / "m",
                      out_dtype=torch.float16)
    base = load_file(str(tiny_base / "model.safetensors"))[KEY][0, 0]
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))[KEY][0, 0]
    assert merged.dtype == torch.float16 and float(merged) == pytest.approx(float(base) + 6.0e4, rel=1e-3)


def test_a_fine_tune_that_diverges_fails_at_that_step_with_its_last_finite_loss_and_saves_nothing(tmp_path):
    """A real divergence: the base's embedding of one character holds 3e38 (finite). Batches without that
    character train normally; the first batch with it overflows LayerNorm's variance and the loss is NaN."""
    from transformers import AutoTokenizer

    from operators.data import load_task_data
    from operators.finetune import finetune
    from pipeline.spec import DatasetSpec, FinetuneSpec
    from tests.helpers import make_tiny_bert, write_task_file

    base = make_tiny_bert(tmp_path / "base")
    sd = load_file(str(base / "model.safetensors"))
    sd["embeddings.word_embeddings.weight"][AutoTokenizer.from_pretrained(str(base)).convert_tokens_to_ids("##j"), 0] = 3e38
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    data = load_task_data("vowel", DatasetSpec(source=str(write_task_file(tmp_path / "v.parquet", "vowel"))),
                          ["consonant", "vowel"])
    curve: list[tuple[int, float]] = []
    with pytest.raises(TrainingDiverged) as info:
        finetune(base, data, FinetuneSpec(max_steps=8, batch_size=4, learning_rate=1e-3, log_every=1),
                 tmp_path / "expert", log=lambda step, m: curve.append((step, m["train_loss"])))
    msg = str(info.value)
    assert curve, "it trained a while before it diverged (this base only overflows on some batches)"
    last_step, last_loss = curve[-1]
    assert f"fine-tuning 'vowel' diverged at step {last_step + 1} of 8: the training loss is nan" in msg, msg
    assert f"its last finite value {last_loss:.6g} at step {last_step}" in msg, msg
    assert "Lower finetune.learning_rate (now 0.001)" in msg and "\n" not in msg
    assert not (tmp_path / "expert").exists(), "nothing of the diverged expert is saved"
