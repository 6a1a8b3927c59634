"""lm-evaluation-harness as a scorer: its numbers on a local task equal the ones worked out from the model's
log-likelihoods, offline; a workflow's merged model is scored by it and the scores reach MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import make_tiny_causal_lm

CHOICES = ["no", "yes", "maybe"]
ROWS = [("apple", 1), ("car", 0), ("pear", 1), ("rock", 0), ("plum", 2), ("fig", 1), ("bus", 0)]


def write_local_task(folder: Path, name: str = "mergeflow_fruit") -> Path:
    """A multiple-choice task of the harness that reads a local jsonl file (no hub)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"is {w} a fruit?", "label": y}) for w, y in ROWS))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: \"{{question}}\"\n"
        f"doc_to_choice: {json.dumps(CHOICES)}\ndoc_to_target: \"{{{{label}}}}\"\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return folder


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def hand_scores(model_dir: Path) -> dict[str, float]:
    """acc and acc_norm by the harness' definition: each choice's log-likelihood after the question (joined
    by a space, no special tokens), the most likely choice (acc) or the most likely per character (acc_norm)."""
    from transformers import AutoModelForCausalLM

    from operators.finetune import lm_tokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval(), lm_tokenizer(model_dir)
    acc = norm = 0
    for word, label in ROWS:
        ctx = tok(f"is {word} a fruit?", add_special_tokens=False)["input_ids"]
        lls = []
        for choice in CHOICES:
            cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].double(), -1)
            lls.append(sum(float(logp[len(ctx) + i - 1, t]) for i, t in enumerate(cont)))
        acc += max(range(3), key=lambda j: lls[j]) == label
        norm += max(range(3), key=lambda j: lls[j] / len(CHOICES[j])) == label
    return {"acc": acc / len(ROWS), "acc_norm": norm / len(ROWS)}


def test_lm_eval_scores_a_checkpoint_on_a_local_task_as_worked_out_by_hand(tmp_path):
    from operators.harness import lm_eval_scores

    tasks = write_local_task(tmp_path / "tasks")
    want = {}
    for seed in (0, 3):  # two random models: the hand scores differ, the harness follows
        base = make_tiny_causal_lm(tmp_path / f"llama{seed}", "llama", seed=seed)
        got = lm_eval_scores(base, ["mergeflow_fruit"], include_path=tasks, batch_size=4)
        want[seed] = hand_scores(base)
        assert got.scores["mergeflow_fruit"]["acc"] == pytest.approx(want[seed]["acc"])
        assert got.scores["mergeflow_fruit"]["acc_norm"] == pytest.approx(want[seed]["acc_norm"])
        assert got.n_samples == {"mergeflow_fruit": len(ROWS)}
        assert got.flat()["lm_eval/mergeflow_fruit/acc"] == got.scores["mergeflow_fruit"]["acc"]
    limited = lm_eval_scores(base, ["mergeflow_fruit"], include_path=tasks, limit=3, batch_size=2)
    assert limited.n_samples == {"mergeflow_fruit": 3} and limited.config["limit"] == 3


def test_unknown_tasks_a_missing_folder_and_a_missing_harness_are_refused_by_name(tmp_path, monkeypatch):
    from operators.harness import LmEvalUnavailable, lm_eval_scores, require_lm_eval, unknown_tasks

    tasks = write_local_task(tmp_path / "tasks")
    assert unknown_tasks(["mergeflow_fruit", "no_such_task_xyz"], tasks) == ["no_such_task_xyz"]
    with pytest.raises(LmEvalUnavailable, match=r"no_such_task_xyz.*include_path"):
        lm_eval_scores(tmp_path / "unused", ["no_such_task_xyz"], include_path=tasks)
    with pytest.raises(LmEvalUnavailable, match="is not a folder"):
        unknown_tasks(["x"], tmp_path / "nowhere")
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # as if not installed
    with pytest.raises(LmEvalUnavailable, match=r"pip install 'mergeflow\[lm-eval\]'"):
        require_lm_eval()


