"""mergekit's own example configs run unchanged through ``mergeflow merge``: their hub ids replaced by tiny
local Llamas (built here, with as many layers as the config's layer ranges reach), everything else as
mergekit ships it. Each output loads with ``from_pretrained`` and has the layers the config asks for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from pipeline.cli import main

EXAMPLES = Path(__file__).parent / "data" / "mergekit" / "examples"
FILES = sorted(EXAMPLES.glob("*.yml"))


def model_refs(cfg: dict) -> tuple[list[str], int]:
    """The config's model references in order of appearance, and the layer count its ranges need."""
    refs, layers = [], 2
    for entry in cfg.get("models") or []:
        refs.append(entry["model"])
    for sl in cfg.get("slices") or []:
        for src in sl["sources"]:
            refs.append(src["model"])
            layers = max(layers, src["layer_range"][1])
    if cfg.get("base_model"):
        refs.append(cfg["base_model"])
    return list(dict.fromkeys(refs)), layers


def tiny_llama(path: Path, layers: int, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=32, tie_word_embeddings=False, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("example", FILES, ids=[f.stem for f in FILES])
def test_mergekits_example_runs_unchanged(example, tmp_path):
    text = example.read_text()
    cfg = yaml.safe_load(text)
    refs, layers = model_refs(cfg)
    for i, ref in enumerate(sorted(refs, key=len, reverse=True)):  # longest first: no ref is part of another's path
        text = text.replace(ref, str(tiny_llama(tmp_path / f"model{i}", layers, seed=i)))
    (tmp_path / example.name).write_text(text)
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", str(tmp_path / example.name), str(out), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["method"] == cfg["merge_method"]
    model = AutoModelForCausalLM.from_pretrained(out)
    want_layers = sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0]
                      for s in cfg["slices"]) if cfg["merge_method"] == "passthrough" else layers
    assert model.config.num_hidden_layers == want_layers
    assert model.dtype == {"float16": torch.float16, "bfloat16": torch.bfloat16}[cfg["dtype"]]
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits.float()).all()
