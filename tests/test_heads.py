"""Heads aligned to the merged body (``merge.heads: aligned``): the closed-form fit against numbers worked
out by hand, its invariants on the pico model, and the pipeline writing, recording and scoring the
aligned heads."""

from __future__ import annotations

import pytest
import torch

from operators.learn.heads import HeadAlignmentError, align_heads, fit_head, output_layer


def test_fit_head_by_hand():
    # z = 1, 2, 3 and targets y = 2z + 1, starting from the zero head, ridge 0.1:
    # Z = [z, 1]; ZᵀZ = [[14, 6], [6, 3]]; r = 0.1 · 17 / 2 = 0.85; Zᵀy = [34, 15]
    # (ZᵀZ + 0.85 I) θ = [34, 15]  →  det = 14.85 · 3.85 − 36 = 21.1725
    # w = (34 · 3.85 − 6 · 15) / 21.1725 = 1.931751…,  b = (14.85 · 15 − 6 · 34) / 21.1725 = 0.885582…
    z = torch.tensor([[1.0], [2.0], [3.0]])
    y = 2 * z + 1
    w, b = fit_head(z, y, torch.zeros(1, 1), torch.zeros(1), ridge=0.1)
    assert w.item() == pytest.approx(40.9 / 21.1725, abs=1e-6)
    assert b.item() == pytest.approx(18.75 / 21.1725, abs=1e-6)
    # no bias: Z = z; ZᵀZ = 14, r = 1.4; w = (Zᵀy + r·w0) / (14 + 1.4) = (34 + 1.4 · 1) / 15.4
    w, b = fit_head(z, y, torch.ones(1, 1), None, ridge=0.1)
    assert b is None and w.item() == pytest.approx(35.4 / 15.4, abs=1e-6)


def test_fit_head_invariants():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, 6, generator=g)
    w0, b0 = torch.randn(3, 6, generator=g), torch.randn(3, generator=g)
    # targets the prior head already reproduces: any ridge keeps it
    w, b = fit_head(z, z @ w0.T + b0, w0, b0, ridge=0.5)
    assert torch.allclose(w, w0, atol=1e-5) and torch.allclose(b, b0, atol=1e-5)
    # no inputs, or a ridge so large the data does not count: the expert's head
    w, b = fit_head(z[:0], torch.zeros(0, 3), w0, b0)
    assert torch.equal(w, w0) and torch.equal(b, b0)
    w, b = fit_head(z, torch.randn(40, 3, generator=g), w0, b0, ridge=1e9)
    assert torch.allclose(w, w0, atol=1e-5) and torch.allclose(b, b0, atol=1e-5)
    # otherwise the solution zeroes the objective's gradient: Zᵀ(ZΘᵀ − y) + r (Θ − Θ0)ᵀ = 0
    y = torch.randn(40, 3, generator=g, dtype=torch.float64)
    w, b = fit_head(z.double(), y, w0.double(), b0.double(), ridge=0.1)
    zz = torch.cat([z.double(), torch.ones(40, 1, dtype=torch.float64)], 1)
    theta, theta0 = torch.cat([w, b[:, None]], 1), torch.cat([w0, b0[:, None]], 1).double()
    r = 0.1 * torch.trace(zz.T @ zz) / 7
    grad = zz.T @ (zz @ theta.T - y) + r * (theta - theta0).T
    assert grad.abs().max() < 1e-9
    with pytest.raises(HeadAlignmentError, match="ridge must be > 0"):
        fit_head(z, y.float(), w0, b0, ridge=0.0)


@pytest.fixture()
def merged_tiny(tiny_base, tiny_experts, tmp_path):
    from operators.merge.engine import merge_checkpoints

    out = tmp_path / "merged"
    merge_checkpoints(tiny_base, tiny_experts, "task_arithmetic", {"scaling": 0.5}, out)
    return out


def _texts(task: str, tmp_path, n: int = 24) -> list[str]:
    from operators.data import load_task_data
    from pipeline.spec import DatasetSpec
    from tests.helpers import write_task_file

    labels = {"vowel": ["consonant", "vowel"], "length": ["short", "long"]}[task]
    src = write_task_file(tmp_path / f"{task}-inputs.parquet", task)
    return load_task_data(task, DatasetSpec(source=str(src)), labels).train.texts[:n]


