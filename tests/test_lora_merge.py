"""Merging LoRA experts: exact ΔW merges equal merging the fully fine-tuned weights, and adapter-mode
outputs load with peft and match the exact merge within the error they report.

Tiny random-config Llama (hidden 32, 2 layers) and GPT-2 models are built in-process; adapters are
made with peft's ``get_peft_model`` and given random A and B (peft starts B at zero). The fully
fine-tuned weights are computed here by hand: W + B @ A · scaling, with each scaling written out.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from operators.lora import LoraDeltaReader, is_adapter_dir, read_adapter
from operators.merge.engine import MergeError, merge_checkpoints
from operators.tensor_io import CheckpointError, load_state_dict

peft = pytest.importorskip("peft")

PREFIX = "base_model.model."


def _llama_config(hidden: int = 32):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def _save_model(model, directory: Path) -> Path:
    model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def llama_base(root) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return _save_model(LlamaForCausalLM(_llama_config()), root / "llama")


@pytest.fixture(scope="module")
def gpt2_base(root) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    return _save_model(GPT2LMHeadModel(cfg), root / "gpt2")


def make_adapter(base: Path, out: Path, seed: int, model_cls=None, **lora) -> Path:
    """A peft adapter over ``base`` with random nonzero A and B (std 0.1), saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = (model_cls or LlamaForCausalLM).from_pretrained(str(base))
    lora.setdefault("task_type", "CAUSAL_LM")
    pm = get_peft_model(model, LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(str(out))
    return out


def hand_full_weights(base: Path, adapter: Path, scalings: dict[str, float], fan_in_fan_out: bool = False,
                      strip: str = "") -> dict[str, torch.Tensor]:
    """W + B @ A · scaling for every adapted module (scalings: module suffix → value, worked out by hand)."""
    weights = load_state_dict(base)
    ab = load_file(str(adapter / "adapter_model.safetensors"))
    for key in ab:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        a, b = ab[key], ab[key.replace("lora_A", "lora_B")]
        s = next(v for k, v in scalings.items() if module.endswith(k))
        delta = (b @ a) * s
        target = module.removeprefix(strip) + ".weight"
        weights[target] = weights[target] + (delta.T if fan_in_fan_out else delta)
    return weights


def write_full_expert(base: Path, weights: dict[str, torch.Tensor], out: Path) -> Path:
    out.mkdir(parents=True)
    shutil.copy2(base / "config.json", out / "config.json")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# expert "qv": r 4, alpha 8 → scaling 8/4 = 2.0 on q_proj, v_proj
# expert "qko": r 8, alpha 16, rsLoRA → scaling 16/√8 on q_proj, k_proj, o_proj (other modules, other rank)
QV_SCALING = {"q_proj": 2.0, "v_proj": 2.0}
QKO_SCALING = {p: 16 / math.sqrt(8) for p in ("q_proj", "k_proj", "o_proj")}


@pytest.fixture(scope="module")
def llama_adapters(root, llama_base) -> dict[str, Path]:
    return {
        "qv": make_adapter(llama_base, root / "qv", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "qko": make_adapter(llama_base, root / "qko", 2, r=8, lora_alpha=16, use_rslora=True,
                            target_modules=["q_proj", "k_proj", "o_proj"]),
    }


@pytest.fixture(scope="module")
def llama_full_experts(root, llama_base, llama_adapters) -> dict[str, Path]:
    return {
        "qv": write_full_expert(llama_base, hand_full_weights(llama_base, llama_adapters["qv"], QV_SCALING),
                                root / "full-qv"),
        "qko": write_full_expert(llama_base, hand_full_weights(llama_base, llama_adapters["qko"], QKO_SCALING),
                                 root / "full-qko"),
    }


def _logits(model_dir_or_model, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = model_dir_or_model if not isinstance(model_dir_or_model, (str, Path)) else \
        AutoModelForCausalLM.from_pretrained(str(model_dir_or_model))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 5, 9, 13, 2, 40, 63, 7, 22, 31]])


