"""`mergeflow merge` with mergekit configs: the same tensors as real mergekit 0.1.5, and every
unsupported key, parameter or method refused by name.

The expected outputs in tests/data/mergekit/expected were written by mergekit 0.1.5 itself from
the stored tiny Llama inputs (tests/data/mergekit/make_golden.py regenerates them).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from operators.errors import MergeError
from operators.merge.engine import merge_checkpoints
from operators.merge.merge_config import MergeConfigError, load_merge_config, parse_merge_config
from operators.merge.passthrough import stack_layers
from operators.tensor_io import load_state_dict
from pipeline.cli import main

DATA = Path(__file__).parent / "data" / "mergekit"
MODELS = ("base", "e0", "e1", "e2", "d_base", "d0", "d1", "d2",  # d_*: five layers, for gradients
          "t_base", "t0", "t1", "t2")  # t_*: character tokenizers, t0 and t1 with tokens of their own
CONFIGS = sorted((DATA / "configs").glob("*.yaml"))


def filled(cfg: Path, tmp_path: Path) -> Path:
    out = tmp_path / cfg.name
    out.write_text(string.Template(cfg.read_text()).substitute({m: str(DATA / "models" / m) for m in MODELS}))
    return out


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_same_tensors_as_mergekit(cfg, tmp_path):
    from operators.merge.vocab import plan_vocab

    plan = load_merge_config(filled(cfg, tmp_path))
    assert plan.source_format == "mergekit"
    if plan.method == "passthrough":
        stack_layers(plan.slices, tmp_path / "out", out_dtype=plan.out_dtype)
    else:
        vocab = None if plan.tokenizer_source is None else plan_vocab(plan.base, plan.experts, plan.tokenizer_source,
                                                                       plan.pad_to_multiple_of)
        merge_checkpoints(plan.base, plan.experts, plan.method, plan.params, tmp_path / "out", out_dtype=plan.out_dtype,
                          tensor_params=plan.tensor_params, vocab=vocab)
    got = load_state_dict(tmp_path / "out")
    want = load_file(DATA / "expected" / f"{cfg.stem}.safetensors")
    assert sorted(got) == sorted(want)
    vocab_file = DATA / "expected" / f"{cfg.stem}.vocab.json"
    if vocab_file.is_file():  # a merge of vocabularies: the same tokens, each token's rows compared by token
        from transformers import AutoTokenizer

        want_vocab = json.loads(vocab_file.read_text())
        got_vocab = AutoTokenizer.from_pretrained(str(tmp_path / "out")).get_vocab()
        assert got_vocab.keys() == want_vocab.keys()
        assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == want["lm_head.weight"].shape[0]
        order = sorted(want_vocab)
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            assert got[k].shape == want[k].shape, k
            g, w = got[k][[got_vocab[t] for t in order]], want[k][[want_vocab[t] for t in order]]
            assert torch.allclose(g, w, rtol=1e-5, atol=1e-6), f"{cfg.stem}: {k} differs by {float((g - w).abs().max())}"
            n = len(order)  # padding rows past the vocabulary: the mean of the rows
            assert torch.allclose(got[k][n:], want[k][n:], rtol=1e-5, atol=1e-6)
            got[k], want[k] = g, w
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        diff = float((got[k].float() - want[k].float()).abs().max())
        assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6), f"{cfg.stem}: {k} differs by {diff}"
    # and the merge really changed something (not a copy of an input)
    text = cfg.read_text()
    base = load_state_dict(DATA / "models" / ("d_base" if "$d" in text else "t_base" if "$t" in text else "base"))
    assert any(not torch.equal(got[k], base[k]) for k in base if got[k].shape == base[k].shape)


def test_cli_merge_with_a_mergekit_config_prints_a_json_summary(tmp_path):
    cfg = filled(DATA / "configs" / "ties.yaml", tmp_path)
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", str(cfg), str(out), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["method"] == "ties" and summary["config_format"] == "mergekit"
    assert summary["tensors"] == len(load_state_dict(DATA / "models" / "base"))
    body = sum(t.numel() * t.element_size() for t in load_state_dict(out).values())
    assert summary["bytes_read"] == 4 * body  # the base and three experts, each read once
    assert body < summary["bytes_written"] < body + 4096  # the body plus the safetensors header
    assert summary["peak_rss_bytes"] > 10 * 2**20 and summary["seconds"] > 0
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(out)
    assert model.config.hidden_size == 16
    provenance = json.loads((out / "mergeflow.json").read_text())
    assert provenance["method"] == "ties" and provenance["config_format"] == "mergekit"


def test_cli_merge_with_a_mergeflow_config(tmp_path, tiny_base, tiny_experts):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"base: {tiny_base}\nexperts:\n  vowel: {tiny_experts['vowel']}\n  length: {tiny_experts['length']}\n"
                   "method: consensus\nparams: {k: 1, scaling: 0.5}\n")
    result = CliRunner().invoke(main, ["merge", str(cfg), str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "merged 2 models with consensus" in result.output
    assert json.loads((tmp_path / "out" / "mergeflow.json").read_text())["params"]["k"] == 1


BASE_CFG = {"merge_method": "ties", "base_model": str(DATA / "models" / "base"),
            "models": [{"model": str(DATA / "models" / "e0"), "parameters": {"weight": 1.0, "density": 0.5}}]}


def edit(**changes):
    cfg = json.loads(json.dumps(BASE_CFG))
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    return cfg


REFUSED = [
    ("unsupported method", edit(merge_method="ram"),
     "merge_method: 'ram' is not supported by mergeflow; supported mergekit methods: arcee_fusion, breadcrumbs, "),
    ("no slice", edit(slices=[]), "slices: mergeflow merges one slice that covers every source's whole model (got 0 "),
    ("part of the layers", {**edit(models=None), "slices": [{"sources": [
        {"model": str(DATA / "models" / m), "layer_range": [0, 1], "parameters": {"weight": 1.0}} for m in ("e0", "e1")]}]},
     "slices[0].sources[0].layer_range: [0, 1] is not the model's whole range [0, 2]; mergeflow merges whole models"),
    ("unknown top-level key", edit(foo=1), "foo: not a mergekit config key mergeflow knows"),
    ("filter entry without value", edit(parameters={"lambda": [{"filter": "mlp"}, {"value": 0.5}]}),
     "parameters.lambda[0]: {'filter': 'mlp'} is not a {filter: NAME_PART, value: …} entry"),
    ("empty gradient", edit(parameters={"lambda": []}), "parameters.lambda: [] is not a value, a gradient"),
    ("a density gradient leaving (0, 1]", edit(models=[{"model": str(DATA / "models" / "e0"),
                                                       "parameters": {"weight": 1.0, "density": [1.0, 0.0]}}]),
     "tensor 'model.layers.1.input_layernorm.weight': models[0].parameters.density: must be in (0, 1]"),
    ("parameter of another method", edit(parameters={"gamma": 0.1}),
     "parameters.gamma: not a parameter of mergekit's ties (its parameters: density, int8_mask, lambda, normalize, "
     "rescale, weight)"),
    ("missing weight", edit(models=[{"model": str(DATA / "models" / "e0")}]),
     "models[0].parameters.weight: required by mergekit's ties"),
    ("hub id", edit(models=[{"model": "meta-llama/Llama-3-8B", "parameters": {"weight": 1}}]),
     "models[0].model: 'meta-llama/Llama-3-8B' is not a local checkpoint directory (a Hugging Face hub id? "),
    ("lora", edit(models=[{"model": str(DATA / "models" / "e0") + "@adapter"}]), "applies a LoRA (model@lora)"),
    ("per-token embedding sources", edit(tokenizer={"source": "union", "tokens": {"<x>": {"source": "base"}}}),
     "tokenizer.tokens: per-token embedding sources are not supported by mergeflow"),
    ("tokenizer of no model", edit(tokenizer_source=str(DATA / "models" / "e2")),
     "tokenizer_source: '" + str(DATA / "models" / "e2") + "' is none of the config's models"),
    ("density out of range", edit(models=[{"model": str(DATA / "models" / "e0"),
                                           "parameters": {"weight": 1.0, "density": 1.5}}]),
     "models[0].parameters.density: must be in (0, 1], the fraction of the task vector kept (got 1.5)"),
    ("negative weight", edit(models=[{"model": str(DATA / "models" / "e0"), "parameters": {"weight": -1.0}}]),
     "params.weights: negative weights are not allowed for 'ties' (got {'e0': -1.0})"),
    ("bad dtype", edit(dtype="int4"), "dtype: 'int4' is not a supported dtype"),
    ("no base for ties", edit(base_model=None), "base_model: required by mergekit's ties"),
    ("slerp with two others", {"merge_method": "slerp", "base_model": str(DATA / "models" / "base"),
                               "models": [{"model": str(DATA / "models" / m)} for m in ("e0", "e1")],
                               "parameters": {"t": 0.5}},
     "models: slerp takes the base_model and exactly one other model (got 2 others)"),
]


@pytest.mark.parametrize("cfg,message", [(c, m) for _, c, m in REFUSED], ids=[r[0] for r in REFUSED])
def test_unsupported_mergekit_configs_are_refused_by_name(cfg, message):
    with pytest.raises(MergeConfigError) as info:
        parse_merge_config(cfg)
    assert message in str(info.value)


def test_cli_exits_2_on_a_bad_config_and_writes_nothing(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("merge_method: ram\nmodels: []\n")
    result = CliRunner().invoke(main, ["merge", str(cfg), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "merge_method: 'ram' is not supported by mergeflow" in result.output
    assert not (tmp_path / "out").exists()


def test_a_passthrough_stack_loads_with_transformers_and_generates(tmp_path):
    """Layers 0-1 of e0 then layer 1 of e1: a 3-layer model, its config saying so, loaded by from_pretrained;
    run through the CLI as a mergekit user would."""
    from transformers import AutoModelForCausalLM

    cfg = filled(DATA / "configs" / "passthrough_slices.yaml", tmp_path)
    result = CliRunner().invoke(main, ["merge", str(cfg), str(tmp_path / "out"), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["method"] == "passthrough" and summary["tensors"] == 30
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(model.model.layers) == 3
    e1 = load_state_dict(DATA / "models" / "e1")
    assert torch.equal(model.model.layers[2].self_attn.q_proj.weight, e1["model.layers.1.self_attn.q_proj.weight"])
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    prov = json.loads((tmp_path / "out" / "mergeflow.json").read_text())
    assert prov["method"] == "passthrough" and prov["layers"] == 3


@pytest.mark.parametrize("slices,message", [
    ([{"sources": [{"model": "$e0", "layer_range": [0, 3]}]}], r"slices\[0\].layer_range: \[0, 3\] is not a non-empty "
                                                              r"range of .*'s 2 layers"),
    ([{"sources": [{"model": "$e0", "layer_range": [0, 1]}, {"model": "$e1", "layer_range": [0, 1]}]}],
     r"slices\[0\].sources: passthrough takes slices \(not models too\) of exactly one source each"),
    ([{"sources": [{"model": "$e0", "layer_range": [0, 1], "parameters": {"weight": 1}}]}],
     r"slices\[0\].sources\[0\].parameters.weight: not a parameter of mergekit's passthrough"),
])
def test_bad_slices_are_refused_by_name_and_nothing_is_written(tmp_path, slices, message):
    text = json.dumps({"merge_method": "passthrough", "slices": slices, "dtype": "float32"})
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(string.Template(text).substitute({m: str(DATA / "models" / m) for m in MODELS}))
    with pytest.raises((MergeConfigError, MergeError), match=message):
        plan = load_merge_config(cfg)
        stack_layers(plan.slices, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_slices_of_models_of_different_shapes_are_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from operators.merge.passthrough import LayerSlice

    LlamaForCausalLM(LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=2, vocab_size=32)).save_pretrained(tmp_path / "small")
    slices = [LayerSlice(DATA / "models" / "e0", 0, 2), LayerSlice(tmp_path / "small", 0, 1)]
    with pytest.raises(MergeError, match=r"slices\[1\]: .*small has hidden_size 8, slices\[0\]'s model 16; layers "
                                         r"stack only between models of one shape"):
        stack_layers(slices, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["multislerp", "nuslerp", "multislerp_nobase", "nuslerp_rows_nobase", "sce", "sce_all",
                                  "karcher", "karcher_base", "arcee_fusion", "arcee_fusion_deep"])
def test_whole_tensor_merges_in_row_blocks_give_mergekits_tensors(name, tmp_path):
    """Large tensors of Multi-SLERP, NuSLERP, SCE, Karcher and Arcee Fusion are merged in row blocks after passes
    for what they need of the whole tensor (norms and dots; the variance threshold and η; the models' Gram matrix;
    the importance's fence), here blocks of 64 elements, so every matrix comes in pieces: still mergekit's
    tensors."""
    plan = load_merge_config(filled(DATA / "configs" / f"{name}.yaml", tmp_path))
    merge_checkpoints(plan.base, plan.experts, plan.method, plan.params, tmp_path / "out", chunk_elements=64)
    got = load_state_dict(tmp_path / "out")
    want = load_file(DATA / "expected" / f"{name}.safetensors")
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6), k
