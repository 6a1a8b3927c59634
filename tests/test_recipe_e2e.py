"""A recipe search in a workflow, through a real local Ray cluster and a real SQLite MLflow store: candidates
scored as parallel Ray tasks, each a nested run of the merge's; the best recipe written as a mergekit config that
``mergeflow merge`` turns into the very model the workflow published."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner

from operators.checkpoint_files import read_provenance
from operators.tensor_io import load_state_dict
from pipeline.lineage import TAG_KIND, TAG_WORKFLOW_RUN
from pipeline.spec import SpecError, parse_workflow
from tests.helpers import tiny_workflow_dict

RECIPE = {"method": "ties", "validation_fraction": 0.25,
          "recipe": {"search": ["weight", "density", "lambda"], "layers": 2, "evaluations": 7, "population": 3,
                     "seed": 1}}


@pytest.mark.e2e
def test_a_recipe_search_through_ray_and_mlflow(tiny_base, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipeline.cli import main
    from pipeline.driver import run_workflow
    from pipeline.store import CheckpointStore

    wf = parse_workflow(tiny_workflow_dict(tmp_path, tiny_base, merge=RECIPE))
    lines: list[str] = []
    result = run_workflow(wf, address="local", num_cpus=2, report=lines.append)
    client = MlflowClient(tracking_uri=wf.tracking.uri)
    final = result.final
    # generation 0 (the usual values), then CMA-ES generations of 3: 1 + 3 + 3 = 7 candidates
    assert sum("recipe generation" in ln for ln in lines) == 3, lines
    runs = client.search_runs([result.experiment_id], f"tags.`{TAG_WORKFLOW_RUN}` = '{result.run_id}'")
    cands = [r for r in runs if r.data.tags[TAG_KIND] == "search_candidate"]
    assert len(cands) == 7 and all(r.data.tags["mlflow.parentRunId"] == final.merged.run_id for r in cands)
    assert {r.data.tags["mergeflow.recipe.generation"] for r in cands} == {"0", "1", "2"}
    first = next(r for r in cands if r.data.params["candidate"] == "0")
    # the start point: weight 1 for both tasks, density 0.5, λ 1, as two-knot gradients
    assert first.data.params["weight.vowel"] == "[1.0, 1.0]" and first.data.params["lambda"] == "[1.0, 1.0]"
    scores = {int(r.data.params["candidate"]): r.data.metrics["validation/mean/normalized_accuracy"] for r in cands}
    merge_run = client.get_run(final.merged.run_id)
    assert merge_run.data.metrics["recipe_best_validation_normalized_accuracy"] == pytest.approx(max(scores.values()))
    assert merge_run.data.metrics["recipe_start_validation_normalized_accuracy"] == pytest.approx(scores[0])
    # the chosen recipe: a mergekit config of store URIs, on the merge run and in the merged model's provenance
    store = CheckpointStore(wf.store.root)
    merged_dir = store.materialize(final.merged.path)
    prov = read_provenance(merged_dir)
    config = prov["learned"]["recipe"]["config"]
    best = max(scores, key=lambda i: (scores[i], -i))
    assert prov["learned"]["recipe"]["search"]["best_index"] == best
    with open(client.download_artifacts(final.merged.run_id, "recipe.yaml", str(tmp_path))) as f:
        logged = yaml.safe_load(f)
    assert logged == config and config["merge_method"] == "ties"
    assert {m["model"] for m in config["models"]} == {final.experts["vowel"].uri, final.experts["length"].uri}
    assert prov["tensor_params"], "the gradients' parameters, tensor by tensor"
    # mergekit's YAML through mergeflow merge gives the workflow's merged body, tensor for tensor
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "again"
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "recipe.yaml"), str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    want, got = load_state_dict(merged_dir), load_state_dict(out)
    assert sorted(got) == sorted(want) and all((got[k] == want[k]).all() for k in want)


def test_the_spec_refuses_recipe_searches_it_cannot_run(tiny_base, tmp_path):
    def refused(merge: dict, match: str, **kw) -> None:
        with pytest.raises(SpecError, match=match):
            parse_workflow(tiny_workflow_dict(tmp_path, tiny_base, merge=merge, **kw))

    refused({k: v for k, v in RECIPE.items() if k != "validation_fraction"},
            "merge.recipe: a recipe search scores candidates on validation data, and there is none")
    refused({**RECIPE, "method": "slerp"}, "'slerp' is not a method whose recipe can be searched")
    refused({**RECIPE, "method": "task_arithmetic"}, "'density' is not a parameter of mergekit's task_arithmetic")
    refused({**RECIPE, "params": {"scaling": 0.5}}, "params: the recipe search chooses the parameters")
    refused({**RECIPE, "heads": "aligned"}, "merge.recipe: searches a one-shot merge scored with the experts' heads")
