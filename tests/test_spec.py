"""The workflow spec: every rule fails at load time with the field path, the value and the fix."""

from __future__ import annotations

import copy

import pytest
import yaml

from pipeline.spec import SpecError, load_workflow, parse_workflow

GOOD = {
    "name": "wf",
    "tasks": [
        {"name": "a", "dataset": {"source": "a.parquet"}, "labels": ["x", "y"]},
        {"name": "b", "dataset": {"source": "b.csv"}, "num_labels": 3},
    ],
}


def problems(mutate) -> list[str]:
    spec = copy.deepcopy(GOOD)
    mutate(spec)
    with pytest.raises(SpecError) as info:
        parse_workflow(spec, "wf.yaml")
    return info.value.problems


BAD_SPECS = [
    ("unknown merge method",
     lambda d: d.update(merge={"method": "tie"}),
     "merge: unknown merge method 'tie'. Known: adamerging, arcee_fusion, breadcrumbs, cart, consensus, dare_linear, dare_ties, della, della_linear, fisher, iso_c, iso_cts, karcher, knots, linear, lines, model_stock, multislerp, nearswap, nuslerp, regmean, sce, slerp, task_arithmetic, "
     "ties, tsv_m, wudi."),
    ("duplicate task",
     lambda d: d["tasks"].append(copy.deepcopy(d["tasks"][0])),
     "tasks: duplicate task name 'a'; task names must be unique."),
    ("unknown top-level key",
     lambda d: d.update(colour="red"),
     "colour: unknown key (got 'red'). Remove it or check its spelling against the README's spec reference."),
    ("negative lambda",
     lambda d: d.update(merge={"method": "task_arithmetic", "params": {"scaling": -1}}),
     "merge.params.scaling: Input should be greater than or equal to 0 (got -1)."),
    ("parameter of another method",
     lambda d: d.update(merge={"method": "task_arithmetic", "params": {"density": 0.2}}),
     "merge.params.density: unknown parameter for 'task_arithmetic'; its parameters are: normalize, scaling, weights (got 0.2)."),
    ("zero learning rate",
     lambda d: d.update(finetune={"learning_rate": 0}),
     "finetune.learning_rate: Input should be greater than 0 (got 0)."),
    ("rounds: unknown per-round setting",
     lambda d: d.update(strategy="atm", rounds={"finetune": {"epoch": 1}}),
     "rounds.finetune: unknown setting 'epoch'; settings: batch_size, epochs, freeze_embeddings, "
     "gradient_checkpointing, head_learning_rate, learning_rate, log_every, lora, max_grad_norm, max_length, "
     "max_steps, mode, precision, seed, sharpness, warmup_ratio, weight_decay."),
    ("rounds: ATM on validation data without a validation slice",
     lambda d: d.update(strategy="atm", rounds={"start": "oneshot_merge"}),
     "rounds: start: oneshot_merge (ATM on validation data) and validation_fraction go together: give both, "
     "e.g. {start: oneshot_merge, validation_fraction: 0.1}, or neither."),
    ("rounds: a per-round budget out of range is caught before anything runs",
     lambda d: d.update(strategy="atm", rounds={"finetune": {"max_steps": 0}}),
     "rounds.finetune.max_steps: Input should be greater than 0 (got 0)."),
    ("rounds: fractional contributor count",
     lambda d: d.update(strategy="cold_fusion", rounds={"contributors": 2.5}),
     "rounds.contributors: a count must be a whole number (or give a fraction below 1) (got 2.5)."),
    ("rounds: more contributors than tasks",
     lambda d: d.update(strategy="cold_fusion", rounds={"contributors": 10}),
     "rounds.contributors: 10 contributors a round, but this workflow has 2 tasks (one contributor a task); give at "
     "most 2, a fraction below 1, or remove it (every task contributes)."),
    ("rounds: merge weights name a task that does not exist",
     lambda d: d.update(strategy="atm", rounds={"merge": {"method": "linear", "params": {"weights": {"nope": 1}}}}),
     "rounds.merge.params.weights: names ['nope'], which are not tasks of this workflow; use task names (a, b)."),
    ("unknown strategy",
     lambda d: d.update(strategy="greedy"),
     "strategy: Input should be 'oneshot', 'atm' or 'cold_fusion' (got 'greedy')."),
    ("no labels",
     lambda d: d["tasks"][0].pop("labels"),
     "tasks[0]: give 'labels' (a list of label names) or 'num_labels' (an integer >= 2)."),
    ("source and train both",
     lambda d: d["tasks"][0]["dataset"].update(train="t.parquet"),
     "tasks[0].dataset: give either 'source' (split by eval_fraction) or 'train' and 'eval', not both "
     "(got source='a.parquet', train='t.parquet', eval=None)."),
    ("duplicate labels",
     lambda d: d["tasks"][0].update(labels=["x", "x"]),
     "tasks[0]: 'labels' has duplicates (got ['x', 'x'])."),
    ("no tasks",
     lambda d: d.update(tasks=[]),
     "tasks: List should have at least 1 item after validation, not 0."),
    ("bad workflow name",
     lambda d: d.update(name="my workflow!"),
     "name: the workflow name must be 1-64 characters of letters, digits, '_' or '-', starting with a "
     "letter or digit (got 'my workflow!')."),
    ("a '.' in a task name (refused before training, not by MLflow after it)",
     lambda d: d["tasks"][0].update(name="sst2.v1"),
     "tasks[0].name: a task name must be 1-64 characters of letters, digits, '_' or '-', starting with a letter or "
     "digit (got 'sst2.v1'); MLflow's model names cannot hold '.': write '-' or '_' instead."),
    ("a one-model method for more tasks (refused before training, not at the merge)",
     lambda d: d.update(merge={"method": "nearswap", "params": {"t": 0.01}}),
     "merge.method: nearswap merges exactly 1 expert (the base aside), not 2; this workflow has 2 tasks: choose a "
     "method for 2 experts."),
    ("zero cpus",
     lambda d: d.update(resources={"num_cpus": 0}),
     "resources.num_cpus: Input should be greater than 0 (got 0)."),
    ("reserved alias",
     lambda d: d.update(tracking={"alias": "latest"}),
     "tracking.alias: MLflow reserves the alias 'latest' (it already means the newest version / a version "
     "number); choose another, e.g. 'current' or 'champion' (got 'latest')."),
    ("weights for a task that does not exist",
     lambda d: d.update(merge={"method": "linear", "params": {"weights": {"zzz": 1.0}}}),
     "merge.params.weights: names ['zzz'], which are not tasks of this workflow; use task names (a, b)."),
    ("misspelt per-task finetune setting",
     lambda d: d["tasks"][1].update(finetune={"epochz": 3}),
     "tasks[1].finetune.epochz: unknown finetune setting; valid: mode, lora, precision, gradient_checkpointing, freeze_embeddings, epochs, max_steps, "
     "learning_rate, head_learning_rate, weight_decay, warmup_ratio, batch_size, max_length, seed, "
     "max_grad_norm, log_every, sharpness (got 3)."),
    ("eval fraction out of range",
     lambda d: d["tasks"][0]["dataset"].update(eval_fraction=1.5),
     "tasks[0].dataset.eval_fraction: Input should be less than 1 (got 1.5)."),
    ("no fine-tuning budget",
     lambda d: d.update(finetune={"epochs": None}),
     "finetune: give 'epochs' or 'max_steps' (got neither)."),
    ("all-zero linear weights",
     lambda d: d.update(merge={"method": "linear", "params": {"weights": {"a": 0, "b": 0}}}),
     "merge.params.weights: all weights are zero; at least one expert needs a non-zero weight (got {'a': 0, 'b': 0})."),
]


