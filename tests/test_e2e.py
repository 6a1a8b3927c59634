"""End to end: a 2-task workflow on the pico BERT through a real local Ray cluster and a real
SQLite MLflow store in a temp dir; the lineage is asserted run by run and model by model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.entities import LoggedModelStatus

from pipeline.lineage import TAG_KIND, TAG_WORKFLOW_RUN
from pipeline.spec import parse_workflow
from tests.helpers import tiny_workflow_dict

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ray_run(tiny_base, tmp_path_factory):
    from pipeline.driver import run_workflow

    tmp = tmp_path_factory.mktemp("e2e")
    wf = parse_workflow(tiny_workflow_dict(tmp, tiny_base))
    lines: list[str] = []
    result = run_workflow(wf, address="local", num_cpus=2, report=lines.append)
    return wf, result, lines, tmp


def _client(wf):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=wf.tracking.uri, registry_uri=wf.tracking.uri)


def test_run_tree(ray_run):
    wf, result, _, _ = ray_run
    client = _client(wf)
    runs = client.search_runs([result.experiment_id], f"tags.`{TAG_WORKFLOW_RUN}` = '{result.run_id}'")
    by_kind: dict[str, list] = {}
    for r in runs:
        by_kind.setdefault(r.data.tags[TAG_KIND], []).append(r)
    assert len(by_kind["workflow"]) == 1 and by_kind["workflow"][0].info.run_id == result.run_id
    (round_run,) = by_kind["round"]
    assert round_run.data.tags["mlflow.parentRunId"] == result.run_id
    experts = {r.data.tags["mergeflow.task"]: r for r in by_kind["expert"]}
    assert set(experts) == {"vowel", "length"}, "one child run per expert"
    for r in by_kind["expert"] + by_kind["merge"] + by_kind["baseline"]:
        assert r.data.tags["mlflow.parentRunId"] == round_run.info.run_id
        assert r.info.status == "FINISHED"
    assert client.get_run(result.run_id).info.status == "FINISHED"


def test_expert_runs_have_params_loss_curve_datasets_and_evals(ray_run):
    wf, result, _, _ = ray_run
    client = _client(wf)
    for task, ref in result.final.experts.items():
        run = client.get_run(ref.run_id)
        assert run.data.params["task"] == task
        assert run.data.params["finetune.max_steps"] == "6"
        history = client.get_metric_history(ref.run_id, "train_loss")
        assert [m.step for m in history] == [2, 4, 6], "per-step loss, every log_every=2 steps"
        names = {d.dataset.name: d for d in run.inputs.dataset_inputs}
        assert names.keys() == {f"{task}-train", f"{task}-eval"}
        contexts = {d.tags[0].value for d in run.inputs.dataset_inputs}
        assert contexts == {"training", "evaluation"}
        # every expert is scored on every task (its body with that task's head)
        for other in ("vowel", "length"):
            assert f"eval/{other}/accuracy" in run.data.metrics


def test_merge_run_names_its_experts_and_registry_points_at_the_merged_model(ray_run):
    wf, result, _, tmp = ray_run
    client = _client(wf)
    final = result.final
    merge_run = client.get_run(final.merged.run_id)
    assert merge_run.data.params["method"] == "task_arithmetic"
    assert merge_run.data.params["params.scaling"] == "0.5"
    input_ids = {m.model_id for m in merge_run.inputs.model_inputs}
    assert input_ids == {e.model_id for e in final.experts.values()}, "the merge's inputs are both experts"
    for e in final.experts.values():
        model = client.get_logged_model(e.model_id)
        assert model.source_run_id == e.run_id
        assert model.status == LoggedModelStatus.READY

    merged_model = client.get_logged_model(final.merged.model_id)
    assert merged_model.source_run_id == final.merged.run_id
    assert merged_model.status == LoggedModelStatus.READY
    version = client.get_model_version(wf.registered_model_name, final.registered_version)
    assert version.source == f"models:/{final.merged.model_id}", "the registry version is the merged model"
    assert json.loads(merged_model.tags["mlflow.modelVersions"]) == [
        {"name": wf.registered_model_name, "version": final.registered_version}], "the model page lists its version"
    assert version.tags["mergeflow.model_id"] == final.merged.model_id
    assert version.tags["mergeflow.strategy"] == "oneshot"
    alias = client.get_model_version_by_alias(wf.registered_model_name, wf.tracking.alias)
    assert str(alias.version) == final.registered_version
    # the version's source really holds the checkpoint (nothing points at nothing)
    artifacts = Path(merged_model.artifact_location.removeprefix("file://"))
    assert (artifacts / "config.json").is_file() and (artifacts / "heads" / "vowel" / "head.safetensors").is_file()

    # the merged checkpoint's provenance matches the lineage
    prov = json.loads((Path(final.merged.path) / "mergeflow.json").read_text())
    assert prov["mlflow"]["model_id"] == final.merged.model_id
    assert prov["mlflow"]["run_id"] == final.merged.run_id
    assert prov["spec_hash"] == wf.spec_hash()
    parents = {p.get("task"): p for p in prov["parents"] if p["kind"] == "expert"}
    assert {t: p["model_id"] for t, p in parents.items()} == {t: e.model_id for t, e in final.experts.items()}
    assert prov["method"] == "task_arithmetic" and prov["params"]["scaling"] == 0.5


def test_summary_metrics_and_artifacts(ray_run):
    wf, result, _, _ = ray_run
    client = _client(wf)
    summary = result.summary()
    assert set(summary) == {"vowel", "length", "mean"}
    for task in ("vowel", "length"):
        row = summary[task]
        assert row["normalized"] == pytest.approx(row["merged"] / row["expert"])
    parent = client.get_run(result.run_id)
    assert parent.data.metrics["mean/merged_accuracy"] == pytest.approx(summary["mean"]["merged"])
    arts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"results.json", "results.md", "workflow.json"} <= arts


def test_rerun_reuses_everything_and_registers_nothing_new(ray_run):
    from pipeline.driver import run_workflow

    wf, first, _, _ = ray_run
    # each task's baseline is kept in the store; one edited by hand is measured again, not trusted
    records = {p.name.split("-")[0]: p for p in (Path(wf.store.root) / wf.name / "baselines").glob("*.json")}
    assert sorted(records) == ["length", "vowel"]
    records["vowel"].write_text("{edited")
    lines: list[str] = []
    second = run_workflow(wf, address="in-process", report=lines.append)
    assert all(e.reused for e in second.final.experts.values())
    assert second.final.merged.path == first.final.merged.path
    assert second.final.registered_version == first.final.registered_version
    versions = _client(wf).search_model_versions(f"name = '{wf.registered_model_name}'")
    assert len(versions) == 1, "no duplicate registry versions"
    assert any("already registered" in line for line in lines)
    client = _client(wf)
    second_runs = client.search_runs([second.experiment_id], f"tags.`{TAG_WORKFLOW_RUN}` = '{second.run_id}'")
    kinds = sorted(r.data.tags[TAG_KIND] for r in second_runs)
    assert kinds == ["baseline", "evaluation", "evaluation", "evaluation", "round", "workflow"]
    assert {r.info.status for r in second_runs} == {"FINISHED"}, "no run is left RUNNING"
    # the base's linear probe is not measured again: the same numbers, from the store, naming the run that measured them
    first_runs = client.search_runs([first.experiment_id], f"tags.`{TAG_WORKFLOW_RUN}` = '{first.run_id}'")
    (probe1,) = [r for r in first_runs if r.data.tags[TAG_KIND] == "baseline"]
    (probe2,) = [r for r in second_runs if r.data.tags[TAG_KIND] == "baseline"]
    assert probe2.data.tags["mergeflow.baseline.length.reused_from"] == probe1.info.run_id
    assert "probe/length/seconds" in probe1.data.metrics and "probe/length/seconds" not in probe2.data.metrics
    assert probe2.data.metrics["probe/length/accuracy"] == probe1.data.metrics["probe/length/accuracy"]
    # the edited one: measured again, and its record rewritten by this run (the same seed: the same score, up to
    # one eval example, since this run is in-process on another thread count than the Ray worker's)
    assert "mergeflow.baseline.vowel.reused_from" not in probe2.data.tags and "probe/vowel/seconds" in probe2.data.metrics
    assert json.loads(records["vowel"].read_text())["run_id"] == probe2.info.run_id
    assert probe2.data.metrics["probe/vowel/accuracy"] == pytest.approx(probe1.data.metrics["probe/vowel/accuracy"], abs=0.05)
    # the scores of the reused merged model and experts are reused too: the same numbers, each task's run tagged
    for run in (r for r in second_runs if r.data.tags[TAG_KIND] == "evaluation"):
        sources = {k for k in run.data.tags if k.startswith("mergeflow.evaluation.") and k.endswith(".reused_from")}
        assert sources and all(run.data.tags[k] in {r.info.run_id for r in first_runs} for k in sources), run.data.tags
    for task in ("vowel", "length"):
        assert [second.summary()[task][c] for c in ("expert", "merged")] == [first.summary()[task][c] for c in ("expert", "merged")]


def test_cli_validate_and_run_bad_data_exit_codes(tiny_base, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    spec = tiny_workflow_dict(tmp_path, tiny_base, seed_mlflow=False)  # bad input must not create it
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(spec))
    res = CliRunner().invoke(main, ["validate", str(good)])
    assert res.exit_code == 0, res.output
    assert "ok:" in res.output and "2 tasks" in res.output

    spec["tasks"][0]["dataset"]["text_column"] = "sentence"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec))
    res = CliRunner().invoke(main, ["run", str(bad)])
    assert res.exit_code == 2
    assert "no text column 'sentence'" in res.output
    assert not (tmp_path / "mlflow.db").exists(), "bad data is caught before anything is tracked or run"

    spec["merge"] = {"method": "tie"}
    worse = tmp_path / "worse.yaml"
    worse.write_text(yaml.safe_dump(spec))
    res = CliRunner().invoke(main, ["validate", str(worse)])
    assert res.exit_code == 2 and "merge: unknown merge method 'tie'" in res.output


def test_cli_status_lists_the_workflow_and_its_runs(ray_run):
    from click.testing import CliRunner

    from pipeline.cli import main

    wf, result, _, _ = ray_run
    listing = CliRunner().invoke(main, ["status", "--tracking-uri", wf.tracking.uri])
    assert listing.exit_code == 0, listing.output
    assert result.run_id[:8] in listing.output and "FINISHED" in listing.output
    tree = CliRunner().invoke(main, ["status", result.run_id, "--tracking-uri", wf.tracking.uri])
    assert tree.exit_code == 0, tree.output
    for kind in ("round", "expert", "merge", "baseline"):
        assert kind in tree.output
    assert "expert:vowel" in tree.output and "merge:task_arithmetic" in tree.output
    missing = CliRunner().invoke(main, ["status", "--tracking-uri", "sqlite:////nonexistent/x.db"])
    assert missing.exit_code == 2 and "no tracking database" in missing.output