# ---------------------------------------------------------------- the ΔW reader


def test_reader_presents_base_plus_hand_computed_delta(llama_base, llama_adapters):
    assert is_adapter_dir(llama_adapters["qko"]) and not is_adapter_dir(llama_base)
    expected = hand_full_weights(llama_base, llama_adapters["qko"], QKO_SCALING)
    base = load_state_dict(llama_base)
    with LoraDeltaReader(llama_adapters["qko"], llama_base) as r:
        assert sorted(r.keys()) == sorted(base)
        assert len(r.targets) == 6 and "model.layers.1.self_attn.o_proj.weight" in r.targets
        for key in r.keys():
            got = r.get(key)
            assert got.dtype == base[key].dtype and tuple(got.shape) == tuple(base[key].shape)
            # one tile covers these small tensors: the same float32 operations as by hand, bitwise
            assert torch.equal(got, expected[key]), key
            # any split into element ranges (not row-aligned) gives the same values
            n = r.numel(key)
            pieces = torch.cat([r.get_flat(key, s, min(n, s + 77)) for s in range(0, n, 77)])
            assert torch.equal(pieces, got.reshape(-1)), key
        assert not torch.equal(r.get("model.layers.0.self_attn.k_proj.weight"), base["model.layers.0.self_attn.k_proj.weight"])
        assert torch.equal(r.get("model.layers.0.self_attn.v_proj.weight"), base["model.layers.0.self_attn.v_proj.weight"])


def test_reader_tiles_large_tensors_independently_of_the_split(llama_base, llama_adapters, monkeypatch):
    import operators.lora as lora

    monkeypatch.setattr(lora, "DELTA_TILE_ELEMENTS", 96)  # 3 rows of 32 per tile
    expected = hand_full_weights(llama_base, llama_adapters["qv"], QV_SCALING)
    with LoraDeltaReader(llama_adapters["qv"], llama_base) as r:
        key = "model.layers.0.self_attn.q_proj.weight"
        whole = r.get(key)
        for step in (5, 32, 100):
            n = r.numel(key)
            assert torch.equal(torch.cat([r.get_flat(key, s, min(n, s + step)) for s in range(0, n, step)]),
                               whole.reshape(-1))
        # tiles and the whole matmul may round differently: float32 rounding of |ΔW| ~ 0.1 values
        torch.testing.assert_close(whole, expected[key], rtol=0, atol=1e-6)


