"""What the MLflow UI is given to show: links, the experiment kind, model-version links, metrics
on datasets (on a real SQLite MLflow store), and the lineage graph."""

from __future__ import annotations

import json
import struct

import pytest

from pipeline.lineage import (
    EXPERIMENT_KIND,
    TAG_EXPERIMENT_KIND,
    TAG_MODEL_VERSIONS,
    Lineage,
    latest_workflow,
    ui_links,
)
from pipeline.lineage_graph import GraphData, GraphRound, draw_lineage, drawn_rounds


def test_ui_links_open_the_model_training_view():
    links = ui_links("http://127.0.0.1:5000/", "7", run_id="abc", model_id="m-1", registered_model="my model/x",
                     version="3")
    assert links == {
        "experiment": "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning",
        "workflow run": "http://127.0.0.1:5000/#/experiments/7/runs/abc?workflowType=machine_learning",
        "merged model": "http://127.0.0.1:5000/#/experiments/7/models/m-1?workflowType=machine_learning",
        "registered version": "http://127.0.0.1:5000/#/models/my%20model%2Fx/versions/3?workflowType=machine_learning",
    }
    assert ui_links("http://h:1", "2") == {"experiment": "http://h:1/#/experiments/2/runs?workflowType=machine_learning"}


def test_drawn_rounds_elide_the_middle_of_long_runs():
    rounds = [GraphRound(i, {"a": 0.5}, "linear", 0.5) for i in range(12)]
    assert [r.index if r else None for r in drawn_rounds(rounds)] == [0, 1, 2, None, 8, 9, 10, 11]
    assert drawn_rounds(rounds[:8]) == rounds[:8]
    assert [r.index if r else None for r in drawn_rounds(rounds[:9], limit=4)] == [0, None, 7, 8]  # 4 columns, the gap one of them


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_lineage_graph_has_a_curve_panel_only_for_rounds(tmp_path):
    one = GraphData("w", "oneshot", "packaged:x", [GraphRound(0, {"a": 0.9, "b": 0.8}, "ties", 0.7, "1")], 0.6)
    atm = GraphData("w", "atm", "packaged:x", [GraphRound(i, {"a": 0.9, "b": 0.8}, "linear", 0.6 + i / 10, str(i + 1))
                                               for i in range(3)], 0.6)
    w1, h1 = _png_size(draw_lineage(one, tmp_path / "one.png", dpi=100))
    w3, h3 = _png_size(draw_lineage(atm, tmp_path / "atm.png", dpi=100))
    # figure size in inches x dpi: width 2.6 + 3.2 per drawn round; height 0.75 per task + 1.6 (min 3),
    # plus 3 inches for the accuracy-per-round panel
    assert (w1, h1) == (580, 310)  # 5.8 x 3.1 in: one round, two tasks
    assert (w3, h3) == (1220, 610)  # 12.2 x 6.1 in: three rounds, two tasks, the curve panel


@pytest.fixture()
def lineage(tmp_path):
    return Lineage.init(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp")


def test_experiments_open_as_model_training_and_a_chosen_kind_stays(lineage, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=lineage.tracking_uri)
    assert client.get_experiment(lineage.experiment_id).tags[TAG_EXPERIMENT_KIND] == "custom_model_development"
    old = client.create_experiment("older", tags={})  # made before mergeflow tagged experiments
    chosen = client.create_experiment("chosen", tags={TAG_EXPERIMENT_KIND: "genai_development"})
    Lineage.init(lineage.tracking_uri, "older")
    Lineage.init(lineage.tracking_uri, "chosen")
    assert client.get_experiment(old).tags[TAG_EXPERIMENT_KIND] == EXPERIMENT_KIND
    assert client.get_experiment(chosen).tags[TAG_EXPERIMENT_KIND] == "genai_development", "a user's choice stays"


def test_versions_are_registered_from_the_logged_model_and_listed_on_it(lineage):
    run = lineage.start_run("w", kind="workflow")
    merge_run = lineage.start_run("merge", kind="merge", parent=run, workflow_run=run)
    models = [lineage.create_model(merge_run, "w-merged") for _ in range(2)]
    for m in models:
        lineage.finalize_model(m, run_id=merge_run, step=0)
    assert lineage.register("w-merged", model_id=models[0], run_id=merge_run, alias="current") == "1"
    assert lineage.register("w-merged", model_id=models[1], run_id=merge_run, alias=None) == "2"
    assert lineage.register("w-merged", model_id=models[0], run_id=merge_run, alias=None, source="/store/x") == "3"
    client = lineage.client
    v1 = client.get_model_version("w-merged", "1")
    assert v1.source == f"models:/{models[0]}" and v1.run_id == merge_run
    assert client.get_model_version("w-merged", "3").source == "/store/x"
    assert json.loads(client.get_logged_model(models[0]).tags[TAG_MODEL_VERSIONS]) == [
        {"name": "w-merged", "version": "1"}, {"name": "w-merged", "version": "3"}]
    assert json.loads(client.get_logged_model(models[1]).tags[TAG_MODEL_VERSIONS]) == [
        {"name": "w-merged", "version": "2"}]
    assert lineage.alias_version("w-merged", "current") == "1"
    assert lineage.alias_version("w-merged", "champion") is None
    # metrics on a dataset, for a model: the model page lists them with the dataset
    lineage.log_metrics(merge_run, {"eval/a/accuracy": 0.75}, step=0, model_id=models[0], dataset=("a-eval", "d1"))
    (metric,) = client.get_logged_model(models[0]).metrics
    assert (metric.key, metric.value, metric.dataset_name, metric.dataset_digest) == ("eval/a/accuracy", 0.75,
                                                                                      "a-eval", "d1")
    # mergeflow ui finds the newest finished workflow run and the alias's model
    assert latest_workflow(lineage.tracking_uri, "exp", "w", "w-merged", "current") is None, "still running"
    lineage.end_run(run)
    assert latest_workflow(lineage.tracking_uri, "exp", "w", "w-merged", "current") == {
        "experiment_id": lineage.experiment_id, "run_id": run, "model_id": models[0], "version": "1"}
