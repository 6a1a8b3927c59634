"""Resident workers (``rounds.workers: resident``): the same weights as task workers, bit for bit; a
worker killed mid-round is restarted and the round completes with the same weights; a crash between
two checkpoints resumes from the last one, with the same final weights and no second registry version."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from operators.checkpoint_files import head_names
from operators.merge.engine import merge_checkpoints, merge_states
from operators.state import StateCheckpoint
from operators.tensor_io import iter_tensors
from pipeline.lineage import TAG_KIND
from pipeline.spec import parse_workflow
from tests.helpers import tiny_workflow_dict


@pytest.fixture(scope="module")
def dropout_base(tmp_path_factory) -> Path:
    """The pico BERT with dropout 0.1: training draws from the random stream, so equal weights mean equal streams."""
    from tests.helpers import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("dropout") / "base", dropout=0.1)


def _weights(uri: str) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    path = Path(uri.removeprefix("file://"))
    return dict(iter_tensors(path)), {h: load_file(str(path / "heads" / h / "head.safetensors")) for h in head_names(path)}


def _same(a, b) -> bool:
    (body_a, heads_a), (body_b, heads_b) = a, b
    return (body_a.keys() == body_b.keys() and all(torch.equal(body_a[k], body_b[k]) for k in body_a)
            and heads_a.keys() == heads_b.keys()
            and all(heads_a[h].keys() == heads_b[h].keys() and all(torch.equal(heads_a[h][k], heads_b[h][k])
                                                                    for k in heads_a[h]) for h in heads_a))


def _run(tmp: Path, base: Path, address: str = "in-process", spec: dict | None = None, **rounds):
    from pipeline.driver import run_workflow

    tmp.mkdir(parents=True, exist_ok=True)
    strategy = rounds.pop("strategy", "atm")
    wf = parse_workflow(tiny_workflow_dict(tmp, base, strategy=strategy, rounds={"count": 4, **rounds}, **(spec or {})))
    lines: list[str] = []
    result = run_workflow(wf, address=address, num_cpus=2, report=lines.append)
    return wf, result, lines


@pytest.mark.parametrize("method,params", [
    ("linear", {}), ("task_arithmetic", {"scaling": 0.7}), ("ties", {"density": 0.5}), ("dare_ties", {"drop_rate": 0.5}),
    ("breadcrumbs", {}), ("consensus", {}), ("lines", {}), ("model_stock", {}), ("slerp", {}), ("tsv_m", {}),
    ("iso_c", {}), ("iso_cts", {}), ("cart", {}), ("wudi", {"iterations": 20}),
    ("della", {"density": 0.5}), ("della_linear", {"density": 0.5}), ("sce", {"select_topk": 0.5}), ("multislerp", {}),
    ("nuslerp", {}), ("nuslerp", {"flatten": False}),
    ("karcher", {}),
])
def test_in_memory_merge_is_the_streaming_merge_bit_for_bit(tiny_base, tiny_experts, tmp_path, method, params):
    """``merge_states`` runs the method functions over the same blocks as ``merge_checkpoints`` (here in
    row blocks of 64 elements, so large matrices come in pieces): the same tensors, and written out, the
    same checkpoint."""
    out = tmp_path / "disk"
    merge_checkpoints(tiny_base, tiny_experts, method, params, out, chunk_elements=64)
    state, report = merge_states(StateCheckpoint.read(tiny_base),
                                 {n: StateCheckpoint.read(p, tiny_base) for n, p in tiny_experts.items()},
                                 method, params, chunk_elements=64)
    assert report.heads == sorted(tiny_experts)
    state.write(tmp_path / "memory")
    assert _same(_weights(str(out)), _weights(str(tmp_path / "memory")))
    # merged in 3 parts (3 workers, each a run of the tensors; the heads with the first), put together: the same
    from operators.merge.registry import get_method

    base, experts = StateCheckpoint.read(tiny_base), {n: StateCheckpoint.read(p, tiny_base) for n, p in tiny_experts.items()}
    if get_method(method).prepare is not None:  # a whole-model pass first (e.g. LiNeS' depth): merged whole only
        with pytest.raises(ValueError, match="cannot be merged in parts"):
            merge_states(base, experts, method, params, part=(0, 3))
        return
    parts = [merge_states(base, experts, method, params, chunk_elements=64, part=(i, 3))[0] for i in range(3)]
    assert sorted(parts[0].heads) == sorted(tiny_experts) and not parts[1].heads and not parts[2].heads
    assert all(p.body for p in parts) and sum(len(p.body) for p in parts) == len(state.body), "disjoint, and all"
    whole = parts[0].with_parts(parts[1:])
    assert list(whole.body) == list(state.body), "the parts are runs of the tensors, in order"
    whole.write(tmp_path / "parts")
    assert _same(_weights(str(out)), _weights(str(tmp_path / "parts")))
    # the written checkpoint loads with transformers, as every mergeflow checkpoint does
    from transformers import AutoModel

    AutoModel.from_pretrained(str(tmp_path / "memory"))


def test_resident_rounds_give_task_workers_weights(dropout_base, tmp_path):
    """ATM over 4 rounds, in process, on a model with dropout: task workers, and resident workers
    checkpointing every 2 rounds. Same final weights, bit for bit. Between checkpoints nothing is written
    or registered, and every round still has its run, its experts' runs and its merge's run. (Resident
    workers checkpointing every round: the crash test below, against an uninterrupted run.)"""
    _, tasks, _ = _run(tmp_path / "tasks", dropout_base)
    wf, two, lines = _run(tmp_path / "two", dropout_base, workers="resident", checkpoint_every=2)
    assert _same(_weights(tasks.final.merged.uri), _weights(two.final.merged.uri))
    # the scores of checkpointed rounds are those of task workers
    assert [r.index for r in two.rounds] == [1, 3]
    for r in two.rounds:
        assert r.summary() == tasks.rounds[r.index].summary()
    assert "resident worker(s) started" in "\n".join(lines)

    store = tmp_path / "two" / "store" / "tiny"
    assert not (store / "round-000").exists() and not (store / "round-002").exists(), "in-memory rounds write nothing"
    assert [p.name.split("-")[0] for p in (store / "round-001" / "merged").iterdir()] == ["linear"]
    assert not (store / "round-001" / "experts").exists()
    client = MlflowClient(wf.tracking.uri, registry_uri=wf.tracking.uri)
    versions = client.search_model_versions(f"name = '{wf.registered_model_name}'")
    assert sorted(v.tags["mergeflow.round"] for v in versions) == ["1", "3"]
    runs = client.search_runs([client.get_experiment_by_name(wf.experiment_name).experiment_id])
    kinds = {}
    for r in runs:
        kinds.setdefault(r.data.tags[TAG_KIND], []).append(r)
    assert len(kinds["round"]) == 4 and len(kinds["expert"]) == 8 and len(kinds["merge"]) == 4
    assert all(r.info.status == "FINISHED" for r in runs)
    unscored = sorted(r.data.tags["mergeflow.round"] for r in kinds["round"] if r.data.tags.get("mergeflow.checkpointed") == "false")
    assert unscored == ["0", "2"]
    # an in-memory expert's run still records its training, and where its weights lived
    expert = next(r for r in kinds["expert"] if r.data.tags["mergeflow.round"] == "0")
    assert expert.data.metrics["train_steps"] > 0 and expert.data.params["workers"] == "resident"
    assert expert.data.params["start_model"] == wf.base_model


def test_resident_cold_fusion_gives_task_workers_weights(dropout_base, tmp_path):
    """ColD Fusion with one contributor a round (so a task trains a fresh head from a shared model that
    has none for it, and its dropout goes on from where the head's draw left the stream): resident
    workers checkpointing every 2 rounds give task workers' weights."""
    _, tasks, _ = _run(tmp_path / "tasks", dropout_base, strategy="cold_fusion", contributors=1, count=3)
    _, two, _ = _run(tmp_path / "two", dropout_base, strategy="cold_fusion", contributors=1, workers="resident",
                     checkpoint_every=2, count=3)
    assert _same(_weights(tasks.final.merged.uri), _weights(two.final.merged.uri))
    assert [r.index for r in two.rounds] == [1, 2]
    assert two.final.summary() == tasks.final.summary()


def test_lora_expert_in_memory_merges_as_its_adapter_directory(dropout_base, tmp_path):
    """A LoRA expert kept in memory (``AdapterCheckpoint``: A, B and the head, named as peft saves them)
    merges bit for bit as the adapter directory ``save_pretrained`` writes of it; unloading the adapter gives
    the task model back with its start weights untouched; and what goes to the object store is the adapter,
    not a copy of the model."""
    from operators.checkpoint_files import save_head
    from operators.data import load_task_data
    from operators.finetune import finetune
    from operators.state import AdapterCheckpoint
    from pipeline.spec import DatasetSpec, FinetuneSpec, LoraSpec
    from tests.helpers import write_task_file

    experts, states = {}, {}
    for rule, labels in (("vowel", ["consonant", "vowel"]), ("length", ["short", "long"])):
        data = load_task_data(rule, DatasetSpec(source=str(write_task_file(tmp_path / f"{rule}.parquet", rule, n=64))),
                              labels)
        settings = FinetuneSpec(mode="lora", lora=LoraSpec(r=4, alpha=8, dropout=0.1), max_steps=4, batch_size=16,
                                learning_rate=1e-2)
        result = finetune(dropout_base, data, settings, None, keep_model=True)
        states[rule] = AdapterCheckpoint.of_peft_model(result.model, rule, causal_lm=False)
        experts[rule] = tmp_path / f"expert-{rule}"
        result.model.save_pretrained(str(experts[rule]), safe_serialization=True)
        save_head(result.model.get_base_model(), experts[rule], rule)
        net = result.model.unload()
        base = StateCheckpoint.read(dropout_base)
        body = {k: v for k, v in net.base_model.state_dict().items() if v.is_floating_point()}
        assert body.keys() == {k for k, v in base.body.items() if v.is_floating_point()}, "no peft layer left behind"
        assert all(torch.equal(v, base.body[k]) for k, v in body.items())
        # the adapter: rank-4 A and B of each adapted 32×32 matrix (a quarter of its size, on this pico model)
        adapter = states[rule].tensors
        assert adapter and all((".lora_A." in k and t.shape[0] == 4) or (".lora_B." in k and t.shape[1] == 4)
                               for k, t in adapter.items())
        assert sum(t.numel() for t in adapter.values()) < sum(t.numel() for t in base.body.values()) / 4
    merge_checkpoints(dropout_base, experts, "ties", {"density": 0.5}, tmp_path / "disk", chunk_elements=64)
    state, report = merge_states(StateCheckpoint.read(dropout_base), states, "ties", {"density": 0.5}, chunk_elements=64)
    assert report.lora_mode == "exact" and report.heads == ["length", "vowel"]
    state.write(tmp_path / "memory")
    assert _same(_weights(str(tmp_path / "disk")), _weights(str(tmp_path / "memory")))
    # the merged body is not the base's: the adapters' updates are in it
    assert not torch.equal(state.body["encoder.layer.0.attention.self.query.weight"],
                           StateCheckpoint.read(dropout_base).body["encoder.layer.0.attention.self.query.weight"])


@pytest.mark.parametrize("model,mode", [("bert", "lora"), ("gpt2", "lora"), ("llama", "full")])
def test_resident_lora_and_causal_lm_rounds_give_task_workers_weights(dropout_base, tmp_path, model, mode):
    """ATM with LoRA experts of a classifier (with dropout), LoRA experts of a pico GPT-2 (Conv1D weights stored
    (in, out), a tied output layer) and full fine-tunes of a pico Llama, 2 rounds: resident workers checkpointing
    every 2 rounds (round 1 starts from round 0's merge held in memory) give task workers' final weights bit
    for bit. A resident LoRA expert's run says it is LoRA, and the
    checkpointed merge names each expert's adapter and the start it was trained on."""
    from pipeline.driver import run_workflow
    from tests.helpers import make_tiny_causal_lm, tiny_lm_workflow_dict

    if model == "bert":  # task vectors from the base: round 1's adapters fold into round 0's merge held in memory
        spec = {"finetune": {"mode": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.1}, "max_steps": 4,
                             "batch_size": 16, "learning_rate": 1e-2}}
        (_, tasks, _), (wf, res, _) = (_run(tmp_path / "tasks", dropout_base, spec=spec, count=2,
                                            task_vectors_from="base"),
                                       _run(tmp_path / "res", dropout_base, spec=spec, count=2, workers="resident",
                                            checkpoint_every=2, task_vectors_from="base"))
    else:
        base = make_tiny_causal_lm(tmp_path / model, model)

        def lm(tmp: Path, **rounds):
            d = tiny_lm_workflow_dict(tmp, base, strategy="atm", rounds={"count": 2, **rounds})
            d["finetune"].update(mode=mode, lora={"r": 4, "alpha": 8, "dropout": 0.1})
            wf = parse_workflow(d)
            return wf, run_workflow(wf, address="in-process", num_cpus=2, report=lambda _m: None)

        (_, tasks), (wf, res) = lm(tmp_path / "tasks"), lm(tmp_path / "res", workers="resident", checkpoint_every=2)
    assert _same(_weights(tasks.final.merged.uri), _weights(res.final.merged.uri))
    assert [r.index for r in res.rounds] == [1], "round 0 lived in memory; round 1 started from it"
    # the same scores of the merged model (NaN where a pico LM's expert gains nothing over the base: 0/0); a
    # resident LoRA expert is scored with its adapter applied rather than folded: the same up to float rounding
    merged, want = res.final.summary(), tasks.final.summary()
    assert json.dumps({t: r["merged"] for t, r in merged.items()}) == json.dumps({t: r["merged"] for t, r in want.items()})
    assert all(merged[t]["expert"] == pytest.approx(want[t]["expert"], abs=0.05) for t in want)
    from operators.checkpoint_files import read_provenance

    prov = read_provenance(Path(res.final.merged.uri.removeprefix("file://")))
    experts = prov["parents"][1:]
    assert {e["format"] for e in experts} == {"peft-lora-adapter" if mode == "lora" else "full"}
    if mode == "lora":
        starts = {(e["adapter_base"]["kind"], e["adapter_base"]["key"]) for e in experts}
        if model == "bert":  # task vectors from the base: the merge's base is the base; the adapters' start, round 0's
            assert prov["parents"][0]["kind"] == "base" and len(starts) == 1 and next(iter(starts))[0] == "merged"
        else:  # the round's start is the merge's base
            assert starts == {(prov["parents"][0]["kind"], prov["parents"][0]["key"])}, "trained on the round's start"
        client = MlflowClient(wf.tracking.uri)
        run = client.get_run(experts[0]["run_id"])
        assert run.data.tags["mergeflow.finetune_mode"] == "lora" and run.data.params["workers"] == "resident"


