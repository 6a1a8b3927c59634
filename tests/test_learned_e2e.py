"""Merges that learn from data through a real local Ray cluster and a real SQLite MLflow store:
RegMean with its Gram matrices computed beside each expert and its α searched on validation data
(one nested MLflow run per candidate); statistics reused when the experts are unchanged; the spec
refusing searches and data-driven methods it cannot run, before any training."""

from __future__ import annotations

import json

import pytest

from operators.checkpoint_files import read_provenance
from operators.data import hold_out
from pipeline.lineage import TAG_KIND, TAG_WORKFLOW_RUN
from pipeline.spec import SpecError, parse_workflow
from tests.helpers import tiny_workflow_dict

SEARCH = {"method": "regmean", "params": {"alpha": {"search": [0.5, 1.0]}, "examples": 16},
          "validation_fraction": 0.25, "refit_heads": True}


@pytest.mark.e2e
def test_regmean_with_searched_alpha_through_ray_and_mlflow(tiny_base, tmp_path):
    from mlflow import MlflowClient

    from pipeline.context import task_data
    from pipeline.driver import run_workflow

    wf = parse_workflow(tiny_workflow_dict(tmp_path, tiny_base, merge=SEARCH))
    lines: list[str] = []
    result = run_workflow(wf, address="local", num_cpus=2, report=lines.append)
    client = MlflowClient(tracking_uri=wf.tracking.uri)
    final = result.final
    # the experts trained on the train split minus the validation slice; the eval split is untouched
    for task, ref in final.experts.items():
        params = client.get_run(ref.run_id).data.params
        full = task_data(wf.task(task))
        fit, _ = hold_out(full, 0.25, wf.task(task).dataset.split_seed)
        assert params["data_part"] == "fit" and int(params["train_examples"]) == len(fit.train) < len(full.train)
        # the Gram matrices are artifacts of the expert's run, with their checksum record
        names = {a.path for a in client.list_artifacts(ref.run_id)}
        assert {"gram.json", "gram.safetensors"} <= names
        assert client.get_run(ref.run_id).data.metrics["statistics/gram_seconds"] > 0
    merge_run = client.get_run(final.merged.run_id)
    chosen = float(merge_run.data.params["search.chosen.alpha"])
    assert chosen in (0.5, 1.0) and merge_run.data.metrics["search_candidates"] == 2
    assert merge_run.data.metrics["search_cost_ratio"] > 0
    # one nested run per candidate under the merge run, each with its validation score
    runs = client.search_runs([result.experiment_id], f"tags.`{TAG_WORKFLOW_RUN}` = '{result.run_id}'")
    cands = [r for r in runs if r.data.tags[TAG_KIND] == "search_candidate"]
    assert sorted(float(r.data.params["alpha"]) for r in cands) == [0.5, 1.0]
    assert all(r.data.tags["mlflow.parentRunId"] == final.merged.run_id for r in cands)
    scores = {float(r.data.params["alpha"]): r.data.metrics["validation/mean/normalized_accuracy"] for r in cands}
    assert scores[chosen] == max(scores.values())
    assert merge_run.data.metrics["search_best_validation_normalized_accuracy"] == pytest.approx(scores[chosen])
    # provenance: the chosen value, the search, and the statistics' store URIs and checksums
    from pipeline.store import CheckpointStore

    prov = read_provenance(CheckpointStore(wf.store.root).materialize(final.merged.path))
    assert prov["params"]["alpha"] == chosen
    assert prov["learned"]["search"]["chosen"] == chosen and len(prov["learned"]["search"]["candidates"]) == 2
    stats = prov["learned"]["statistics"]
    assert stats["kind"] == "gram" and set(stats["experts"]) == {"vowel", "length"}
    assert all(len(s["file_sha256"]) == 64 for s in stats["experts"].values())
    # the heads refit on the merged body: their own column and round metrics, with their cost
    rows = final.summary()
    assert all(0.0 <= rows[t]["merged_probe"] <= 1.0 for t in ("vowel", "length"))
    round_metrics = client.get_run(final.run_id).data.metrics
    assert {"vowel/merged_probe_accuracy", "length/merged_probe_accuracy"} <= set(round_metrics)
    refit_runs = [r for r in runs if r.info.run_name == "refit-heads:linear-probe"]
    assert len(refit_runs) == 1 and refit_runs[0].data.metrics["probe_seconds"] > 0
    # another grid over the same experts: experts and their statistics are reused, only the merge is new
    wf2 = parse_workflow(tiny_workflow_dict(tmp_path, tiny_base, merge={**SEARCH, "params": {
        "alpha": {"search": [0.9]}, "examples": 16}}))
    lines2: list[str] = []
    run_workflow(wf2, address="in-process", report=lines2.append)  # reuse is the store's, not Ray's
    assert sum("gram statistics of" in ln and "reused" in ln for ln in lines2) == 2, lines2
    assert json.dumps(lines2).count("already in the store, reused") >= 4