@pytest.mark.parametrize("mutate,expected", [(m, e) for _, m, e in BAD_SPECS], ids=[n for n, _, _ in BAD_SPECS])
def test_bad_spec_gives_exact_error(mutate, expected):
    assert problems(mutate) == [expected]


def test_all_problems_reported_at_once():
    got = problems(lambda d: d.update(colour="red", finetune={"learning_rate": 0}))
    assert len(got) == 2
    assert any(p.startswith("colour:") for p in got) and any(p.startswith("finetune.learning_rate:") for p in got)


def test_error_message_names_the_file():
    with pytest.raises(SpecError) as info:
        parse_workflow({"name": "x"}, "my.yaml")
    assert str(info.value).splitlines()[0] == "my.yaml: 1 problem"
    assert info.value.problems == ["tasks: required field is missing."]


def test_good_spec_defaults_and_frozen():
    wf = parse_workflow(copy.deepcopy(GOOD))
    assert wf.strategy == "oneshot"
    assert wf.merge.method == "task_arithmetic"
    assert wf.tracking.uri == "sqlite:///mlflow.db"
    assert wf.registered_model_name == "wf-merged"
    assert wf.task("b").label_names == ["0", "1", "2"]
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        wf.name = "other"


def test_per_task_finetune_override():
    spec = copy.deepcopy(GOOD)
    spec["finetune"] = {"epochs": 2, "learning_rate": 1e-4}
    spec["tasks"][1]["finetune"] = {"epochs": 5}
    wf = parse_workflow(spec)
    assert wf.finetune_for(wf.task("a")).epochs == 2
    assert wf.finetune_for(wf.task("b")).epochs == 5
    assert wf.finetune_for(wf.task("b")).learning_rate == 1e-4