@pytest.mark.parametrize("every", [2, 1])
def test_crash_between_checkpoints_resumes_from_the_last_one(tiny_base, tmp_path, monkeypatch, every):
    """A crash in round 2 of 4 (after round 1's checkpoint; every 2 rounds, or every round so that two
    checkpoints come before it): the next run restores round 1 from the store, runs rounds 2 and 3 only,
    and ends with the uninterrupted run's weights; no round gets a second registry version, and what the
    earlier checkpoints scored still decides where the alias goes."""
    import operators.finetune as ft
    from pipeline.driver import run_workflow

    scored = [k for k in range(4) if (k + 1) % every == 0 or k == 3]
    clean_wf, clean, _ = _run(tmp_path / "clean", tiny_base, workers="resident", checkpoint_every=every)

    tmp = tmp_path / "crash"
    tmp.mkdir()
    wf = parse_workflow(tiny_workflow_dict(tmp, tiny_base, strategy="atm",
                                           rounds={"count": 4, "workers": "resident", "checkpoint_every": every}))
    real, calls = ft.finetune, []

    def crashing(*args, **kwargs):
        calls.append(args[2].seed)
        if len(calls) == 6:  # the second expert of round 2
            raise RuntimeError("node lost in round 2 (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(ft, "finetune", crashing)
    with pytest.raises(RuntimeError, match="simulated"):
        run_workflow(wf, address="in-process", report=lambda _m: None)
    client = MlflowClient(wf.tracking.uri, registry_uri=wf.tracking.uri)
    before = sorted(v.tags["mergeflow.round"] for v in client.search_model_versions(f"name = '{wf.registered_model_name}'"))
    assert before == [str(k) for k in scored if k < 2]

    calls.clear()
    lines: list[str] = []
    result = run_workflow(wf, address="in-process", report=lines.append)
    assert any("round 1: restored from its checkpoint" in line for line in lines)
    assert len(calls) == 4, "only rounds 2 and 3 train again (2 experts each)"
    assert _same(_weights(clean.final.merged.uri), _weights(result.final.merged.uri))
    assert [r.index for r in result.rounds] == [k for k in scored if k >= 1]
    clean_round_1 = next(r for r in clean.rounds if r.index == 1)
    assert result.rounds[0].summary() == clean_round_1.summary(), "the restored round scores as it did"
    versions = client.search_model_versions(f"name = '{wf.registered_model_name}'")
    assert sorted(v.tags["mergeflow.round"] for v in versions) == [str(k) for k in scored], "no second version"
    # the alias follows the best round as in the uninterrupted run (the restored round's score is remembered)
    clean_client = MlflowClient(clean_wf.tracking.uri, registry_uri=clean_wf.tracking.uri)
    alias_round = clean_client.get_model_version_by_alias(clean_wf.registered_model_name,
                                                          clean_wf.tracking.alias).tags["mergeflow.round"]
    assert client.get_model_version_by_alias(wf.registered_model_name,
                                             wf.tracking.alias).tags["mergeflow.round"] == alias_round


@pytest.mark.e2e
def test_resident_worker_killed_mid_round_restarts_with_the_same_weights(tiny_base, tmp_path):
    """On a local Ray cluster: SIGKILL the resident worker (a Ray actor) while it trains an expert of round
    1. Ray restarts it and runs the call again from the round's start weights, which wait in the object
    store; the workflow completes with the weights of a run that was never disturbed. (Checkpoints
    every 2 rounds, so round 1 starts from round 0's merge held in memory, which the 2 workers merged in
    two parts, and round 1's checkpoint is written whole from both parts.)"""
    tmp = tmp_path / "killed"
    tmp.mkdir()
    spec = tiny_workflow_dict(tmp, tiny_base, strategy="atm", rounds={"count": 3, "workers": "resident",
                                                                      "checkpoint_every": 2})
    spec["finetune"]["max_steps"] = 300  # 100 steps a round: long enough to be caught mid-training
    wf = parse_workflow(spec)
    # undisturbed: the same spec in process (resident = task workers, bit for bit, is tested above)
    _, reference, _ = _run(tmp_path / "reference", tiny_base, spec={"finetune": spec["finetune"]}, count=3,
                           workers="resident", checkpoint_every=2)
    client = MlflowClient(wf.tracking.uri)
    killed: list[int] = []

    def kill_mid_round() -> None:
        deadline = time.time() + 300
        while not killed and time.time() < deadline:
            try:
                exp = client.get_experiment_by_name(wf.experiment_name)
                runs = client.search_runs([exp.experiment_id], "tags.`mergeflow.kind` = 'expert' and "
                                          "tags.`mergeflow.round` = '1'") if exp else []
            except Exception:  # the database is being created
                runs = []
            for r in runs:
                if "mergeflow.pid" in r.data.tags and r.info.status == "RUNNING":
                    os.kill(int(r.data.tags["mergeflow.pid"]), signal.SIGKILL)
                    killed.append(int(r.data.tags["mergeflow.pid"]))
                    return
            time.sleep(0.2)

    from pipeline.driver import run_workflow

    killer = threading.Thread(target=kill_mid_round, daemon=True)
    killer.start()
    result = run_workflow(wf, address="local", num_cpus=2, report=lambda _m: None)
    killer.join(timeout=5)
    assert killed, "no resident worker was caught training round 1"
    assert _same(_weights(reference.final.merged.uri), _weights(result.final.merged.uri))
    retried = client.search_runs([client.get_experiment_by_name(wf.experiment_name).experiment_id],
                                 "tags.`mergeflow.attempt` = '2'")
    assert len(retried) == 1 and retried[0].data.tags["mergeflow.round"] == "1"
    assert int(retried[0].data.tags["mergeflow.pid"]) != killed[0], "the call ran again in a new process"
    assert "died mid-step" in retried[0].data.tags["mergeflow.retried_after"]


def test_resident_spec_is_validated(tiny_base, tmp_path):
    """Resident workers' limits are refused at load time, naming the field and the fix; the execution
    settings do not change the spec hash (they change no weight)."""
    def spec(**over):
        d = tiny_workflow_dict(tmp_path, tiny_base, strategy="atm", seed_mlflow=False)
        d["rounds"] = {"count": 2, "workers": "resident", **over.pop("rounds", {})}
        d.update(over)
        return d

    with pytest.raises(ValueError, match="checkpoint_every: 2 needs workers: resident"):
        parse_workflow(spec(rounds={"workers": "tasks", "checkpoint_every": 2}))
    with pytest.raises(ValueError, match="strategy 'oneshot' has one round"):
        parse_workflow(spec(strategy="oneshot"))
    with pytest.raises(ValueError, match="rounds.merge 'regmean'"):
        parse_workflow(spec(rounds={"merge": {"method": "regmean"}}))
    with pytest.raises(ValueError, match="oneshot_merge"):
        parse_workflow(spec(rounds={"start": "oneshot_merge", "validation_fraction": 0.2}))
    with pytest.raises(ValueError, match="checkpoint_every"):
        parse_workflow(spec(rounds={"checkpoint_every": 0}))
    with pytest.raises(ValueError, match="rounds.patience: 2 counts rounds without improvement"):
        parse_workflow(spec(rounds={"checkpoint_every": 2, "patience": 2}))
    plain = parse_workflow(spec(rounds={"workers": "tasks"}))
    assert parse_workflow(spec(rounds={"checkpoint_every": 3})).spec_hash() == plain.spec_hash()


def test_a_merge_run_again_after_its_worker_died_marks_the_dead_attempts_model_failed(tiny_base, tiny_experts, tmp_path,
                                                                                      monkeypatch):
    """Ray runs a merge again when its worker dies. The first attempt had made a PENDING LoggedModel and
    tagged the run with where it ran; the second attempt says it is attempt 2 and marks that model FAILED,
    so no model is left PENDING and the run's READY model is the one with weights (task and resident merges)."""
    from pipeline import context, resident, steps
    from pipeline.lineage import Lineage

    wf = parse_workflow(tiny_workflow_dict(tmp_path, tiny_base, strategy="atm", rounds={"count": 2, "workers": "resident"}))
    lineage = Lineage.init(wf.tracking.uri, wf.experiment_name)
    ctx = context.StepContext(wf, wf.tracking.uri, lineage.experiment_id, "wf-run", wf.base_model)
    base = context.base_ref(wf)
    store = ctx.store()
    experts = {t: context.ModelRef("expert", t, store.path("experts", t), store.uri(store.path("experts", t)), f"key-{t}")
               for t in tiny_experts}
    for t, p in tiny_experts.items():
        store.publish(p, experts[t].path, move=False)
    for name, step in (("task", lambda run: steps.merge_step(ctx, base, experts, 0, run, "k-task")),
                       ("resident", lambda run: resident.merge_step(
                           ctx, base, {t: context.ModelRef("expert", t, "", e.uri, e.key, state=_Held(StateCheckpoint.read(
                               tiny_experts[t], tiny_base))) for t, e in experts.items()}, 0, run, "k-res", wf.rounds.merge,
                           None, durable=True).value)):
        run = lineage.start_run(f"merge-{name}", kind="merge")

        def dies(*_a, **_k):  # the worker dies once the model exists, before any weight is written
            raise SystemExit("worker died")

        with monkeypatch.context() as m:
            m.setattr(steps if name == "task" else resident, "staged_checkpoint", dies)
            with pytest.raises(SystemExit):
                step(run)
        ref = step(run)
        tags = lineage.run_tags(run)
        assert tags["mergeflow.attempt"] == "2" and "died mid-step" in tags["mergeflow.retried_after"]
        models = lineage.client.search_logged_models([lineage.experiment_id],
                                                     filter_string=f"source_run_id = '{run}'")
        assert sorted(str(m.status) for m in models) == ["FAILED", "READY"], name
        assert next(m for m in models if str(m.status) == "READY").model_id == ref.model_id


class _Held:
    """A state handle over a checkpoint already in memory (what Ray's object store hands a worker)."""

    def __init__(self, state):
        self.state, self.key = state, str(id(state))

    def get(self):
        return self.state