@pytest.mark.e2e
def test_adamerging_learns_on_validation_inputs_and_records_it(tiny_base, tmp_path, capsys):
    from mlflow import MlflowClient

    from operators.merge import get_method
    from operators.tensor_io import load_state_dict
    from pipeline.context import task_data
    from pipeline.driver import run_workflow
    from pipeline.store import CheckpointStore

    merge = {"method": "adamerging", "params": {"granularity": "task", "steps": 6, "learning_rate": 0.05},
             "validation_fraction": 0.25}
    wf = parse_workflow(tiny_workflow_dict(tmp_path, tiny_base, merge=merge))
    lines: list[str] = []
    final = run_workflow(wf, address="in-process", report=lines.append).final  # (Ray paths: the test above)
    client = MlflowClient(tracking_uri=wf.tracking.uri)
    for ref in final.experts.values():  # the experts never trained on the slice whose inputs teach λ
        assert client.get_run(ref.run_id).data.params["data_part"] == "fit"
    run = client.get_run(final.merged.run_id)
    history = client.get_metric_history(final.merged.run_id, "adamerging/entropy")
    assert [m.step for m in history] == [0, 6]
    assert run.data.metrics["adamerging_final_entropy"] == pytest.approx(history[-1].value)
    assert "adamerging.json" in {a.path for a in client.list_artifacts(final.merged.run_id)}
    store = CheckpointStore(wf.store.root)
    merged_dir = store.materialize(final.merged.path)
    prov = read_provenance(merged_dir)
    coeffs = prov["params"]["coefficients"]
    learned = prov["learned"]["adamerging"]
    val = {t: len(hold_out(task_data(wf.task(t)), 0.25, wf.task(t).dataset.split_seed)[1].train)
           for t in ("vowel", "length")}
    assert learned["inputs"] == val and learned["steps"] == 6
    # the stored merge is θ0 + Σ λ_t τ_t with the recorded λ, tensor by tensor
    base = load_state_dict(tiny_base)
    experts = {t: load_state_dict(store.materialize(e.path)) for t, e in final.experts.items()}
    key = next(k for k in base if k.endswith("attention.self.query.weight"))
    want = base[key] + sum(coeffs[t] * (experts[t][key] - base[key]) for t in experts)
    assert load_state_dict(merged_dir)[key].allclose(want, atol=1e-6)
    assert get_method("adamerging").parse_params(prov["params"]).coefficients == coeffs
    assert "[adamerging] 6 steps in" in capsys.readouterr().out  # the step's progress line


@pytest.mark.parametrize("merge, extra, message", [
    ({"method": "ties", "params": {"scaling": {"search": [0.5, 1.0]}}}, {},
     "merge.params.scaling.search: a search needs validation data, and there is none; set merge.validation_fraction"),
    ({"method": "ties", "params": {"scaling": {"search": []}}, "validation_fraction": 0.1}, {},
     "merge.params.scaling.search: the grid is empty (got [])"),
    ({"method": "ties", "params": {"scaling": {"search": [0.5, "big"]}}, "validation_fraction": 0.1}, {},
     "merge.params.scaling.search: 'big' is not a number"),
    ({"method": "task_arithmetic", "params": {"scaling": {"search": [0.5, 11]}}, "validation_fraction": 0.1}, {},
     "merge.params.scaling: Input should be less than or equal to 10 (got 11.0)"),
    ({"method": "regmean", "params": {"statistics": {"vowel": "/tmp/x"}}}, {},
     "merge.params.statistics: the workflow computes the gram statistics beside each expert"),
    ({"method": "fisher"}, {"finetune": {"mode": "lora", "max_steps": 2}},
     "merge.method: fisher needs full classification experts (task 'vowel' is LoRA)"),
    ({"method": "adamerging"}, {},
     "merge.method: adamerging learns its coefficients on unlabeled inputs of every task, and there are none"),
    ({"method": "adamerging", "params": {"coefficients": {"vowel": 0.3}}, "validation_fraction": 0.1}, {},
     "merge.params.coefficients: the workflow learns them on the validation inputs"),
    ({"method": "adamerging", "validation_fraction": 0.1}, {"finetune": {"mode": "lora", "max_steps": 2}},
     "merge.method: adamerging learns through each task's head and needs full classification experts"),
    ({"method": "adamerging", "params": {"granularity": "neuron"}, "validation_fraction": 0.1}, {},
     "merge.params.granularity: Input should be 'layer' or 'task'"),
    ({"method": "task_arithmetic", "heads": "alinged"}, {},
     "merge.heads: 'alinged' is not a heads mode; use experts (the experts' heads as trained) or aligned"),
    ({"method": "task_arithmetic", "heads": {"mode": "experts", "ridge": 1.0}}, {},
     "merge.heads: ridge applies to mode: aligned; set mode: aligned or remove it"),
    ({"method": "task_arithmetic", "heads": {"mode": "aligned", "examples": 0}}, {},
     "merge.heads.examples: Input should be greater than 0 (got 0)"),
    ({"method": "task_arithmetic", "params": {"scaling": 0.3}, "validation_fraction": 0.1}, {},
     "merge.validation_fraction: 0.1 holds data out for a search, but no merge parameter is searched"),
])
def test_bad_learned_merges_are_refused_by_validate(tiny_base, tmp_path, merge, extra, message):
    spec = tiny_workflow_dict(tmp_path, tiny_base, merge=merge, **extra)
    with pytest.raises(SpecError) as info:
        parse_workflow(spec, "wf.yaml")
    assert any(p.startswith(message) for p in info.value.problems), info.value.problems
