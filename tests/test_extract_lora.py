"""``mergeflow extract-lora``: a peft adapter of a full fine-tune's ΔW, checked on a tiny Llama whose
fine-tune is known to be low-rank: the adapter reproduces it exactly, loads with peft, and its errors
are the truncated SVD's (Eckart–Young) worked out from the singular values."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from operators.errors import MergeError
from operators.extract_lora import choose_rank, extract_lora
from pipeline.cli import main


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """A tiny Llama base, and a fine-tune whose q_proj and v_proj moved by rank-2 updates (everything else as is)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("extract")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=64, tie_word_embeddings=False, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(root / "base", safe_serialization=True)
    sd = load_file(root / "base" / "model.safetensors")
    g = torch.Generator().manual_seed(1)
    deltas = {}
    for k, v in sd.items():
        if k.endswith(("q_proj.weight", "v_proj.weight")):
            deltas[k] = (torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v.shape[1], generator=g)) * 0.05
    (root / "ft").mkdir()
    save_file({k: (v + deltas.get(k, 0)).contiguous() for k, v in sd.items()}, root / "ft" / "model.safetensors",
              metadata={"format": "pt"})
    shutil.copy2(root / "base" / "config.json", root / "ft" / "config.json")
    return root, deltas


def test_a_rank_2_fine_tune_comes_back_exactly_and_loads_with_peft(llama_pair, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, deltas = llama_pair
    report = extract_lora(root / "ft", root / "base", tmp_path / "lora", rank=2)
    assert sorted(report.modules) == sorted(k.removesuffix(".weight") for k in deltas)
    assert report.error < 1e-6 and all(m["rank"] == 2 for m in report.modules.values())
    assert report.unchanged > 0 and not report.skipped
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 2 and cfg["peft_type"] == "LORA"
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    ft = AutoModelForCausalLM.from_pretrained(root / "ft").eval()
    base = AutoModelForCausalLM.from_pretrained(root / "base").eval()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(ids).logits, ft(ids).logits, atol=1e-5)
        merged = peft_model.merge_and_unload()
        for k in deltas:
            w = merged.get_parameter(k)
            assert torch.allclose(w, load_file(root / "ft" / "model.safetensors")[k], atol=1e-6), k


def test_rank_1_keeps_the_top_singular_direction_with_the_eckart_young_error(llama_pair, tmp_path):
    root, deltas = llama_pair
    report = extract_lora(root / "ft", root / "base", tmp_path / "lora", rank=1)
    for k, d in deltas.items():
        s = torch.linalg.svdvals(d.double())
        want = float(s[1:].square().sum().sqrt() / s.square().sum().sqrt())  # ‖ΔW − ΔW_1‖ / ‖ΔW‖
        assert report.modules[k.removesuffix(".weight")]["error"] == pytest.approx(want, rel=1e-4)
    assert report.worst_error == max(m["error"] for m in report.modules.values())


def test_energy_picks_each_modules_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # σ² = 9, 4, 1, 0 of 14: cumulative 0.643, 0.929, 1.0
    assert [choose_rank(s, None, e, None) for e in (0.5, 0.9, 0.95, 1.0)] == [1, 2, 3, 3]
    assert choose_rank(s, None, 0.95, 2) == 2 and choose_rank(s, 8, None, None) == 4