def test_aligned_heads_reproduce_their_experts_better_on_the_merged_body(tiny_experts, merged_tiny, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from operators.checkpoint import load_task_model
    from operators.learn.heads import _layer_io

    texts = {t: _texts(t, tmp_path) for t in tiny_experts}
    before = {t: load_file(str(merged_tiny / "heads" / t / "head.safetensors")) for t in tiny_experts}
    report = align_heads(merged_tiny, tiny_experts, texts, ridge=0.1, max_length=12)
    tok = AutoTokenizer.from_pretrained(str(merged_tiny))
    for t, fit in report.fits.items():
        assert fit.examples == 24 and fit.module == "classifier"
        assert fit.mse_after < fit.mse_before
        after = load_file(str(merged_tiny / "heads" / t / "head.safetensors"))
        assert set(after) == set(before[t]) and not torch.equal(after["classifier.weight"], before[t]["classifier.weight"])
        # checked independently of the fit: a fresh load of the written head, the features recomputed,
        # the ridge objective's gradient at the written head is zero (up to fp32 features)
        student = load_task_model(merged_tiny, t)
        teacher = load_task_model(tiny_experts[t], t)
        z, logits = _layer_io(student, output_layer(student)[1], tok, texts[t], 12, "cpu")
        _, y = _layer_io(teacher, output_layer(teacher)[1], tok, texts[t], 12, "cpu")
        assert torch.allclose(logits, z @ after["classifier.weight"].T + after["classifier.bias"], atol=1e-5)
        zz = torch.cat([z.double(), torch.ones(len(z), 1, dtype=torch.float64)], 1)
        theta = torch.cat([after["classifier.weight"], after["classifier.bias"][:, None]], 1).double()
        theta0 = torch.cat([before[t]["classifier.weight"], before[t]["classifier.bias"][:, None]], 1).double()
        r = 0.1 * torch.trace(zz.T @ zz) / zz.shape[1]
        grad = zz.T @ (zz @ theta.T - y.double()) + r * (theta - theta0).T
        assert grad.abs().max() < 1e-3 * (zz.T @ y.double()).abs().max()


def test_an_expert_aligned_to_itself_keeps_its_head(tiny_experts, tmp_path):
    import shutil

    from safetensors.torch import load_file

    own = tmp_path / "vowel"
    shutil.copytree(tiny_experts["vowel"], own)
    report = align_heads(own, {"vowel": tiny_experts["vowel"]}, {"vowel": _texts("vowel", tmp_path)}, max_length=12)
    assert report.fits["vowel"].mse_before == 0.0 and report.fits["vowel"].mse_after < 1e-10
    want = load_file(str(tiny_experts["vowel"] / "heads" / "vowel" / "head.safetensors"))
    got = load_file(str(own / "heads" / "vowel" / "head.safetensors"))
    assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)


def test_no_inputs_is_refused(tiny_experts, merged_tiny):
    with pytest.raises(HeadAlignmentError, match="tasks.vowel: no inputs to align its head on"):
        align_heads(merged_tiny, {"vowel": tiny_experts["vowel"]}, {"vowel": []})


@pytest.mark.e2e
def test_workflow_with_aligned_heads_publishes_records_and_scores_them(tiny_base, tmp_path):
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from operators.checkpoint_files import read_provenance
    from operators.evaluate import evaluate
    from pipeline.context import task_data
    from pipeline.driver import run_workflow
    from pipeline.spec import parse_workflow
    from pipeline.store import CheckpointStore
    from tests.helpers import tiny_workflow_dict

    merge = {"method": "task_arithmetic", "params": {"scaling": 0.5}, "heads": {"mode": "aligned", "examples": 20}}
    wf = parse_workflow(tiny_workflow_dict(tmp_path, tiny_base, merge=merge))
    lines: list[str] = []
    final = run_workflow(wf, address="in-process", report=lines.append).final
    store = CheckpointStore(wf.store.root)
    merged = store.materialize(final.merged.path)
    prov = read_provenance(merged)
    assert prov["heads"]["mode"] == "aligned" and prov["heads"]["ridge"] == 0.1
    assert {t: f["examples"] for t, f in prov["heads"]["tasks"].items()} == {"vowel": 20, "length": 20}
    client = MlflowClient(tracking_uri=wf.tracking.uri)
    run = client.get_run(final.merged.run_id)
    assert "heads_aligned.json" in {a.path for a in client.list_artifacts(final.merged.run_id)}
    for t in ("vowel", "length"):
        assert run.data.metrics[f"heads/{t}/logit_mse_after"] < run.data.metrics[f"heads/{t}/logit_mse_before"]
        expert = store.materialize(final.experts[t].path)
        assert not torch.equal(load_file(str(merged / "heads" / t / "head.safetensors"))["classifier.weight"],
                               load_file(str(expert / "heads" / t / "head.safetensors"))["classifier.weight"])
        # the table's merged score is the published checkpoint with its own (aligned) heads
        want = evaluate(merged, task_data(wf.task(t)), max_length=12)["accuracy"]
        assert final.summary()[t]["merged"] == pytest.approx(want)
    # the same workflow with the experts' heads is another merge (another key), over the same experts
    wf2 = parse_workflow(tiny_workflow_dict(tmp_path, tiny_base, merge={**merge, "heads": "experts"}))
    final2 = run_workflow(wf2, address="in-process", report=lines.append).final
    assert final2.merged.key != final.merged.key
    assert {t: e.key for t, e in final2.experts.items()} == {t: e.key for t, e in final.experts.items()}


