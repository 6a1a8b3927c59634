"""``mergeflow moe``: a Mixtral checkpoint from dense Llama experts (mergekit-moe's config), loaded by
transformers and checked against what it is made of."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from operators.errors import MergeError
from operators.moe import build_moe
from pipeline.cli import main
from tests.helpers import write_char_tokenizer


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A tiny Llama base with a character tokenizer, and three experts whose MLPs (only) moved."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("moe")
    write_char_tokenizer(root / "base")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=77, tie_word_embeddings=False, max_position_embeddings=64,
                      pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(root / "base", safe_serialization=True)
    sd = load_file(root / "base" / "model.safetensors")
    for i in range(3):
        g = torch.Generator().manual_seed(10 + i)
        out = root / f"e{i}"
        out.mkdir()
        save_file({k: (v + 0.05 * torch.randn(v.shape, generator=g) if ".mlp." in k else v).contiguous()
                   for k, v in sd.items()}, out / "model.safetensors", metadata={"format": "pt"})
        shutil.copy2(root / "base" / "config.json", out / "config.json")
    return root


def _config(root, path, **extra):
    cfg = {"base_model": str(root / "base"), "gate_mode": "hidden", "experts_per_token": 2,
           "experts": [{"source_model": str(root / f"e{i}"), "positive_prompts": [p]}
                       for i, p in enumerate(["abc", "hello world", "zzz"])], **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_moe_loads_and_is_made_of_its_experts_mlps_and_the_prompts_hidden_states(dense, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = CliRunner().invoke(main, ["moe", str(_config(dense, tmp_path / "moe.yaml")), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 3 and cfg["num_experts_per_tok"] == 2
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(moe).__name__ == "MixtralForCausalLM"
    layer = moe.model.layers[1].mlp
    for e in range(3):
        src = load_file(dense / f"e{e}" / "model.safetensors")
        assert torch.equal(layer.experts.gate_up_proj[e], torch.cat([src["model.layers.1.mlp.gate_proj.weight"],
                                                                    src["model.layers.1.mlp.up_proj.weight"]]))
        assert torch.equal(layer.experts.down_proj[e], src["model.layers.1.mlp.down_proj.weight"])
    base_sd = load_file(dense / "base" / "model.safetensors")
    assert torch.equal(moe.model.layers[0].self_attn.q_proj.weight, base_sd["model.layers.0.self_attn.q_proj.weight"])
    # router row e of layer 1: the base's hidden state entering layer 1 at the last token of expert e's prompt
    base = AutoModelForCausalLM.from_pretrained(dense / "base").eval()
    tok = AutoTokenizer.from_pretrained(dense / "base")
    enc = tok(["hello world"], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        h = base(**enc, output_hidden_states=True).hidden_states[1][0, -1]
    assert torch.allclose(layer.gate.weight[1], h / h.norm(), atol=1e-5)
    assert torch.allclose(layer.gate.weight.norm(dim=-1), torch.ones(3), atol=1e-5)
    out = moe.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_experts_with_the_bases_mlp_make_a_moe_that_computes_the_base(dense, tmp_path):
    """Routing mixes the chosen experts with weights that sum to 1: when every expert's MLP is the base's, the
    MoE's logits are the base's, whatever the router does."""
    from transformers import AutoModelForCausalLM

    cfg = _config(dense, tmp_path / "same.yaml", gate_mode="random")
    raw = yaml.safe_load(cfg.read_text())
    for e in raw["experts"]:
        e["source_model"] = str(dense / "base")
    cfg.write_text(yaml.safe_dump(raw))
    build_moe(cfg, tmp_path / "out")
    ids = torch.tensor([[3, 9, 12, 20, 4]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(dense / "base").eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()(ids).logits
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("change,message", [
    ({"experts_per_token": 4}, r"bad.yaml: experts_per_token: 4 is more than the 3 experts"),
    ({"gate_mode": "hidden", "experts": [{"source_model": "x", "positive_prompts": ["a"]},
                                         {"source_model": "y", "positive_prompts": ["a"]}]},
     "experts: every expert has the same prompts, so every router row is the same"),
    ({"shared_experts": []}, "shared_experts: Extra inputs are not permitted"),
    ({"base_model": "/nonexistent"}, "base_model: /nonexistent is not a local checkpoint directory"),
])
def test_bad_moe_configs_are_refused_by_name_and_nothing_is_written(dense, tmp_path, change, message):
    cfg = _config(dense, tmp_path / "bad.yaml", **change)
    with pytest.raises(MergeError, match=message):
        build_moe(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