def test_spec_hash_ignores_tracking_and_store():
    a = parse_workflow(copy.deepcopy(GOOD))
    b = parse_workflow({**copy.deepcopy(GOOD), "tracking": {"uri": "http://127.0.0.1:5000"}, "store": {"root": "s3://x/y"}})
    c = parse_workflow({**copy.deepcopy(GOOD), "finetune": {"seed": 1}})
    assert a.spec_hash() == b.spec_hash() != c.spec_hash()


def test_load_file_with_overrides(tmp_path):
    path = tmp_path / "wf.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    wf = load_workflow(path, {"tracking.uri": "sqlite:///other.db", "store.root": None})
    assert wf.tracking.uri == "sqlite:///other.db"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_workflow(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_workflow(bad)


def test_shipped_workflows_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "workflows"
    specs = sorted(root.glob("*.yaml"))
    assert specs, "workflows/ ships at least the quickstart"
    for spec in specs:
        wf = load_workflow(spec)
        assert spec.read_text().startswith("# Run with:"), f"{spec.name} opens with the command that runs it"
        assert wf.tasks


def _models_in(annotation) -> list[type]:
    """The pydantic models an annotation names, through ``X | None``, ``list[X]``, ``Annotated[X, ...]``."""
    import typing

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _undocumented_fields(root: type) -> tuple[list[type], list[str]]:
    """Every model reachable from ``root`` through its fields, and each field of them without a description."""
    seen: list[type] = []
    todo = [root]
    while todo:
        model = todo.pop(0)
        if model not in seen:
            seen.append(model)
            todo += [m for f in model.model_fields.values() for m in _models_in(f.annotation)]
    missing = [f"{m.__name__}.{name}" for m in seen for name, f in m.model_fields.items()
               if not (f.description or "").strip()]
    return seen, missing


def test_every_spec_field_has_a_description():
    """The spec reference is generated from these descriptions: a field without one is a hole in the docs."""
    from pydantic import BaseModel, Field

    from pipeline.spec import Workflow

    models, missing = _undocumented_fields(Workflow)
    assert {m.__name__ for m in models} >= {
        "Workflow", "TaskSpec", "DatasetSpec", "PromptTemplate", "FinetuneSpec", "LoraSpec", "MergeSpec",
        "LoraMergeSpec", "HeadsSpec", "RoundsSpec", "ResourcesSpec", "TrackingSpec", "StoreSpec", "RecurringSpec",
        "ScheduleSpec", "GateSpec"}, "the walk reaches every section"
    assert missing == [], f"fields without description=...: {missing}"

    # the walk catches a field added without one, however deep
    class Inner(BaseModel):
        documented: int = Field(default=0, description="a number")
        bare: int = 0

    class Outer(BaseModel):
        inner: list[Inner] | None = Field(default=None, description="inner ones")

    assert _undocumented_fields(Outer)[1] == ["Inner.bare"]
