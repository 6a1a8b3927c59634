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
