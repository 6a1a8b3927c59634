"""Sharpness-aware training (``finetune.sharpness``): SAM's and ASAM's step checked by hand on a quadratic,
then through the training loop on the pico BERT (full and LoRA), recorded in the expert's provenance,
and absent from every key and hash when it is not set (stores and specs keep theirs)."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from operators.sharpness import sharpness_aware_


def _quadratic(w0: list[float], a: list[float]):
    w = torch.nn.Parameter(torch.tensor(w0))
    a_t = torch.tensor(a)

    def forward() -> torch.Tensor:
        return 0.5 * (a_t * w * w).sum()  # ∇ = a ⊙ w

    forward().backward()
    return w, forward


def test_sam_takes_the_gradient_at_the_worst_point_within_rho_by_hand():
    # w = (1, 2), a = (3, 1): g = (3, 2), ‖g‖ = √13; ε = ρ g/‖g‖; the gradient at w + ε is a ⊙ (w + ε)
    w, forward = _quadratic([1.0, 2.0], [3.0, 1.0])
    sharpness_aware_([w], forward, "sam", 0.1)
    r13 = math.sqrt(13)
    assert torch.allclose(w.grad, torch.tensor([3 * (1 + 0.3 / r13), 2 + 0.2 / r13]), atol=1e-6)
    assert torch.equal(w.detach(), torch.tensor([1.0, 2.0])), "the weights come back"


def test_asam_scales_the_radius_by_each_weights_size_by_hand():
    # η = 0: T = |w|, T ⊙ g = (3, 4), norm 5; ε = ρ T² ⊙ g / 5 = 0.1 (3, 8) / 5 = (0.06, 0.16);
    # a ⊙ (w + ε) = (3.18, 2.16), and the loss there 0.5 (3 · 1.06² + 2.16²)
    w, forward = _quadratic([1.0, 2.0], [3.0, 1.0])
    assert sharpness_aware_([w], forward, "asam", 0.1, eta=0.0) == pytest.approx(0.5 * (3 * 1.06**2 + 2.16**2))
    assert torch.allclose(w.grad, torch.tensor([3.18, 2.16]), atol=1e-6)
    assert torch.equal(w.detach(), torch.tensor([1.0, 2.0]))
    # with the authors' η = 0.01: T = (1.01, 2.01), T ⊙ g = (3.03, 4.02), ‖·‖ = √25.3413; T² ⊙ g = (3.0603, 8.0802)
    w, forward = _quadratic([1.0, 2.0], [3.0, 1.0])
    sharpness_aware_([w], forward, "asam", 0.1, eta=0.01)
    eps = [0.1 * 3.0603 / math.sqrt(25.3413), 0.1 * 8.0802 / math.sqrt(25.3413)]
    assert torch.allclose(w.grad, torch.tensor([3 * (1 + eps[0]), 2 + eps[1]]), atol=1e-6)
    # a parameter ASAM does not scale (a bias, in the authors' code) is perturbed as SAM would
    w, forward = _quadratic([1.0, 2.0], [3.0, 1.0])
    sharpness_aware_([w], forward, "asam", 0.1, scaled=[False])
    assert torch.allclose(w.grad, torch.tensor([3 * (1 + 0.3 / math.sqrt(13)), 2 + 0.2 / math.sqrt(13)]), atol=1e-6)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_sam_experts_train_through_the_one_loop_and_say_so(tiny_base, tmp_path, mode):
    from operators.data import load_task_data
    from operators.finetune import finetune
    from pipeline.spec import DatasetSpec, FinetuneSpec
    from tests.helpers import write_task_file

    data = load_task_data("vowel", DatasetSpec(source=str(write_task_file(tmp_path / "v.parquet", "vowel"))),
                          ["consonant", "vowel"])
    common = {"max_steps": 6, "batch_size": 16, "learning_rate": 1e-3, "log_every": 1, "mode": mode}
    plain = finetune(tiny_base, data, FinetuneSpec(**common), tmp_path / "plain")
    sam = finetune(tiny_base, data, FinetuneSpec(**common, sharpness={"method": "sam", "rho": 0.05}), tmp_path / "sam")
    # the first step's loss is taken before any update: the same; the updates differ from there on
    assert sam.losses[0][1] == pytest.approx(plain.losses[0][1], abs=1e-6)
    assert [round(v, 6) for _, v in sam.losses] != [round(v, 6) for _, v in plain.losses]
    assert all(math.isfinite(v) for _, v in sam.losses)


def test_sharpness_is_recorded_and_left_out_of_keys_and_hashes_when_unset(tiny_base, tmp_path):
    from pipeline.context import ModelRef, expert_key
    from pipeline.spec import FinetuneSpec, parse_workflow
    from pipeline.store import content_key
    from tests.helpers import tiny_workflow_dict

    spec = tiny_workflow_dict(tmp_path, tiny_base)
    wf = parse_workflow(spec)
    with_sam = parse_workflow({**spec, "finetune": {**spec["finetune"], "sharpness": {"method": "asam", "rho": 0.5}}})
    assert with_sam.finetune.sharpness.method == "asam" and with_sam.spec_hash() != wf.spec_hash()
    # unset, the spec's hash and the experts' keys are what they were before the field existed
    payload = wf.model_dump(mode="json", exclude={"tracking", "store", "description", "evaluation"})
    payload["finetune"].pop("sharpness")
    payload["rounds"].pop("workers")
    payload["rounds"].pop("checkpoint_every")
    payload["merge"].pop("heads")
    payload["rounds"]["merge"].pop("heads")
    for name in ("workers_per_expert", "strategy", "placement", "resume_every", "train_storage", "merge_workers",
                 "gpu_memory_gb"):  # (the resources of multi-worker experts and split merges, added later still)
        payload["resources"].pop(name)
    for task in payload["tasks"]:
        task.pop("workers")
    assert wf.spec_hash() == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    start = ModelRef(kind="base", name="base", path="", uri=str(tiny_base), key="k0")
    settings = wf.finetune_for(wf.tasks[0])
    old = content_key("expert", "k0", wf.tasks[0].model_dump(mode="json", exclude={"workers"}),  # (a later field)
                      {k: v for k, v in settings.model_dump(mode="json").items() if k != "sharpness"}, "d")
    assert expert_key(start, wf.tasks[0], settings, "d") == old
    assert expert_key(start, wf.tasks[0], with_sam.finetune_for(with_sam.tasks[0]), "d") != old
    # a run records it in every expert's provenance (and so on its MLflow run's params)
    from operators.checkpoint_files import read_provenance
    from pipeline.driver import run_workflow

    result = run_workflow(with_sam, address="in-process", report=lambda _m: None)
    for expert in result.final.experts.values():
        assert read_provenance(expert.uri)["finetune"]["sharpness"] == {"method": "asam", "rho": 0.5, "eta": 0.01}
    with pytest.raises(ValueError, match="rho"):
        FinetuneSpec(max_steps=1, sharpness={"method": "sam", "rho": 0})