def test_a_search_scores_each_candidate_with_the_heads_aligned_to_it(tiny_base, tiny_experts, tmp_path):
    from operators.data import Split, TaskData
    from operators.evaluate import evaluate
    from operators.learn.search import search_coefficient
    from operators.merge.engine import merge_checkpoints
    from tests.helpers import word_rows

    val, align = {}, {}
    for t in tiny_experts:
        texts, labels = word_rows(t, 40, 7)
        val[t] = Split(texts[24:], [int(y in ("vowel", "long")) for y in labels[24:]])
        align[t] = texts[:24]
    res = search_coefficient(tiny_base, tiny_experts, "task_arithmetic", {"scaling": {"search": [0.5, 1.0]}}, val,
                             max_length=12, align=align)
    assert res.heads == "aligned" and [c.value for c in res.candidates] == [0.5, 1.0]
    for c in res.candidates:  # each score is that of the merge written with that value and its heads aligned
        out = tmp_path / f"m{c.value}"
        merge_checkpoints(tiny_base, tiny_experts, "task_arithmetic", {"scaling": c.value}, out)
        align_heads(out, tiny_experts, align, max_length=12)
        for t in tiny_experts:
            data = TaskData(name=t, label_names=["a", "b"], train=val[t], eval=val[t], source="", digest="")
            assert c.accuracy[t] == pytest.approx(evaluate(out, data, max_length=12)["accuracy"], abs=1e-9)


def test_compare_variants_keep_the_specs_heads(tiny_base, tmp_path):
    from pipeline.compare import variant_workflow
    from pipeline.spec import parse_workflow
    from tests.helpers import tiny_workflow_dict

    aligned = {"mode": "aligned", "examples": 32}
    wf = parse_workflow(tiny_workflow_dict(tmp_path, tiny_base, merge={"method": "task_arithmetic", "heads": aligned},
                                           rounds={"merge": {"method": "linear", "heads": "aligned"}}))
    one = variant_workflow(wf, "oneshot", "ties")
    assert one.merge.method == "ties" and one.merge.heads.mode == "aligned" and one.merge.heads.examples == 32
    atm = variant_workflow(wf, "atm", "mean")
    assert atm.rounds.merge.method == "linear" and atm.rounds.merge.heads.mode == "aligned"
    plain = parse_workflow(tiny_workflow_dict(tmp_path / "p", tiny_base))
    assert variant_workflow(plain, "oneshot", "ties").merge.heads.mode == "experts"


@pytest.mark.e2e
@pytest.mark.parametrize("lora_mode", ["exact", "adapter"])
def test_lora_experts_heads_are_aligned_to_the_merged_model(tiny_base, tmp_path, lora_mode):
    from operators.checkpoint_files import read_provenance
    from pipeline.driver import run_workflow
    from pipeline.spec import parse_workflow
    from pipeline.store import CheckpointStore
    from tests.helpers import tiny_workflow_dict

    merge = {"method": "task_arithmetic", "params": {"scaling": 1.0}, "heads": {"mode": "aligned", "examples": 16},
             "lora": {"mode": lora_mode}}
    spec = tiny_workflow_dict(tmp_path, tiny_base, merge=merge)
    spec["finetune"] |= {"mode": "lora", "max_steps": 4}
    wf = parse_workflow(spec)
    final = run_workflow(wf, address="in-process", report=lambda _: None).final
    prov = read_provenance(CheckpointStore(wf.store.root).materialize(final.merged.path))
    for t in ("vowel", "length"):
        fit = prov["heads"]["tasks"][t]
        assert fit["examples"] == 16 and fit["mse_after"] < fit["mse_before"]


def test_the_default_heads_leave_spec_hashes_and_merge_keys_as_they_were(tiny_base, tmp_path):
    from pipeline.context import ModelRef, merged_key
    from pipeline.spec import parse_workflow
    from tests.helpers import tiny_workflow_dict

    def wf(**merge):
        return parse_workflow(tiny_workflow_dict(tmp_path, tiny_base, merge={"method": "task_arithmetic", **merge}))

    plain, explicit, aligned = wf(), wf(heads="experts"), wf(heads="aligned")
    # the spec hash and merge key of a spec written before `heads` (and `rounds.workers`, `rounds.checkpoint_every`,
    # `evaluation`, the multi-worker resources) existed: computed without those fields
    payload = plain.model_dump(mode="json", exclude={"tracking", "store", "description", "evaluation"})
    for m in (payload["merge"], payload["rounds"]["merge"]):
        m.pop("heads")
    payload["rounds"].pop("workers")
    payload["rounds"].pop("checkpoint_every")
    payload["finetune"].pop("sharpness")  # (`finetune.sharpness` too)
    for name in ("workers_per_expert", "strategy", "placement", "resume_every", "train_storage", "merge_workers",
                 "gpu_memory_gb"):  # (and the resources of multi-worker experts and split merges)
        payload["resources"].pop(name)
    for task in payload["tasks"]:
        task.pop("workers")
    import hashlib
    import json

    assert plain.spec_hash() == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    assert plain.spec_hash() == explicit.spec_hash() != aligned.spec_hash()
    base = ModelRef("base", "base", "", "file:///b", "k0", None, None)
    experts = {"vowel": ModelRef("expert", "vowel", "", "file:///e", "k1", None, None)}
    assert merged_key(base, experts, plain.merge) == merged_key(base, experts, explicit.merge)
    assert merged_key(base, experts, plain.merge) != merged_key(base, experts, aligned.merge)
