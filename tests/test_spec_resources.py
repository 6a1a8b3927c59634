"""``resources`` past one worker: what a multi-worker expert and a split merge can do is checked before anything
runs, each refusal naming the field, the value and the fix; the spec hash and expert keys say what changes
weights and what does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.context import ModelRef, expert_key
from pipeline.spec import SpecError, parse_workflow
from tests.helpers import tiny_lm_workflow_dict, tiny_workflow_dict


def _wf(tmp: Path, lm: bool = False, **overrides):
    make = tiny_lm_workflow_dict if lm else tiny_workflow_dict
    return make(tmp, tmp / "base", **({"seed_mlflow": False} if not lm else {}), **overrides)


@pytest.mark.parametrize("change,message", [
    ({"finetune": {"max_steps": 6, "batch_size": 15}},
     "resources.workers_per_expert: 2 splits each batch evenly over the workers, but task vowel's "
     "finetune.batch_size is 15; make it a multiple of 2"),
    ({"finetune": {"max_steps": 6, "batch_size": 16, "sharpness": {"method": "sam", "rho": 0.05}}},
     "finetune.sharpness (task vowel) is not available with resources.workers_per_expert 2"),
    ({"strategy": "atm", "rounds": {"count": 2, "workers": "resident"}},
     "needs rounds.workers: tasks (a resident worker keeps one expert's model in one process)"),
    ({"resources": {"workers_per_expert": 2, "strategy": "fsdp"}},
     "resources.strategy: fsdp trains causal-LM tasks"),
])
def test_multiworker_experts_refused_where_they_cannot_train_the_one_worker_expert(tmp_path, change, message):
    spec = _wf(tmp_path, resources={"workers_per_expert": 2})
    spec.update(change)
    with pytest.raises(SpecError) as info:
        parse_workflow(spec)
    assert message in str(info.value)


def test_a_task_of_its_own_workers_is_checked_by_its_name(tmp_path):
    spec = _wf(tmp_path)
    spec["tasks"][0]["workers"] = 3
    with pytest.raises(SpecError) as info:
        parse_workflow(spec)
    assert "tasks[vowel].workers: 3 splits each batch evenly over the workers, but task vowel's " \
           "finetune.batch_size is 16; make it a multiple of 3" in str(info.value)
    spec["tasks"][0]["workers"] = 2
    wf = parse_workflow(spec)
    assert [wf.workers_for(t) for t in wf.tasks] == [2, 1], "the other task keeps resources.workers_per_expert"


@pytest.mark.parametrize("merge,message", [
    ({"method": "ties", "params": {"density": 0.5, "scaling": {"search": [0.5, 1.0]}}, "validation_fraction": 0.2},
     "merge has a search"),
    ({"method": "regmean"}, "merge has a data-driven method"),
])
def test_split_merges_refused_for_merges_that_learn_from_the_whole_model(tmp_path, merge, message):
    spec = _wf(tmp_path, resources={"merge_workers": 3}, merge=merge)
    with pytest.raises(SpecError) as info:
        parse_workflow(spec)
    assert f"resources.merge_workers: 3 splits a merge of fixed parameters by tensors; {message}" in str(info.value)
    assert "Set merge_workers: 1 for it" in str(info.value)


def test_adapter_merges_are_not_split(tmp_path):
    spec = _wf(tmp_path, lm=True, resources={"merge_workers": 2},
               merge={"method": "task_arithmetic", "lora": {"mode": "adapter"}})
    with pytest.raises(SpecError, match="merge has lora.mode: adapter"):
        parse_workflow(spec)


def test_the_spec_hash_keeps_what_changes_no_weight_out(tmp_path):
    plain = parse_workflow(_wf(tmp_path))
    placed = parse_workflow(_wf(tmp_path, resources={"merge_workers": 3, "placement": "spread", "resume_every": 5,
                                                      "train_storage": "/shared/train", "gpu_memory_gb": 80}))
    assert placed.spec_hash() == plain.spec_hash(), "a split merge is bit for bit the one-process merge"
    two = parse_workflow(_wf(tmp_path, resources={"workers_per_expert": 2}))
    assert two.spec_hash() != plain.spec_hash(), "two workers train the expert to float rounding only"


def test_an_expert_trained_by_several_workers_has_its_own_key(tmp_path):
    wf = parse_workflow(_wf(tmp_path))
    start = ModelRef("base", "base", "", "b", "k0")
    task, settings = wf.tasks[0], wf.finetune_for(wf.tasks[0])
    one = expert_key(start, task, settings, "d")
    assert expert_key(start, task, settings, "d", 1, "fsdp") == one, "one worker: the key experts already have"
    assert expert_key(start, task, settings, "d", 2, "ddp") not in (one, expert_key(start, task, settings, "d", 2, "fsdp"))


def test_multiworker_experts_in_process_are_refused_before_anything_runs(tmp_path):
    from pipeline.driver import PreflightError, run_workflow

    wf = parse_workflow(_wf(tmp_path, resources={"workers_per_expert": 2}))
    with pytest.raises(PreflightError, match="run without --address in-process"):
        run_workflow(wf, address="in-process", report=lambda _m: None)
    assert not (tmp_path / "store").exists() and not (tmp_path / "mlflow.db").exists(), "nothing was created"
