"""ATM and ColD Fusion: their definitions checked on the pico BERT (in-process runtime, real SQLite
MLflow), resume at the first incomplete round, and per-round lineage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from operators.checkpoint_files import HEAD_WEIGHTS, HEADS_DIR, head_names, read_provenance
from operators.data import load_task_data
from operators.finetune import finetune
from operators.merge.engine import merge_checkpoints
from operators.tensor_io import load_state_dict
from pipeline.driver import run_workflow
from pipeline.lineage import TAG_KIND, TAG_PARENT, TAG_ROUND
from pipeline.spec import parse_workflow
from pipeline.strategies.cold_fusion import sample_contributors
from tests.helpers import tiny_workflow_dict


def body(ckpt) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_state_dict(ckpt).items() if v.is_floating_point()}


def head(ckpt, task) -> dict[str, torch.Tensor]:
    return load_file(Path(ckpt) / HEADS_DIR / task / HEAD_WEIGHTS)


def store_dir(wf, ref) -> Path:
    return Path(wf.store.root) / ref.path if not Path(ref.path).is_absolute() else Path(ref.path)


def run(wf, **kw):
    return run_workflow(wf, address="in-process", report=kw.pop("report", lambda _m: None), **kw)


def test_atm_one_task_one_round_is_finetune_then_merge(tiny_base, tmp_path):
    spec = tiny_workflow_dict(tmp_path, tiny_base, strategy="atm",
                              rounds={"count": 1, "merge": {"method": "task_arithmetic", "params": {"scaling": 0.7}}})
    spec["tasks"] = spec["tasks"][:1]
    wf = parse_workflow(spec)
    result = run(wf)
    task = wf.tasks[0]
    # by hand: fine-tune once from the base with the whole budget, then merge that one expert
    expert = tmp_path / "by-hand" / "expert"
    finetune(tiny_base, load_task_data(task.name, task.dataset, task.label_names), wf.finetune_for(task), expert)
    merge_checkpoints(tiny_base, {task.name: expert}, "task_arithmetic", {"scaling": 0.7}, tmp_path / "by-hand" / "m")
    got, want = body(store_dir(wf, result.final.merged)), body(tmp_path / "by-hand" / "m")
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k


def test_atm_mean_merge_is_the_average_of_the_rounds_experts(tiny_base, tmp_path):
    wf = parse_workflow(tiny_workflow_dict(tmp_path, tiny_base, strategy="atm", rounds={"count": 2}))
    result = run(wf)
    assert [r.index for r in result.rounds] == [0, 1]
    r0, r1 = result.rounds
    merged = body(store_dir(wf, r1.merged))
    experts = [body(store_dir(wf, e)) for e in r1.experts.values()]
    for k in merged:
        assert torch.allclose(merged[k], sum(e[k] for e in experts) / 2, atol=1e-6), k
    # round 1 fine-tunes from round 0's merged model, heads included, with half the budget each round
    for e in r1.experts.values():
        prov = read_provenance(store_dir(wf, e))
        assert prov["parents"][0]["key"] == r0.merged.key
        assert prov["head_init"] != "random"
        assert prov["finetune"]["max_steps"] == 3 and prov["finetune"]["seed"] == 1  # 6 steps over 2 rounds
    assert sorted(head_names(store_dir(wf, r1.merged))) == ["length", "vowel"]
    assert r1.budget == 1.0 and r0.budget == 0.5


def test_contributor_sampling_is_reproducible_by_seed(tiny_base, tmp_path):
    spec = tiny_workflow_dict(tmp_path, tiny_base)
    spec["tasks"] = [dict(spec["tasks"][i % 2], name=f"t{i}") for i in range(6)]
    tasks = parse_workflow(spec).tasks
    picks = [[t.name for t in sample_contributors(tasks, k, 2, seed=7, weight_by_size=False)] for k in range(8)]
    again = [[t.name for t in sample_contributors(tasks, k, 2, seed=7, weight_by_size=False)] for k in range(8)]
    assert picks == again and all(len(p) == 2 for p in picks)
    assert len({tuple(p) for p in picks}) > 1, "rounds draw different contributors"
    other = [[t.name for t in sample_contributors(tasks, k, 2, seed=8, weight_by_size=False)] for k in range(8)]
    assert other != picks
    assert len(sample_contributors(tasks, 0, 0.5, seed=0, weight_by_size=True)) == 3  # a fraction of the tasks
    assert sample_contributors(tasks, 0, None, seed=0, weight_by_size=False) == list(tasks)


def test_cold_fusion_one_round_with_everyone_is_the_one_shot_linear_merge(tiny_base, tmp_path):
    cold = parse_workflow(tiny_workflow_dict(tmp_path, tiny_base, strategy="cold_fusion", rounds={"count": 1}))
    shared = run(cold).final.merged
    oneshot = parse_workflow(tiny_workflow_dict(tmp_path, tiny_base, merge={"method": "linear"}))
    lines: list[str] = []
    merged = run(oneshot, report=lines.append).final.merged
    # the same experts (same start, data and budget): one-shot reuses ColD Fusion's from the store
    assert sum("already in the store, reused" in line for line in lines) == 2
    a, b = body(store_dir(cold, shared)), body(store_dir(oneshot, merged))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cold_fusion_never_averages_heads(tiny_base, tmp_path):
    spec = tiny_workflow_dict(tmp_path, tiny_base, strategy="cold_fusion", rounds={"count": 2, "contributors": 1})
    tasks = parse_workflow(spec).tasks
    # a seed whose two rounds draw different contributors
    seed = next(s for s in range(100) if sample_contributors(tasks, 0, 1, s, False) != sample_contributors(tasks, 1, 1, s, False))
    spec["rounds"]["contributor_seed"] = seed
    wf = parse_workflow(spec)
    result = run(wf)
    r0, r1 = result.rounds
    assert len(r0.experts) == len(r1.experts) == 1
    s0, s1 = store_dir(wf, r0.merged), store_dir(wf, r1.merged)
    for r, shared in ((r0, s0), (r1, s1)):
        (task, expert), = r.experts.items()
        for k, v in head(store_dir(wf, expert), task).items():  # the contributor's own head, untouched
            assert torch.equal(head(shared, task)[k], v)
    # a task that did not contribute in round 1 keeps its head from round 0's shared model exactly
    (c0,), (c1,) = r0.experts, r1.experts
    assert c0 != c1
    assert sorted(head_names(s1)) == sorted([c0, c1])
    for k, v in head(s0, c0).items():
        assert torch.equal(head(s1, c0)[k], v)
    # the shared body is the contributor's body (the average of one), heads aside
    (expert,) = r1.experts.values()
    e, s = body(store_dir(wf, expert)), body(s1)
    assert all(torch.allclose(s[k], e[k]) for k in s)
    # evaluation: the shared body as a starting point (linear probe) next to the base's probe
    summary = r1.summary()
    assert set(summary["mean"]) >= {"base_probe", "merged", "merged_probe", "normalized"}


def test_resume_after_round_two_gives_the_uninterrupted_weights(tiny_base, tmp_path, monkeypatch):
    import pipeline.strategies.workers as workers_mod

    def spec(root):
        return parse_workflow(tiny_workflow_dict(root, tiny_base, strategy="atm",
                                                 rounds={"count": 3, "finetune": {"max_steps": 3}}))

    full = run(spec(tmp_path / "uninterrupted")).final.merged

    wf = spec(tmp_path / "resumed")
    real = workers_mod.finetune_step

    def stop_in_round_three(ctx, task, start, round_index, *args, **kwargs):
        if round_index == 2:
            raise KeyboardInterrupt("stopped after round 2 (simulated)")
        return real(ctx, task, start, round_index, *args, **kwargs)

    monkeypatch.setattr(workers_mod, "finetune_step", stop_in_round_three)
    with pytest.raises(KeyboardInterrupt):
        run(wf)
    monkeypatch.setattr(workers_mod, "finetune_step", real)
    lines: list[str] = []
    resumed = run(wf, report=lines.append)
    # rounds 0 and 1 came from the store: 2 experts and 1 merge each
    assert sum("round 0:" in line and "reused" in line for line in lines) == 3
    assert sum("round 1:" in line and "reused" in line for line in lines) == 3
    assert not any("round 2:" in line and "reused" in line for line in lines)
    a, b = body(store_dir(wf, resumed.final.merged)), body(tmp_path / "uninterrupted" / "store" / full.path
                                                           if not Path(full.path).is_absolute() else full.path)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    client = MlflowClient(tracking_uri=wf.tracking.uri, registry_uri=wf.tracking.uri)
    versions = client.search_model_versions(f"name = '{wf.registered_model_name}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3], "one version per round, none twice"
    assert sorted(v.tags["mergeflow.round"] for v in versions) == ["0", "1", "2"]


def test_lineage_per_round(tiny_base, tmp_path):
    wf = parse_workflow(tiny_workflow_dict(tmp_path, tiny_base, strategy="atm", rounds={"count": 3}))
    result = run(wf)
    client = MlflowClient(tracking_uri=wf.tracking.uri, registry_uri=wf.tracking.uri)
    exp = client.get_experiment_by_name(wf.experiment_name)
    runs = client.search_runs([exp.experiment_id])
    rounds = {r.data.tags[TAG_ROUND]: r for r in runs if r.data.tags[TAG_KIND] == "round"}
    assert sorted(rounds) == ["0", "1", "2"]
    for idx, r in rounds.items():
        children = [c for c in runs if c.data.tags.get(TAG_PARENT) == r.info.run_id]
        kinds = sorted(c.data.tags[TAG_KIND] for c in children)
        assert kinds.count("expert") == 2 and kinds.count("merge") == 1, (idx, kinds)
    # accuracy against round: one point per round, at step = round, on the workflow run
    history = client.get_metric_history(result.run_id, "mean/merged_accuracy")
    assert sorted(m.step for m in history) == [0, 1, 2]
    # every round's merged model is a LoggedModel and a registry version tagged with round and strategy;
    # the alias points at the best round on the mean held-out accuracy
    merged = [m for m in client.search_logged_models([exp.experiment_id]) if m.tags.get("mergeflow.kind") == "merged"]
    assert sorted(m.tags["mergeflow.round"] for m in merged) == ["0", "1", "2"]
    versions = client.search_model_versions(f"name = '{wf.registered_model_name}'")
    assert {v.tags["mergeflow.strategy"] for v in versions} == {"atm"}
    scores = {v.version: float(v.tags["mean_accuracy"]) for v in versions}
    best = max(scores, key=lambda v: (scores[v], -int(v)))
    assert client.get_model_version_by_alias(wf.registered_model_name, wf.tracking.alias).version == best


def test_rounds_score_experts_where_they_were_trained(tiny_base, tmp_path):
    """An ATM expert is scored on its own task by its fine-tuning step (no second load, no evaluation
    run of its own); the scores equal a separate evaluation of the stored expert, and they are logged
    on the expert's run with its model and dataset, as an evaluation run would log them."""
    from operators.evaluate import evaluate
    from pipeline.context import task_data

    wf = parse_workflow(tiny_workflow_dict(tmp_path, tiny_base, strategy="atm", rounds={"count": 2}))
    result = run(wf)
    client = MlflowClient(tracking_uri=wf.tracking.uri, registry_uri=wf.tracking.uri)
    exp = client.get_experiment_by_name(wf.experiment_name)
    runs = client.search_runs([exp.experiment_id])
    evaluations = [r.info.run_name for r in runs if r.data.tags[TAG_KIND] == "evaluation"]
    assert not [n for n in evaluations if n != "evaluate:merged"], evaluations
    for r in result.rounds:
        for task, expert in r.experts.items():
            again = evaluate(store_dir(wf, expert), task_data(wf.task(task)), max_length=wf.finetune.max_length)
            assert r.expert_evals[task][task]["accuracy"] == again["accuracy"]
            assert r.expert_evals[task][task]["macro_f1"] == pytest.approx(again["macro_f1"], rel=1e-9)
            logged = client.get_run(expert.run_id).data.metrics
            assert logged[f"eval/{task}/accuracy"] == again["accuracy"]


