"""The memory estimate of an expert's fine-tune (``operators.memory``) and the check of fractional GPUs that
``mergeflow validate`` makes with it: against the figures measured on an H200, and by hand on a tiny model."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from operators.memory import GIB, estimate_expert_memory, lora_parameters
from operators.tensor_io import TensorReader
from pipeline.spec import FinetuneSpec, LoraSpec, parse_workflow
from tests.helpers import make_tiny_causal_lm, tiny_lm_workflow_dict


def _header_only_llama(d: Path, hidden=2048, layers=16, heads=32, kv_heads=4, inter=5632, vocab=32000) -> Path:
    """A Llama checkpoint of TinyLlama's width and 16 layers (0.84B parameters, the shape gpu_expert_scale.py
    measured) whose safetensors file is sparse: a real header, no bytes of weights on disk."""
    d.mkdir(parents=True)
    kv = hidden // heads * kv_heads
    shapes = {"model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden], "lm_head.weight": [vocab, hidden]}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": [hidden, hidden], p + "self_attn.k_proj.weight": [kv, hidden],
                   p + "self_attn.v_proj.weight": [kv, hidden], p + "self_attn.o_proj.weight": [hidden, hidden],
                   p + "mlp.gate_proj.weight": [inter, hidden], p + "mlp.up_proj.weight": [inter, hidden],
                   p + "mlp.down_proj.weight": [hidden, inter], p + "input_layernorm.weight": [hidden],
                   p + "post_attention_layernorm.weight": [hidden]}
    header, offset = {}, 0
    for k, shape in shapes.items():
        n = 4 * int(__import__("math").prod(shape))
        header[k] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(d / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)  # sparse: the file has its size, not its bytes
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "intermediate_size": inter, "vocab_size": vocab}))
    return d


def test_estimate_matches_what_the_h200_measured(tmp_path):
    """benchmarks/gpu_expert_scale.py on an H200 (batch 16 x 256 tokens, bf16 autocast): 18.95 GiB full,
    12.02 GiB LoRA r 16 on every projection, 5.40 GiB LoRA + gradient checkpointing (docs/lora-and-causal-lm.md)."""
    base = _header_only_llama(tmp_path / "llama")
    every = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    common = {"batch_size": 16, "max_length": 256}
    full = estimate_expert_memory(base, FinetuneSpec(**common))
    lora = estimate_expert_memory(base, FinetuneSpec(mode="lora", lora=LoraSpec(r=16, target_modules=every), **common))
    ckpt = estimate_expert_memory(base, FinetuneSpec(mode="lora", lora=LoraSpec(r=16, target_modules=every),
                                                     gradient_checkpointing=True, **common))
    assert full.parameters == 835_782_656 and lora.trained == 9_175_040  # the benchmark's own counts
    assert full.total / GIB == pytest.approx(18.95, rel=0.02)
    assert lora.total / GIB == pytest.approx(12.02, rel=0.02)
    assert ckpt.total / GIB == pytest.approx(5.40, rel=0.02)
    # FSDP over 4 workers: a quarter of the weights and AdamW state each, a quarter of the batch
    fsdp = estimate_expert_memory(base, FinetuneSpec(**common), workers=4, strategy="fsdp")
    assert fsdp.parts["weights"] == pytest.approx(full.parts["weights"] / 4)
    assert fsdp.parts["gradients + AdamW"] == pytest.approx(full.parts["gradients + AdamW"] / 4)
    assert fsdp.parts["activations"] == pytest.approx(full.parts["activations"] / 4)
    # DDP: every worker a full copy, and gradient buckets besides
    ddp = estimate_expert_memory(base, FinetuneSpec(**common), workers=4, strategy="ddp")
    assert ddp.parts["gradients + AdamW"] == pytest.approx(16.0 * full.parameters)


def test_lora_parameters_are_peft_s_trainable_count(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = make_tiny_causal_lm(tmp_path / "lm")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with TensorReader(base) as reader:
        assert lora_parameters(reader, ["q_proj", "v_proj", "down_proj"], 4) == trainable


def test_validate_refuses_a_gpu_share_too_small_and_names_the_fix(tmp_path):
    from pipeline.driver import PreflightError, preflight

    base = make_tiny_causal_lm(tmp_path / "lm")
    lines: list[str] = []
    ok = parse_workflow(tiny_lm_workflow_dict(tmp_path, base, resources={"num_gpus": 0.25, "gpu_memory_gb": 80}))
    preflight(ok, lines.append)
    assert any(line.startswith("memory vowel: about ") and "GiB per worker" in line for line in lines), lines
    small = parse_workflow(tiny_lm_workflow_dict(tmp_path, base, resources={"num_gpus": 0.25, "gpu_memory_gb": 1}))
    with pytest.raises(PreflightError) as err:
        preflight(small, lambda _m: None)
    text = str(err.value)
    assert "resources.num_gpus: 0.25 gives each expert 0.2 GiB of a 1 GiB GPU" in text
    assert "raise num_gpus to" in text and "gradient_checkpointing" in text
