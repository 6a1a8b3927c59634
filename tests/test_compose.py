"""Few-shot composition (LoraHub): the composed model is θ0 + Σ w_i ΔW_i exactly, the objective is the few-shot
loss plus α Σ|w|, and the search weighs up the expert that knows the new task."""

from __future__ import annotations

import pytest
import torch

from operators.learn.compose import ComposedLM, compose
from operators.merge.engine import merge_checkpoints
from operators.tensor_io import load_state_dict
from pipeline.spec import DatasetSpec, FinetuneSpec, LoraSpec, PromptTemplate
from tests.helpers import make_tiny_causal_lm, write_lm_task


@pytest.fixture(scope="module")
def lm_experts(tmp_path_factory):
    from operators.data import load_task_data
    from operators.finetune import finetune

    root = tmp_path_factory.mktemp("compose")
    base = make_tiny_causal_lm(root / "base", "llama")
    experts, data = {}, {}
    for rule in ("vowel", "length"):
        src = write_lm_task(root / f"{rule}.parquet", rule, n=128, seed=len(rule))
        ds = DatasetSpec(source=str(src), template=PromptTemplate(prompt="{text}?", response=" {answer}"),
                         answer_column="answer")
        data[rule] = load_task_data(rule, ds, [], "causal_lm")
        settings = FinetuneSpec(mode="lora", lora=LoraSpec(r=4, alpha=8), max_steps=30, batch_size=16,
                                learning_rate=2e-2, max_length=24)
        finetune(base, data[rule], settings, root / rule)
        experts[rule] = root / rule
    return base, experts, data


def test_the_composed_model_is_the_task_arithmetic_merge_of_the_weights(lm_experts, tmp_path):
    base, experts, _ = lm_experts
    lm = ComposedLM(base, experts)
    w = {"vowel": 0.7, "length": -0.4}
    lm.set(w)
    merge_checkpoints(base, experts, "task_arithmetic", {"weights": w, "scaling": 1.0}, tmp_path / "m")
    want = load_state_dict(tmp_path / "m")
    got = lm.model.state_dict()
    assert lm.touched and all(torch.allclose(got[k], want[k], atol=1e-6) for k in lm.touched)
    lm.set({"vowel": 0.0, "length": 0.0})  # w = 0 is the base, bit for bit
    base_sd = load_state_dict(base)
    assert all(torch.equal(lm.model.state_dict()[k], base_sd[k].float()) for k in lm.touched)


def test_compose_weighs_up_the_expert_that_knows_the_new_task(lm_experts):
    base, experts, data = lm_experts
    shots = data["vowel"].train.take(range(16))  # 16 labelled examples of the "new" task
    res = compose(base, experts, shots, evaluations=24, population=6, seed=0, max_length=24)
    assert len(res.candidates) == 24
    assert res.candidates[0]["weights"] == {"vowel": 0.0, "length": 0.0}  # LoraHub starts from the base
    assert res.candidates[0]["loss"] == pytest.approx(res.base_loss)
    # the objective: few-shot loss + 0.05 Σ|w|, and the best candidate is the lowest
    for c in res.candidates:
        assert c["objective"] == pytest.approx(c["loss"] + 0.05 * sum(abs(v) for v in c["weights"].values()))
    assert res.objective == min(c["objective"] for c in res.candidates)
    assert res.loss < res.base_loss and res.weights["vowel"] > abs(res.weights["length"])
    assert res.config["merge_method"] == "task_arithmetic" and res.config["parameters"] == {"lambda": 1.0}


@pytest.mark.e2e
def test_mergeflow_compose_records_its_search_in_mlflow(tmp_path):
    import json

    import yaml
    from click.testing import CliRunner
    from mlflow import MlflowClient

    from pipeline.cli import main
    from pipeline.lineage import TAG_KIND
    from tests.helpers import tiny_lm_workflow_dict

    base = make_tiny_causal_lm(tmp_path / "base", "llama")
    spec = tiny_lm_workflow_dict(tmp_path, base)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "composed"
    res = CliRunner().invoke(main, ["compose", str(tmp_path / "spec.yaml"), "--target", "vowel", "--examples", "12",
                                    "--evaluations", "8", "--out", str(out), "--address", "in-process", "--json"])
    assert res.exit_code == 0, res.output
    record = json.loads(res.output[res.output.index("{\n"):])
    # the other task's expert only; the composed model is task arithmetic of it at the found weight
    assert set(record["weights"]) == {"length"} and set(record["experts"]) == {"length"}
    assert record["few_shot_loss"]["composed"] <= record["few_shot_loss"]["base"]
    assert set(record["held_out"]) == {"composed", "uniform", "base"}
    prov = json.loads((out / "mergeflow.json").read_text())
    assert prov["compose"]["target"] == "vowel" and prov["params"]["weights"] == record["weights"]
    client = MlflowClient(tracking_uri=spec["tracking"]["uri"])
    run = client.get_run(record["run_id"])
    assert run.data.tags[TAG_KIND] == "compose" and float(run.data.params["weight.length"]) == record["weights"]["length"]
    assert len(client.get_metric_history(record["run_id"], "candidate/objective")) == 8
    # the merge of the other tasks registers under a name of its own, never the workflow's
    assert [m.name for m in client.search_registered_models()] == ["tinylm-merged-without-vowel"]
    assert run.data.metrics["held_out/composed/accuracy"] == pytest.approx(record["held_out"]["composed"]["accuracy"])


def test_compose_refuses_a_target_it_cannot_compose(tmp_path):
    import yaml
    from click.testing import CliRunner

    from pipeline.cli import main
    from tests.helpers import tiny_lm_workflow_dict

    spec = tiny_lm_workflow_dict(tmp_path, tmp_path / "base")
    make_tiny_causal_lm(tmp_path / "base", "llama")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    for args, message in ((["--target", "nope"], "--target: 'nope' is not a task of tinylm (vowel, length)"),
                          (["--target", "vowel", "--examples", "100000"], "--examples: 100000 is more than")):
        res = CliRunner().invoke(main, ["compose", str(tmp_path / "spec.yaml"), *args, "--out", str(tmp_path / "o")])
        assert res.exit_code == 2 and message in res.output, res.output