def test_a_workflow_scores_its_merged_model_and_base_with_lm_eval_into_mlflow(tmp_path):
    """evaluation.lm_eval: after the merge, the merged model and the base are scored by the harness on a local
    task; the numbers are those worked out by hand on the same checkpoints, on the merged model's run (for its
    LoggedModel) and side by side on the workflow's run."""
    from mlflow import MlflowClient

    from operators.checkpoint import resolve_model_path
    from pipeline.driver import run_workflow
    from pipeline.spec import parse_workflow
    from tests.helpers import tiny_lm_workflow_dict

    base = make_tiny_causal_lm(tmp_path / "llama", "llama", seed=1)
    tasks = write_local_task(tmp_path / "tasks")
    spec = tiny_lm_workflow_dict(tmp_path, base)
    spec["evaluation"] = {"lm_eval": {"tasks": ["mergeflow_fruit"], "include_path": str(tasks), "batch_size": 4,
                                      "models": ["merged", "base"]}}
    wf = parse_workflow(spec)
    result = run_workflow(wf, address="in-process", report=lambda _m: None)
    merged_dir = resolve_model_path(result.final.merged.uri)
    want = {"merged": hand_scores(merged_dir), "base": hand_scores(base)}
    for which in ("merged", "base"):
        got = result.lm_eval[which]["scores"]["mergeflow_fruit"]
        assert got["acc"] == pytest.approx(want[which]["acc"]) and got["acc_norm"] == pytest.approx(
            want[which]["acc_norm"]), which
    client = MlflowClient(wf.tracking.uri)
    merged_run = client.get_run(result.final.merged.run_id).data.metrics
    assert merged_run["lm_eval/mergeflow_fruit/acc"] == pytest.approx(want["merged"]["acc"])
    workflow_run = client.get_run(result.run_id).data.metrics
    assert workflow_run["lm_eval/merged/mergeflow_fruit/acc"] == pytest.approx(want["merged"]["acc"])
    assert workflow_run["lm_eval/base/mergeflow_fruit/acc_norm"] == pytest.approx(want["base"]["acc_norm"])
    logged = client.get_logged_model(result.final.merged.model_id).metrics
    assert any(m.key == "lm_eval/mergeflow_fruit/acc" for m in logged)
    record = json.loads(Path(client.download_artifacts(result.run_id, "results.json", str(tmp_path))).read_text())
    assert record["lm_eval"]["merged"]["n_samples"] == {"mergeflow_fruit": len(ROWS)}


def test_lm_eval_in_a_spec_is_checked_before_anything_runs(tiny_base, tmp_path):
    from pipeline.driver import PreflightError, run_workflow
    from pipeline.spec import SpecError, parse_workflow
    from tests.helpers import tiny_lm_workflow_dict, tiny_workflow_dict

    classification = tiny_workflow_dict(tmp_path / "c", tiny_base)
    classification["evaluation"] = {"lm_eval": {"tasks": ["arc_easy"]}}
    with pytest.raises(SpecError, match=r"evaluation\.lm_eval: lm-evaluation-harness scores causal language"):
        parse_workflow(classification)
    spec = tiny_lm_workflow_dict(tmp_path, make_tiny_causal_lm(tmp_path / "llama", "llama"))
    spec["evaluation"] = {"lm_eval": {"tasks": ["mergeflow_fruit", "no_such_task_xyz"],
                                      "include_path": str(write_local_task(tmp_path / "tasks"))}}
    with pytest.raises(PreflightError, match=r"evaluation\.lm_eval\.tasks: \['no_such_task_xyz'\]"):
        run_workflow(parse_workflow(spec), address="in-process", report=lambda _m: None)
    assert not (tmp_path / "store" / "tinylm").exists(), "refused before anything was written"
    spec["evaluation"]["lm_eval"] = {"tasks": ["x"], "include_path": str(tmp_path / "nowhere")}
    with pytest.raises(PreflightError, match="is not a folder"):
        run_workflow(parse_workflow(spec), address="in-process", report=lambda _m: None)


def test_mergeflow_lm_eval_scores_a_checkpoint_from_the_command_line(tiny_base, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    base = make_tiny_causal_lm(tmp_path / "llama", "llama", seed=2)
    tasks = str(write_local_task(tmp_path / "tasks"))
    out = CliRunner().invoke(main, ["lm-eval", str(base), "--tasks", "mergeflow_fruit", "--include-path", tasks,
                                    "--batch-size", "3", "--json"])
    assert out.exit_code == 0, out.output
    got = json.loads(out.output[out.output.index("{"):])
    assert got["scores"]["mergeflow_fruit"]["acc"] == pytest.approx(hand_scores(base)["acc"])
    table = CliRunner().invoke(main, ["lm-eval", str(base), "--tasks", "mergeflow_fruit", "--include-path", tasks])
    assert table.exit_code == 0 and "acc_norm" in table.output, table.output
    refused = CliRunner().invoke(main, ["lm-eval", str(tiny_base), "--tasks", "mergeflow_fruit"])
    assert refused.exit_code == 2 and "is not a causal LM" in refused.output
    unknown = CliRunner().invoke(main, ["lm-eval", str(base), "--tasks", "nope_xyz", "--include-path", tasks])
    assert unknown.exit_code == 2 and "'nope_xyz'" in unknown.output and "include_path" in unknown.output
