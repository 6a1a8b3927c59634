"""The GPU path: fine-tuning and evaluation on a CUDA device. Skipped where no GPU is present."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_finetune_and_evaluate_on_cuda(tiny_base, tmp_path):
    from operators.data import load_task_data
    from operators.evaluate import evaluate
    from operators.finetune import finetune
    from operators.tensor_io import load_state_dict
    from pipeline.spec import DatasetSpec, FinetuneSpec
    from tests.helpers import write_task_file

    src = write_task_file(tmp_path / "v.parquet", "vowel", n=80)
    data = load_task_data("vowel", DatasetSpec(source=str(src)), ["consonant", "vowel"])
    res = finetune(tiny_base, data, FinetuneSpec(max_steps=5, batch_size=16, learning_rate=1e-3), tmp_path / "e", device="cuda")
    assert res.steps == 5
    sd = load_state_dict(tmp_path / "e")
    assert all(t.device.type == "cpu" for t in sd.values()), "checkpoints are saved from CPU tensors"
    m = evaluate(tmp_path / "e", data, device="cuda")
    assert m["n"] == len(data.eval)


def test_lora_causal_lm_on_cuda_bf16_and_gradient_checkpointing(tmp_path):
    """LoRA causal-LM experts on CUDA: bf16 autocast by default, peak memory measured, adapters saved
    from CPU tensors and loadable on the CPU; gradient checkpointing gives the same training losses."""
    from safetensors.torch import load_file

    from operators.data import load_task_data
    from operators.evaluate import evaluate
    from operators.finetune import finetune
    from pipeline.spec import DatasetSpec, FinetuneSpec, LoraSpec, PromptTemplate
    from tests.helpers import make_tiny_causal_lm, write_lm_task

    base = make_tiny_causal_lm(tmp_path / "base", "llama")
    src = write_lm_task(tmp_path / "t.parquet", "vowel", n=64)
    ds = DatasetSpec(source=str(src), template=PromptTemplate(prompt="{text}?", response=" {answer}"),
                     answer_column="answer")
    data = load_task_data("vowel", ds, [], "causal_lm")
    settings = dict(mode="lora", lora=LoraSpec(r=4, alpha=8), max_steps=6, batch_size=16, learning_rate=1e-2,
                    log_every=1)
    plain = finetune(base, data, FinetuneSpec(**settings), tmp_path / "a", device="cuda")
    ckpt = finetune(base, data, FinetuneSpec(**settings, gradient_checkpointing=True), tmp_path / "b", device="cuda")
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    assert plain.precision == ckpt.precision == expected
    assert plain.peak_gpu_bytes > 0 and plain.tokens_per_second > 0
    assert [s for s, _ in plain.losses] == list(range(1, 7))
    for (_, x), (_, y) in zip(plain.losses, ckpt.losses, strict=True):
        assert abs(x - y) < 2e-2 * max(1.0, abs(x)), (plain.losses, ckpt.losses)
    adapter = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in adapter.values())
    on_gpu = evaluate(tmp_path / "a", data, adapter_base=base, device="cuda")
    on_cpu = evaluate(tmp_path / "a", data, adapter_base=base, device="cpu")
    assert abs(on_gpu["loss"] - on_cpu["loss"]) < 1e-3