def test_compare_writes_table_plot_and_mlflow_artifacts(tiny_base, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    spec = tmp_path / "wf.yaml"
    import yaml

    spec.write_text(yaml.safe_dump(tiny_workflow_dict(tmp_path, tiny_base, rounds={"count": 2, "contributors": 1})))
    out = tmp_path / "cmp"
    result = CliRunner().invoke(main, ["compare", str(spec), "--address", "in-process", "--out", str(out),
                                       "--merges", "task_arithmetic,ties"])
    assert result.exit_code == 0, result.output
    for name in ("compare.md", "compare.json", "compare.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import json

    data = json.loads((out / "compare.json").read_text())
    labels = [f"{v['strategy']}+{v['merge']}" for v in data["variants"]]
    assert labels == ["oneshot+task_arithmetic", "oneshot+ties", "atm+mean", "cold_fusion+mean"]
    assert len(data["curves"]["atm+mean"]) == 2 and data["curves"]["atm+mean"][-1][0] == 1.0
    assert data["curves"]["cold_fusion+mean"][-1][0] == 0.5  # one contributor of two per round
    mean = data["table"]["mean"]
    assert {"base probe", "expert", "atm+mean acc", "atm+mean norm", "oneshot+ties norm"} <= set(mean)
    assert "| mean |" in result.output
    # each variant's mean accuracy has a seeded 95% bootstrap interval, and a within-noise mark
    assert set(data["intervals95"]) == set(labels) and set(data["within_noise"]) == set(labels)
    assert all(lo <= mean[f"{k} acc"] <= hi for k, (lo, hi) in data["intervals95"].items())
    assert "95% interval" in (out / "compare.md").read_text()
    # the same table, plot and per-variant workflow runs under one MLflow parent run
    wf = parse_workflow(tiny_workflow_dict(tmp_path, tiny_base))
    client = MlflowClient(tracking_uri=wf.tracking.uri)
    artifacts = sorted(a.path for a in client.list_artifacts(data["run_id"]))
    assert artifacts == ["compare.json", "compare.md", "compare.png"]
    exp = client.get_experiment_by_name(wf.experiment_name)
    children = [r for r in client.search_runs([exp.experiment_id])
                if r.data.tags.get(TAG_PARENT) == data["run_id"]]
    assert sorted(r.data.tags["mergeflow.strategy"] for r in children) == ["atm", "cold_fusion", "oneshot", "oneshot"]
    assert {r.data.tags["mergeflow.seed"] for r in children} == {"0"}  # the spec's own seed
    # the base's linear probe is measured by the first variant only; the others reuse it from the store
    probes = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "baseline:linear-probe"]
    measured = [r for r in probes if not any(k.startswith("mergeflow.baseline.") for k in r.data.tags)]
    assert len(probes) == 4 and len(measured) == 1, [r.data.tags for r in probes]
    assert all(r.data.tags[f"mergeflow.baseline.{t}.reused_from"] == measured[0].info.run_id
               for r in probes if r is not measured[0] for t in ("vowel", "length"))

    # --seeds 0,1 (one-shot only, to stay cheap): each seed's runs under one parent; seed 0 is the run above
    # (its experts reused from the store, the same numbers), seed 1 trains its own; the table is their mean ± std
    out2 = tmp_path / "cmp-seeds"
    result = CliRunner().invoke(main, ["compare", str(spec), "--address", "in-process", "--out", str(out2),
                                       "--strategies", "oneshot", "--merges", "task_arithmetic",
                                       "--seeds", "0,1"])
    assert result.exit_code == 0, result.output
    seeded = json.loads((out2 / "compare.json").read_text())
    assert seeded["seeds"] == [0, 1] and sorted(seeded["per_seed"]) == ["0", "1"]
    per_seed = {s: seeded["per_seed"][str(s)]["table"] for s in (0, 1)}
    for col in ("oneshot+task_arithmetic acc", "oneshot+task_arithmetic norm", "expert", "base probe"):
        assert per_seed[0]["mean"][col] == data["table"]["mean"][col], col  # seed 0 = the spec as it is
        a, b = per_seed[0]["mean"][col], per_seed[1]["mean"][col]
        assert seeded["table"]["mean"][col] == pytest.approx((a + b) / 2)
        assert seeded["std"]["mean"][col] == pytest.approx(abs(a - b) / 2 ** 0.5)  # sample std of two
    assert "± " in (out2 / "compare.md").read_text() and "| seed 0 | seed 1 |" in (out2 / "compare.md").read_text()
    children = {(r.data.tags["mergeflow.variant"], r.data.tags["mergeflow.seed"]): r
                for r in client.search_runs([exp.experiment_id]) if r.data.tags.get(TAG_PARENT) == seeded["run_id"]}
    assert sorted(children) == [("oneshot+task_arithmetic", "0"), ("oneshot+task_arithmetic", "1")]
    experts = {}
    for (label, seed), run_ in children.items():
        rounds = json.loads(Path(client.download_artifacts(run_.info.run_id, "results.json", str(tmp_path))).read_text())
        experts[label, seed] = {t: e["uri"] for r in rounds["rounds"] for t, e in r["experts"].items()}
        for uri in experts[label, seed].values():
            assert read_provenance(uri)["finetune"]["seed"] == int(seed)
    first_oneshot = next(r for r in client.search_runs([exp.experiment_id])
                         if r.data.tags.get(TAG_PARENT) == data["run_id"] and r.data.tags["mergeflow.variant"]
                         == "oneshot+task_arithmetic")
    first = json.loads(Path(client.download_artifacts(first_oneshot.info.run_id, "results.json",
                                                      str(tmp_path / "first"))).read_text())
    assert experts["oneshot+task_arithmetic", "0"] == {t: e["uri"] for t, e in first["rounds"][0]["experts"].items()}
    assert set(experts["oneshot+task_arithmetic", "0"].values()).isdisjoint(experts["oneshot+task_arithmetic", "1"].values())
    registered = {m.name for m in client.search_registered_models()}
    assert {"tiny-merged-oneshot-task_arithmetic-seed0", "tiny-merged-oneshot-task_arithmetic-seed1"} <= registered
    metrics = client.get_run(seeded["run_id"]).data.metrics
    assert metrics["oneshot.task_arithmetic/mean_accuracy"] == pytest.approx(seeded["table"]["mean"]["oneshot+task_arithmetic acc"])
    assert metrics["oneshot.task_arithmetic/mean_accuracy_std"] == pytest.approx(
        seeded["std"]["mean"]["oneshot+task_arithmetic acc"])


def test_atm_on_validation_data(tiny_base, tmp_path):
    wf = parse_workflow(tiny_workflow_dict(tmp_path, tiny_base, strategy="atm", rounds={
        "count": 2, "start": "oneshot_merge", "validation_fraction": 0.25}))
    result = run(wf)
    assert [r.index for r in result.rounds] == [0, 1, 2]
    r0 = result.rounds[0]
    sizes = {t.name: len(load_task_data(t.name, t.dataset, t.label_names).train) for t in wf.tasks}
    held = {t: round(0.25 * n) for t, n in sizes.items()}
    # round 0: the workflow's one-shot merge of experts trained on the train split minus the held-out slice
    for task, e in r0.experts.items():
        prov = read_provenance(store_dir(wf, e))
        assert prov["data"]["part"] == "fit" and prov["data"]["train"] == sizes[task] - held[task]
    merge_checkpoints(tiny_base, {t: store_dir(wf, e) for t, e in r0.experts.items()}, "task_arithmetic",
                      {"scaling": 0.5}, tmp_path / "oneshot")
    want, got = body(tmp_path / "oneshot"), body(store_dir(wf, r0.merged))
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    # rounds 1..2 tune on the held-out slice from the previous round's merged model, then merge (the mean)
    for prev, r in zip(result.rounds, result.rounds[1:], strict=False):
        for task, e in r.experts.items():
            prov = read_provenance(store_dir(wf, e))
            assert prov["data"]["part"] == "validation" and prov["data"]["train"] == held[task]
            assert prov["parents"][0]["key"] == prev.merged.key
    assert [r.budget for r in result.rounds] == [1.0, 1.125, 1.25]
    client = MlflowClient(tracking_uri=wf.tracking.uri, registry_uri=wf.tracking.uri)
    methods = {v.tags["mergeflow.round"]: v.tags["mergeflow.method"]
               for v in client.search_model_versions(f"name = '{wf.registered_model_name}'")}
    assert methods == {"0": "task_arithmetic", "1": "linear", "2": "linear"}


def test_atm_scores_a_round_while_the_next_trains_with_the_same_results_and_patience_stops_early(tiny_base, tmp_path):
    """Without patience, round k is scored while round k+1 trains; with it, each round is scored before the
    next starts (the score decides whether there is one). Both give the same weights, scores, registry
    versions in round order and alias. Patience stops after N rounds without a better mean accuracy, and
    starts no round after that."""
    def atm(where, lr, **rounds):
        spec = tiny_workflow_dict(tmp_path / where, tiny_base, strategy="atm", rounds={"count": 3, **rounds})
        spec["finetune"] = {**spec["finetune"], "learning_rate": lr, "head_learning_rate": lr}
        wf = parse_workflow(spec)
        result = run(wf)
        client = MlflowClient(tracking_uri=wf.tracking.uri, registry_uri=wf.tracking.uri)
        versions = sorted(client.search_model_versions(f"name = '{wf.registered_model_name}'"), key=lambda v: int(v.version))
        alias = client.get_model_version_by_alias(wf.registered_model_name, wf.tracking.alias).version
        exp = client.get_experiment_by_name(wf.experiment_name)
        rounds_run = sorted(r.info.run_name for r in client.search_runs([exp.experiment_id])
                            if r.data.tags[TAG_KIND] == "round")
        return wf, result, [v.tags["mergeflow.round"] for v in versions], alias, rounds_run

    wf_a, overlapped, order_a, alias_a, runs_a = atm("overlapped", 1e-3)
    wf_b, sequential, order_b, alias_b, runs_b = atm("sequential", 1e-3, patience=10)  # never stops: same rounds
    assert order_a == order_b == ["0", "1", "2"] and alias_a == alias_b
    assert runs_a == runs_b == ["round-0", "round-1", "round-2"]
    for ra, rb in zip(overlapped.rounds, sequential.rounds, strict=True):
        assert ra.summary() == rb.summary()
        ba, bb = body(store_dir(wf_a, ra.merged)), body(store_dir(wf_b, rb.merged))
        assert ba.keys() == bb.keys() and all(torch.equal(ba[k], bb[k]) for k in ba)

    # a learning rate too small to move any fp32 weight: every round's merge equals the last, no round is
    # better than round 0, and patience 1 stops after round 1; round 2 is never started
    lines: list[str] = []
    spec = tiny_workflow_dict(tmp_path / "patience", tiny_base, strategy="atm", rounds={"count": 3, "patience": 1})
    spec["finetune"] = {**spec["finetune"], "learning_rate": 1e-12, "head_learning_rate": 1e-12}
    wf = parse_workflow(spec)
    stopped = run(wf, report=lines.append)
    assert [r.index for r in stopped.rounds] == [0, 1]
    assert stopped.rounds[0].summary()["mean"] == stopped.rounds[1].summary()["mean"]
    assert any("no improvement for 1 rounds; stopping early (patience)" in line for line in lines), lines
    assert not any(line.startswith("round 2:") for line in lines), lines