def test_rank_and_alpha_patterns_scale_as_peft_does(root, llama_base):
    # layer 0 q_proj: r 2 (rank_pattern), alpha 8 (alpha_pattern 'q_proj') → 8/2 = 4.0
    # layer 1 q_proj: r 4, alpha 8 → 2.0;   v_proj: r 4, alpha 4 → 1.0
    ad = make_adapter(llama_base, root / "patterns", 3, r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                      rank_pattern={"model.layers.0.self_attn.q_proj": 2}, alpha_pattern={"q_proj": 8})
    adapter = read_adapter(ad)
    assert adapter.modules["model.layers.0.self_attn.q_proj"].rank == 2
    assert {n: m.scaling for n, m in adapter.modules.items()} == {
        "model.layers.0.self_attn.q_proj": 4.0, "model.layers.1.self_attn.q_proj": 2.0,
        "model.layers.0.self_attn.v_proj": 1.0, "model.layers.1.self_attn.v_proj": 1.0}
    # and peft agrees: its merge_and_unload gives the reader's weights
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(llama_base)), str(ad)).merge_and_unload()
    sd = merged.state_dict()
    with LoraDeltaReader(ad, llama_base) as r:
        for key in r.targets:
            torch.testing.assert_close(r.get(key), sd[key], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- exact mode


# TIES per tensor here: with chunk_elements small, large tensors merge in row blocks after a whole-tensor
# statistics pass that reads each expert through get(); TIES' whole-model top-k (scope: model, a
# streaming prepare pass over the readers) is covered by test_mixed_full_and_lora_experts_merge_exactly
@pytest.mark.parametrize(("method", "params"), [("task_arithmetic", {"scaling": 0.7}),
                                                ("ties", {"density": 0.5, "scaling": 1.0, "scope": "tensor"})])
def test_exact_merge_equals_merging_the_full_fine_tuned_weights(root, llama_base, llama_adapters, llama_full_experts,
                                                                method, params):
    out_lora, out_full = root / f"exact-{method}", root / f"full-{method}"
    report = merge_checkpoints(llama_base, llama_adapters, method, params, out_lora, chunk_elements=1024)
    merge_checkpoints(llama_base, llama_full_experts, method, params, out_full, chunk_elements=1024)
    got, want = load_state_dict(out_lora), load_state_dict(out_full)
    assert sorted(got) == sorted(want)
    for key in want:  # bitwise: the reader gives exactly the hand-computed full weights
        assert torch.equal(got[key], want[key]), key
    assert report.lora_mode == "exact" and report.adapter_error is None
    prov = json.loads((out_lora / "mergeflow.json").read_text())
    assert prov["lora"]["mode"] == "exact" and prov["lora"]["adapters"]["qko"]["ranks"] == [8]
    assert prov["lora"]["adapters"]["qko"]["use_rslora"] is True
    if method == "task_arithmetic":  # and by the formula: W + 0.7 (ΔW_qv + ΔW_qko)
        base = load_state_dict(llama_base)
        qv = hand_full_weights(llama_base, llama_adapters["qv"], QV_SCALING)
        qko = hand_full_weights(llama_base, llama_adapters["qko"], QKO_SCALING)
        for key in base:
            expect = base[key] + 0.7 * ((qv[key] - base[key]) + (qko[key] - base[key]))
            torch.testing.assert_close(got[key], expect, rtol=0, atol=1e-6)
        k = "model.layers.0.self_attn.k_proj.weight"  # only qko targets k_proj: qv's task vector there is 0
        torch.testing.assert_close(got[k] - base[k], 0.7 * (qko[k] - base[k]), rtol=0, atol=1e-6)
        assert torch.equal(got["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_gpt2_fan_in_fan_out_exact_merge(root, gpt2_base):
    from transformers import GPT2LMHeadModel

    # r 3, alpha 6 → 2.0; Conv1D weights are (in, out): ΔW = (B @ A)ᵀ · 2.0
    ads = {f"g{i}": make_adapter(gpt2_base, root / f"g{i}", 10 + i, model_cls=GPT2LMHeadModel, r=3, lora_alpha=6,
                                 fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"]) for i in range(2)}
    base = load_state_dict(gpt2_base)
    out = root / "gpt2-exact"
    merge_checkpoints(gpt2_base, ads, "task_arithmetic", {"scaling": 0.5}, out)
    got = load_state_dict(out)
    full = {n: hand_full_weights(gpt2_base, p, {"c_attn": 2.0, "c_proj": 2.0, "c_fc": 2.0}, fan_in_fan_out=True)
            for n, p in ads.items()}
    key = "transformer.h.1.attn.c_attn.weight"
    assert tuple(got[key].shape) == (32, 96)
    for k in base:
        expect = base[k] + 0.5 * sum(full[n][k] - base[k] for n in ads)
        torch.testing.assert_close(got[k], expect, rtol=0, atol=1e-6)
    assert not torch.equal(got[key], base[key])


# ---------------------------------------------------------------- adapter mode


def _peft_model(base: Path, adapter: Path, cls=None):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    return PeftModel.from_pretrained((cls or LlamaForCausalLM).from_pretrained(str(base)), str(adapter))


def test_adapter_concat_task_arithmetic_loads_with_peft_and_matches_the_exact_merge(root, llama_base, llama_adapters):
    exact, out = root / "ta-exact-for-concat", root / "ta-concat"
    merge_checkpoints(llama_base, llama_adapters, "task_arithmetic", {"scaling": 0.7}, exact)
    report = merge_checkpoints(llama_base, llama_adapters, "task_arithmetic", {"scaling": 0.7}, out,
                               lora_mode="adapter", adapter_factorization="concat")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "mergeflow.json"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    # q_proj carries both experts (4 + 8 = 12); k, v, o one each (zero-padded to 12)
    assert cfg["r"] == 12 and cfg["lora_alpha"] == 12 and cfg["use_rslora"] is False and cfg["task_type"] == "CAUSAL_LM"
    assert len(cfg["target_modules"]) == 8 and "model.layers.0.self_attn.k_proj" in cfg["target_modules"]
    assert report.lora_mode == "adapter" and report.adapter_rank == 12
    assert report.adapter_error < 1e-6 and report.adapter_worst_module_error < 1e-6
    prov = json.loads((out / "mergeflow.json").read_text())
    assert prov["format"] == "peft_adapter" and prov["lora"]["error"] == report.adapter_error
    assert prov["lora"]["factorization"] == "concat" and len(prov["lora"]["module_errors"]) == 8
    torch.testing.assert_close(_logits(_peft_model(llama_base, out), IDS), _logits(exact, IDS), rtol=0, atol=1e-5)


def test_adapter_svd_default_rank_is_exact_for_task_arithmetic(root, llama_base, llama_adapters):
    exact, out = root / "ta-exact-for-svd", root / "ta-svd"
    merge_checkpoints(llama_base, llama_adapters, "task_arithmetic", {"scaling": 0.7}, exact)
    report = merge_checkpoints(llama_base, llama_adapters, "task_arithmetic", {"scaling": 0.7}, out,
                               lora_mode="adapter")
    assert report.adapter_rank == 12 and report.adapter_error < 1e-5  # rank(ΔW) ≤ 4 + 8: SVD loses nothing
    torch.testing.assert_close(_logits(_peft_model(llama_base, out), IDS), _logits(exact, IDS), rtol=0, atol=1e-4)


def test_adapter_svd_low_rank_ties_reports_its_true_error(root, llama_base, llama_adapters):
    exact, out = root / "ties-exact", root / "ties-svd2"
    params = {"density": 0.5, "scaling": 1.0, "scope": "tensor"}
    merge_checkpoints(llama_base, llama_adapters, "ties", params, exact)
    report = merge_checkpoints(llama_base, llama_adapters, "ties", params, out, lora_mode="adapter", adapter_rank=2)
    assert report.adapter_rank == 2 and json.loads((out / "adapter_config.json").read_text())["r"] == 2
    # recompute the error independently: the exact merge's ΔW against peft's own merge of the adapter
    base, merged = load_state_dict(llama_base), load_state_dict(exact)
    folded = _peft_model(llama_base, out).merge_and_unload().state_dict()
    num = den = 0.0
    worst = (0.0, "")
    for key in base:
        d = merged[key] - base[key]
        e = d - (folded[key] - base[key])
        if not key.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
            assert torch.equal(folded[key], base[key]), key  # untargeted tensors are the base's
            assert torch.equal(merged[key], base[key]), key
            continue
        num, den = num + float(e.norm()) ** 2, den + float(d.norm()) ** 2
        worst = max(worst, (float(e.norm() / d.norm()), key.removesuffix(".weight")))
    overall = math.sqrt(num / den)
    assert 0.05 < overall < 0.95, "TIES' ΔW is not rank 2: a real, partial approximation"
    assert report.adapter_error == pytest.approx(overall, rel=1e-3)
    assert report.adapter_worst_module == worst[1]
    assert report.adapter_worst_module_error == pytest.approx(worst[0], rel=1e-3)
    # the forward moves from the base towards the exact merge
    lx, ls, lb = _logits(exact, IDS), _logits(_peft_model(llama_base, out), IDS), _logits(llama_base, IDS)
    assert float((ls - lx).norm()) < float((lb - lx).norm())


def test_adapter_concat_gpt2_fan_in_fan_out(root, gpt2_base):
    from transformers import GPT2LMHeadModel

    ads = {f"c{i}": make_adapter(gpt2_base, root / f"c{i}", 20 + i, model_cls=GPT2LMHeadModel, r=2 + i,
                                 lora_alpha=4, fan_in_fan_out=True, target_modules=["c_attn", "c_proj"])
           for i in range(2)}
    exact, out = root / "gpt2-ta-exact", root / "gpt2-ta-concat"
    merge_checkpoints(gpt2_base, ads, "linear", {}, exact)
    report = merge_checkpoints(gpt2_base, ads, "linear", {}, out, lora_mode="adapter", adapter_factorization="concat")
    assert report.adapter_rank == 5 and report.adapter_error < 1e-6
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    peft_logits = _logits(_peft_model(gpt2_base, out, GPT2LMHeadModel), IDS)
    torch.testing.assert_close(peft_logits, _logits(exact, IDS), rtol=0, atol=1e-5)


def test_bert_classification_adapter_maps_names_and_keeps_heads(root, tiny_base):
    """A mergeflow classification LoRA expert: peft names under ``bert.``, the base is the BertModel body."""
    from transformers import BertForSequenceClassification

    experts = {}
    for i, task in enumerate(("vowel", "length")):
        ad = make_adapter(tiny_base, root / f"bert-{task}", 30 + i, model_cls=BertForSequenceClassification,
                          task_type=None, r=2, lora_alpha=2, target_modules=["query", "value"])
        head = ad / "heads" / task
        head.mkdir(parents=True)
        save_file({"classifier.weight": torch.full((2, 32), float(i))}, str(head / "head.safetensors"))
        (head / "config.json").write_text("{}")
        experts[task] = ad
    out = root / "bert-exact"
    merge_checkpoints(tiny_base, experts, "task_arithmetic", {"scaling": 1.0}, out)
    got, base = load_state_dict(out), load_state_dict(tiny_base)
    for task, ad in experts.items():
        assert (out / "heads" / task / "head.safetensors").read_bytes() == (ad / "heads" / task / "head.safetensors").read_bytes()
    full = {t: hand_full_weights(tiny_base, ad, {"query": 1.0, "value": 1.0}, strip="bert.") for t, ad in experts.items()}
    key = "encoder.layer.1.attention.self.query.weight"
    torch.testing.assert_close(got[key], base[key] + sum(full[t][key] - base[key] for t in experts), rtol=0, atol=1e-6)
    adapter_out = root / "bert-adapter"
    merge_checkpoints(tiny_base, experts, "task_arithmetic", {"scaling": 1.0}, adapter_out, lora_mode="adapter")
    assert sorted(p.name for p in (adapter_out / "heads").iterdir()) == ["length", "vowel"]
    assert (adapter_out / "vocab.txt").is_file(), "tokenizer copied from the base"
    assert "bert.encoder.layer.0.attention.self.query" in json.loads((adapter_out / "adapter_config.json").read_text())["target_modules"]


def test_atm_adapter_base_differs_from_merge_base(root, llama_base, llama_adapters):
    """An adapter trained from a round's start model, merged with task vectors from the original base."""
    start = write_full_expert(llama_base, hand_full_weights(llama_base, llama_adapters["qv"], QV_SCALING),
                              root / "round-start")
    out = root / "atm-exact"
    merge_checkpoints(llama_base, {"qko": llama_adapters["qko"]}, "task_arithmetic", {"scaling": 1.0}, out,
                      adapter_bases={"qko": start})
    got, base, start_w = load_state_dict(out), load_state_dict(llama_base), load_state_dict(start)
    qko = hand_full_weights(llama_base, llama_adapters["qko"], QKO_SCALING)
    for key in base:  # θ = start + ΔW_qko, measured from the original base
        torch.testing.assert_close(got[key], start_w[key] + (qko[key] - base[key]), rtol=0, atol=1e-6)
    with pytest.raises(MergeError, match=r"changes tensor .*no adapter targets.*lora_mode: exact"):
        merge_checkpoints(llama_base, {"qko": llama_adapters["qko"]}, "task_arithmetic", {"scaling": 1.0},
                          root / "atm-adapter", lora_mode="adapter", adapter_bases={"qko": start})


# ---------------------------------------------------------------- refusals


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(ad: Path, **changes) -> Path:
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg.update(changes)
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    return ad


def _refused(exc_type, pattern: str, base: Path, experts: dict[str, Path], out: Path, **kw) -> str:
    with pytest.raises(exc_type, match=pattern) as info:
        merge_checkpoints(base, experts, kw.pop("method", "task_arithmetic"), kw.pop("params", {}), out, **kw)
    msg = str(info.value)
    assert "\n" not in msg, "one-line errors"
    assert not out.exists(), "nothing written"
    return msg


def test_refusals_of_the_adapter_files(root, llama_base, llama_adapters):
    qv = llama_adapters["qv"]
    ad = _copy(qv, root / "no-config")
    (ad / "adapter_config.json").unlink()
    _refused(CheckpointError, r"no-config: no adapter_config\.json.*save it again with peft", llama_base, {"a": ad},
             root / "o1")
    ad = _copy(qv, root / "bin-only")
    (ad / "adapter_model.safetensors").rename(ad / "adapter_model.bin")
    _refused(CheckpointError, r"only adapter_model\.bin \(pickle.*safe_serialization=True", llama_base, {"a": ad},
             root / "o2")
    ad = _copy(qv, root / "truncated")
    raw = (ad / "adapter_model.safetensors").read_bytes()
    (ad / "adapter_model.safetensors").write_bytes(raw[: len(raw) // 2])
    _refused(CheckpointError, r"truncated/adapter_model\.safetensors: cannot read safetensors file .*corrupt or truncated",
             llama_base, {"a": ad}, root / "o2b")
    _refused(CheckpointError, r"use_dora=True: DoRA", llama_base, {"a": _edit_config(_copy(qv, root / "dora"), use_dora=True)},
             root / "o3")
    _refused(CheckpointError, r"bias='lora_only'.*bias='none'", llama_base,
             {"a": _edit_config(_copy(qv, root / "bias"), bias="lora_only")}, root / "o4")
    mts = make_adapter(llama_base, root / "mts", 5, r=2, lora_alpha=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    _refused(CheckpointError, r"lm_head.*modules_to_save copy", llama_base, {"a": mts}, root / "o5")
    emb = make_adapter(llama_base, root / "emb", 6, r=2, lora_alpha=2, target_modules=["embed_tokens"])
    _refused(CheckpointError, r"embed_tokens.*embedding LoRA", llama_base, {"a": emb}, root / "o6")
    feat = _edit_config(_copy(qv, root / "feat"), task_type="FEATURE_EXTRACTION")
    _refused(MergeError, r"'feat' \(task_type='FEATURE_EXTRACTION'\) and 'qko' \(task_type='CAUSAL_LM'\).*same task type", llama_base,
             {"qko": llama_adapters["qko"], "feat": feat}, root / "o7")


def test_refusal_of_an_adapter_for_a_different_base(root, llama_base, gpt2_base, llama_adapters):
    from transformers import LlamaForCausalLM

    torch.manual_seed(2)
    wider = _save_model(LlamaForCausalLM(_llama_config(hidden=48)), root / "llama48")
    msg = _refused(MergeError, r"module 'model\.layers\.0\.self_attn\.(q|v)_proj' has lora_A \[4, 32\] and lora_B "
                   r"\[\d+, 4\].*base tensor .* has shape \[\d+, 48\].*different base", wider,
                   {"qv": llama_adapters["qv"]}, root / "o8")
    assert "Give the base checkpoint it was trained from" in msg
    # another architecture: GPT-2 has no self_attn.q_proj
    _refused(MergeError, r"module 'model\.layers\.0\.self_attn\.q_proj' has no weight in base .*different architecture",
             gpt2_base, {"qv": llama_adapters["qv"]}, root / "o9")


def test_refusals_of_lora_settings(root, llama_base, llama_adapters, llama_full_experts):
    _refused(MergeError, r"'concat' is exact only for linear and task_arithmetic, not 'ties'.*svd", llama_base,
             llama_adapters, root / "o10", method="ties", lora_mode="adapter", adapter_factorization="concat")
    _refused(MergeError, r"expert 'qko' is a full checkpoint.*lora_mode: exact", llama_base,
             {"qv": llama_adapters["qv"], "qko": llama_full_experts["qko"]}, root / "o11", lora_mode="adapter")
    _refused(MergeError, r"adapter_bases: 'qko' is not a LoRA adapter directory", llama_base,
             {"qv": llama_adapters["qv"], "qko": llama_full_experts["qko"]}, root / "o12",
             adapter_bases={"qko": llama_base})
    _refused(MergeError, r"adapter_rank: 0 must be a positive integer", llama_base, llama_adapters, root / "o13",
             lora_mode="adapter", adapter_rank=0)
    _refused(MergeError, r"adapter_rank: 4 applies to lora_mode 'adapter' with svd only", llama_base, llama_adapters,
             root / "o15", lora_mode="adapter", adapter_factorization="concat", adapter_rank=4)
    # linear without normalize scales every weight by Σw = 2: no adapter over the base can hold that
    _refused(MergeError, r"method 'linear' changes tensor '.*', which no adapter targets", llama_base,
             llama_adapters, root / "o14", method="linear", params={"normalize": False}, lora_mode="adapter")


def test_mixed_full_and_lora_experts_merge_exactly(root, llama_base, llama_adapters, llama_full_experts):
    out_mixed, out_full = root / "mixed", root / "mixed-full"
    merge_checkpoints(llama_base, {"qv": llama_adapters["qv"], "qko": llama_full_experts["qko"]}, "ties",
                      {"density": 0.3}, out_mixed)
    merge_checkpoints(llama_base, llama_full_experts, "ties", {"density": 0.3}, out_full)
    got, want = load_state_dict(out_mixed), load_state_dict(out_full)
    assert all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------- mergeflow merge CONFIG


def test_merge_command_with_a_lora_block(root, llama_base, llama_adapters):
    import yaml
    from click.testing import CliRunner

    from operators.merge.merge_config import MergeConfigError, parse_merge_config
    from pipeline.cli import main

    cfg = {"base": str(llama_base), "experts": {n: str(p) for n, p in llama_adapters.items()},
           "method": "task_arithmetic", "params": {"scaling": 0.7},
           "lora": {"mode": "adapter", "factorization": "svd", "rank": 3}}
    path = root / "merge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = root / "cli-adapter"
    res = CliRunner().invoke(main, ["merge", str(path), str(out), "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["lora_mode"] == "adapter" and summary["adapter_rank"] == 3
    assert 0 < summary["adapter_error"] < 1 and summary["adapter_worst_module"].startswith("model.layers.")
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3

    for bad, message in [
        ({"lora": {"mode": "merged"}}, "lora.mode: 'merged' is not one of exact, adapter"),
        ({"lora": {"mode": "adapter", "rank": 0}}, "lora.rank: 0 must be a positive integer"),
        ({"lora": {"rank": 4}}, "lora: rank and factorization apply to mode: adapter"),
        ({"lora": {"mode": "adapter"}, "experts": {"qv": str(llama_adapters["qv"]), "b": str(llama_base)}},
         "lora.mode: adapter needs every expert to be a peft adapter directory; experts.b"),
        ({"adapter_bases": {"nope": str(llama_base)}}, "adapter_bases.nope: not an expert of this config"),
    ]:
        with pytest.raises(MergeConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
            parse_merge_config({**cfg, **bad})


def test_svd_factorisation_is_optimal_and_deterministic():
    from operators.merge.lora_adapter import factorize_svd, svd_algorithm

    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(96, 80, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(80, 80, generator=g, dtype=torch.float64))
    s = torch.tensor([0.9**j for j in range(80)], dtype=torch.float64)
    delta = ((u * s) @ v.T).float()
    # Eckart–Young: the best rank-4 error is ‖(σ_5, σ_6, ...)‖ / ‖σ‖, worked out from the spectrum we built
    best = math.sqrt(sum(0.81**j for j in range(4, 80)) / sum(0.81**j for j in range(80)))
    assert svd_algorithm((96, 80), 4) == "randomized" and svd_algorithm((96, 80), 16) == "full"
    for algorithm in ("full", "randomized"):
        b, a = factorize_svd(delta, 4, algorithm)
        assert b.shape == (96, 4) and a.shape == (4, 80)
        err = float((delta - b @ a).norm() / delta.norm())
        assert err == pytest.approx(best, rel=1e-4), algorithm
    again = factorize_svd(delta, 4, "randomized")
    assert torch.equal(again[0], factorize_svd(delta, 4, "randomized")[0]), "seeded: the same factors every run"


def test_bfloat16_base_task_vectors_are_not_rounded_to_bfloat16(root, llama_base, llama_adapters):
    """W + ΔW is handed to the merge in float32: ΔW survives intact although W is stored in bfloat16."""
    from transformers import LlamaForCausalLM

    bf16 = _save_model(LlamaForCausalLM.from_pretrained(str(llama_base)).to(torch.bfloat16), root / "llama-bf16")
    base = load_state_dict(bf16)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert base[key].dtype == torch.bfloat16
    out = root / "bf16-exact"
    merge_checkpoints(bf16, llama_adapters, "task_arithmetic", {"scaling": 0.7}, out)
    got = load_state_dict(out)
    ab_qv, ab_qko = (load_file(str(llama_adapters[n] / "adapter_model.safetensors")) for n in ("qv", "qko"))
    mod = PREFIX + key.removesuffix(".weight")
    delta = (ab_qv[f"{mod}.lora_B.weight"] @ ab_qv[f"{mod}.lora_A.weight"]) * 2.0 + \
        (ab_qko[f"{mod}.lora_B.weight"] @ ab_qko[f"{mod}.lora_A.weight"]) * (16 / math.sqrt(8))
    expect = (base[key].float() + 0.7 * delta).to(torch.bfloat16)  # one rounding, at the end
    assert got[key].dtype == torch.bfloat16
    assert torch.equal(got[key], expect)
    # adapter mode: the merged ΔW is the experts' exactly, not ΔW plus bfloat16 rounding noise of W
    report = merge_checkpoints(bf16, llama_adapters, "task_arithmetic", {"scaling": 0.7}, root / "bf16-concat",
                               lora_mode="adapter", adapter_factorization="concat")
    assert report.adapter_error < 1e-6


def test_module_names_map_to_exactly_one_base_tensor():
    from operators.lora import LoraAdapter, LoraModule, map_modules

    mod = LoraModule("model.blocks.0.x", torch.zeros(1, 2), torch.zeros(2, 1), 1.0, False)
    adapter = LoraAdapter(Path("ad"), {}, {mod.name: mod}, torch.float32)
    # exact name first; else the shortest suffix that exactly one base tensor ends with
    assert map_modules(adapter, ["model.blocks.0.x.weight", "blocks.0.x.weight"]) == {"model.blocks.0.x.weight": mod.name}
    assert map_modules(adapter, ["blocks.0.x.weight", "blocks.1.x.weight"]) == {"blocks.0.x.weight": mod.name}
    with pytest.raises(MergeError, match=r"module 'model\.blocks\.0\.x' fits 2 tensors of the base "
                                         r"\('a\.blocks\.0\.x\.weight', 'b\.blocks\.0\.x\.weight'"):
        map_modules(adapter, ["a.blocks.0.x.weight", "b.blocks.0.x.weight"])
    with pytest.raises(MergeError, match=r"module 'model\.blocks\.0\.x' has no weight in the base"):
        map_modules(adapter, ["blocks.0.y.weight"])