def test_energy_mode_through_the_cli_writes_per_module_ranks(llama_pair, tmp_path):
    root, _ = llama_pair
    result = CliRunner().invoke(main, ["extract-lora", str(root / "ft"), str(root / "base"), str(tmp_path / "lora"),
                                       "--energy", "0.9999", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert {m["rank"] for m in report["modules"].values()} == {2} and report["error"] < 1e-3
    prov = json.loads((tmp_path / "lora" / "mergeflow.json").read_text())
    assert prov["kind"] == "extracted_lora" and prov["energy"] == 0.9999


def test_changes_a_lora_cannot_hold_are_refused_by_name_or_dropped_and_listed(llama_pair, tmp_path):
    root, _ = llama_pair
    ft2 = tmp_path / "ft2"
    shutil.copytree(root / "ft", ft2)
    sd = load_file(ft2 / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"] + 0.1
    save_file(sd, ft2 / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeError, match=r"model.norm.weight: the fine-tune changed it, and a LoRA adapter holds "
                                         r"linear layers only; pass --skip-other"):
        extract_lora(ft2, root / "base", tmp_path / "out", rank=2)
    assert not (tmp_path / "out").exists()
    report = extract_lora(ft2, root / "base", tmp_path / "out", rank=2, skip_other=True)
    assert report.skipped == ["model.norm.weight"]
    with pytest.raises(MergeError, match="nothing to extract"):
        extract_lora(root / "base", root / "base", tmp_path / "none", rank=2)
    with pytest.raises(MergeError, match="give --rank R"):
        extract_lora(root / "ft", root / "base", tmp_path / "x", rank=2, energy=0.9)


def test_per_module_ranks_by_energy_load_with_peft(llama_pair, tmp_path):
    """q_proj moved by a rank-1 update, v_proj by a rank-3 one: --energy gives each its own rank (peft's
    rank_pattern), and the adapter still reproduces the fine-tune."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, _ = llama_pair
    sd = load_file(root / "base" / "model.safetensors")
    g = torch.Generator().manual_seed(5)
    ft = {}
    for k, v in sd.items():
        r = 1 if k.endswith("q_proj.weight") else 3 if k.endswith("v_proj.weight") else 0
        ft[k] = v + (torch.randn(v.shape[0], r, generator=g) @ torch.randn(r, v.shape[1], generator=g)) * 0.05 if r else v
    (tmp_path / "ft").mkdir()
    save_file({k: v.contiguous() for k, v in ft.items()}, tmp_path / "ft" / "model.safetensors", metadata={"format": "pt"})
    shutil.copy2(root / "base" / "config.json", tmp_path / "ft" / "config.json")
    report = extract_lora(tmp_path / "ft", root / "base", tmp_path / "lora", energy=0.999999)
    ranks = {m: v["rank"] for m, v in report.modules.items()}
    assert {r for m, r in ranks.items() if m.endswith("q_proj")} == {1}
    assert {r for m, r in ranks.items() if m.endswith("v_proj")} == {3}
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and set(cfg["rank_pattern"].values()) == {1} and cfg["alpha_pattern"] == cfg["rank_pattern"]
    ids = torch.tensor([[2, 4, 6, 8]])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), tmp_path / "lora").eval()
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tmp_path / "ft").eval()(ids).logits
        assert torch.allclose(model(ids).logits, want, atol=1e-5)


def test_gpt2_conv1d_layers_are_factored_transposed_with_fan_in_fan_out(tmp_path):
    """GPT-2 stores its linear layers as Conv1D, (in, out): the adapter must say fan_in_fan_out and hold
    B (out, r), A (r, in), or peft applies the transpose of the update."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)).save_pretrained(
        tmp_path / "base", safe_serialization=True)
    sd = load_file(tmp_path / "base" / "model.safetensors")
    g = torch.Generator().manual_seed(2)
    for k in [k for k in sd if k.endswith(("attn.c_attn.weight", "attn.c_proj.weight"))]:
        sd[k] = sd[k] + (torch.randn(sd[k].shape[0], 2, generator=g) @ torch.randn(2, sd[k].shape[1], generator=g)) * 0.05
    (tmp_path / "ft").mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "ft" / "model.safetensors", metadata={"format": "pt"})
    shutil.copy2(tmp_path / "base" / "config.json", tmp_path / "ft" / "config.json")
    report = extract_lora(tmp_path / "ft", tmp_path / "base", tmp_path / "lora", rank=2)
    assert report.error < 1e-6 and len(report.modules) == 4
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "lora").eval()
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tmp_path / "ft").eval()(ids).logits
        assert torch.allclose(model(ids).logits, want, atol=1e-5)
