"""Recurring merge rounds: the promotion gate by hand, the three-round story on real Ray and MLflow,
idempotence (twice in a row, two at once, killed half-way), the embedded scheduler (real APScheduler)
and bad contributions. Everything runs on the pico BERT with word tasks built in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from pipeline.recurring.gate import decide, knows_nothing_score
from pipeline.spec import SpecError, load_workflow, parse_workflow
from tests.helpers import make_pretrained_pico, seeded_mlflow_db, write_task_file

ROOT = Path(__file__).resolve().parent.parent
TASKS = (("half", ["early", "late"]), ("length", ["short", "long"]), ("anyvowel", ["no", "yes"]))


# --- the gate, by hand ----------------------------------------------------------------------------

def test_gate_promotes_only_a_gain_without_a_large_drop():
    champion = {"a": 0.80, "b": 0.60, "c": 0.50}
    # mean 0.6333 → 0.7000 (+0.0667); worst b −0.02 within 0.03
    v = decide(champion, {"a": 0.79, "b": 0.58, "c": 0.73}, min_mean_gain=0.0, max_task_drop=0.03)
    assert v.promoted and v.label == "promoted"
    assert v.mean_gain == pytest.approx(0.7 - 0.6333333, abs=1e-6)
    assert v.deltas == pytest.approx({"a": -0.01, "b": -0.02, "c": 0.23})
    assert "worst task b -0.020" in v.reason
    # the same, but b falls 0.05 > 0.03: rejected, naming b and by how much
    v = decide(champion, {"a": 0.79, "b": 0.55, "c": 0.76}, min_mean_gain=0.0, max_task_drop=0.03)
    assert not v.promoted
    assert v.reason.startswith("b dropped 0.600 → 0.550 (-0.050; gate allows -0.03)")
    # no drop, but the mean gain 0.01 is below the required 0.02
    v = decide(champion, {"a": 0.81, "b": 0.61, "c": 0.51}, min_mean_gain=0.02, max_task_drop=0.03)
    assert not v.promoted and "the gain must be more than 0 and at least +0.02" in v.reason
    # equal scores are not a gain
    assert not decide(champion, dict(champion), min_mean_gain=0.0, max_task_drop=0.03).promoted
    with pytest.raises(ValueError, match="same tasks"):
        decide(champion, {"a": 1.0}, min_mean_gain=0.0, max_task_drop=0.03)


def test_a_task_without_a_head_scores_its_most_frequent_label():
    assert knows_nothing_score([0, 1, 1, 2, 1]) == pytest.approx(3 / 5)
    assert knows_nothing_score([]) == 0.0


# --- spec ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pico(tiny_base, tmp_path_factory) -> Path:
    """The pico BERT pre-trained on the three tasks' joint labels: a base experts can be merged from."""
    return make_pretrained_pico(tmp_path_factory.mktemp("pretrained-pico"), tiny_base, tuple(r for r, _ in TASKS))


def _spec_dict(tmp: Path, base: Path, fresh_mlflow: bool = False, **recurring) -> dict:
    """The recurring spec; its MLflow file starts migrated (``seeded_mlflow_db``) unless ``fresh_mlflow``."""
    if not fresh_mlflow:
        seeded_mlflow_db(tmp / "mlflow.db")
    tasks = []
    for rule, labels in TASKS:
        src = tmp / "data" / f"{rule}.parquet"
        if not src.exists():
            write_task_file(src, rule, n=300, seed=len(rule))
        tasks.append({"name": rule, "dataset": {"source": str(src)}, "labels": labels})
    # the body's learning rate is low (the heads' is not): the pico base already separates the three rules,
    # so experts mostly train their heads and a 3-expert average keeps each task. At 1e-3 the story's second
    # round hung on the CPU's rounding: on one machine it was promoted, on an AMD EPYC half fell 0.867 -> 0.733
    # in the average and the round was rejected. At 1e-4 there: round 2 half +0.133, anyvowel +0.250, length
    # +0; round 3's flipped labels drop half by 0.483 against the gate's 0.05.
    return {
        "name": "tinyrec", "base_model": str(base), "tasks": tasks,
        "finetune": {"max_steps": 60, "batch_size": 16, "learning_rate": 1e-4, "head_learning_rate": 1e-2,
                     "max_length": 12, "log_every": 20},
        "resources": {"num_cpus": 1},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "store": {"root": str(tmp / "store")},
        "recurring": {"contributions": str(tmp / "contributions"), "gate": {"max_task_drop": 0.05},
                      "schedule": {"interval": "2s"}, **recurring},
    }


def _write_spec(tmp: Path, base: Path, fresh_mlflow: bool = False, **recurring) -> Path:
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(_spec_dict(tmp, base, fresh_mlflow, **recurring)))
    return path


def _problems(data: dict) -> list[str]:
    with pytest.raises(SpecError) as err:
        parse_workflow(data, "spec.yaml")
    return err.value.problems


def test_recurring_spec_errors_name_the_field(tmp_path, tiny_base):
    good = _spec_dict(tmp_path, tiny_base)
    wf = parse_workflow(good)
    assert wf.recurring.schedule.interval_seconds == 2 and wf.recurring.replay
    assert [t.name for t in wf.gate_tasks] == ["half", "length", "anyvowel"]

    def with_recurring(**changes) -> dict:
        return {**good, "recurring": {**good["recurring"], **changes}}

    (p,) = _problems(with_recurring(schedule={"cron": "61 * * * *"}))
    assert p.startswith("recurring.schedule: ") and "'61 * * * *' is not a crontab expression" in p
    assert "higher than the maximum value (59)" in p
    (p,) = _problems(with_recurring(schedule={"cron": "0 2 * *"}))
    assert "Wrong number of fields" in p
    (p,) = _problems(with_recurring(schedule={"cron": "0 2 * * *", "timezone": "Mars/Olympus"}))
    assert p.startswith("recurring.schedule.timezone: ") and "'Mars/Olympus'" in p
    (p,) = _problems(with_recurring(schedule={"interval": "soon"}))
    assert "recurring.schedule.interval" in p and "'soon' is not an interval" in p
    (p,) = _problems(with_recurring(schedule={"cron": "0 2 * * *", "interval": "1h"}))
    assert "not both" in p
    (p,) = _problems(with_recurring(gate={"tasks": ["half", "sentiment"]}))
    assert "recurring.gate.tasks: names ['sentiment']" in p
    (p,) = _problems(with_recurring(gate={"max_task_drop": -0.1}))
    assert p.startswith("recurring.gate.max_task_drop")
    (p,) = _problems(with_recurring(champion_alias="x", challenger_alias="x"))
    assert "both 'x'" in p
    (p,) = _problems(with_recurring(merge={"method": "linear", "heads": "aligned"}))
    assert "recurring.merge.heads: aligned heads are not computed in recurring rounds" in p


# --- contributions: checked, bad ones named in one line ------------------------------------------

def _contribution(root: Path, cid: str, manifest: dict, table: dict | None = None) -> Path:
    d = root / cid
    d.mkdir(parents=True)
    if table is not None:
        pq.write_table(pa.table(table), d / "train.parquet")
    (d / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    return d


def test_bad_contributions_are_named_and_skipped(tmp_path, tiny_base, tiny_experts):
    from pipeline.recurring.contributions import find

    spec = _write_spec(tmp_path, tiny_base)
    wf = load_workflow(spec)
    root = tmp_path / "contributions"
    words = {"text": ["abc", "nop", "xyzzy", "mmmmm"], "label": ["early", "late", "late", "early"]}
    _contribution(root, "01-good", {"task": "half", "data": "train.parquet"}, words)
    _contribution(root, "02-unknown-task", {"task": "sentiment", "data": "train.parquet"}, words)
    _contribution(root, "03-bad-label", {"task": "half", "data": "train.parquet"},
                  {"text": ["abc", "nop"], "label": ["early", "middle"]})
    _contribution(root, "04-no-column", {"task": "half", "data": "train.parquet"}, {"word": ["abc"], "label": ["early"]})
    adapter = tmp_path / "adapter"
    (adapter / "heads" / "half").mkdir(parents=True)
    (adapter / "heads" / "half" / "head.safetensors").write_bytes(b"\0" * 16)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "target_modules": ["query"]}))
    (adapter / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    _contribution(root, "05-corrupt-adapter", {"task": "half", "checkpoint": str(adapter)})
    _contribution(root, "06-expert", {"task": "vowel", "checkpoint": str(tiny_experts["vowel"])})
    (root / "07-uploading").mkdir()  # no manifest yet: an upload in progress, not a contribution
    (root / "07-uploading" / "train.parquet").write_bytes(b"partial")
    found = {c.id: c for c in find(wf)}
    assert set(found) == {"01-good", "02-unknown-task", "03-bad-label", "04-no-column", "05-corrupt-adapter",
                          "06-expert"}
    good = found["01-good"]
    assert good.ok and good.kind == "data" and good.rows == 4 and len(good.digest) == 16
    problems = {cid: c.problem for cid, c in found.items() if not c.ok}
    assert "\n" not in "".join(problems.values())
    assert "task 'sentiment' is not a task of workflow 'tinyrec' (half, length, anyvowel)" in problems["02-unknown-task"]
    assert "row 1 has label 'middle', which is not among the declared labels ['early', 'late']" in problems["03-bad-label"]
    assert "column 'text'" in problems["04-no-column"] or "'text'" in problems["04-no-column"]
    assert "adapter" in problems["05-corrupt-adapter"] and "not a usable checkpoint" in problems["05-corrupt-adapter"]
    assert "task 'vowel' is not a task of workflow" in problems["06-expert"]

    # `mergeflow contribute` refuses the same inputs before writing anything: one line, exit 2
    from pipeline.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "abc", "label": "middle"}\n{"text": "nop", "label": "late"}\n')
    res = CliRunner().invoke(main, ["contribute", str(spec), str(bad), "--task", "half", "--id", "08-bad"])
    assert res.exit_code == 2
    assert res.output.count("\n") == 1 and "contribution '08-bad'" in res.output and "'middle'" in res.output
    assert not (root / "08-bad").exists()
    res = CliRunner().invoke(main, ["contribute", str(spec), str(bad), "--task", "nope"])
    assert res.exit_code == 2 and "task 'nope' is not a task of workflow" in res.output
    # rows that are in the gate's eval split are dropped: contributing the declared source adds only its train split
    res = CliRunner().invoke(main, ["contribute", str(spec), str(tmp_path / "data" / "half.parquet"), "--task", "half",
                                    "--id", "09-all"])
    assert res.exit_code == 0, res.output
    assert "240 training rows (60 in the gate's eval split dropped)" in res.output
    assert (root / "09-all" / "manifest.yaml").is_file() and (root / "09-all" / "half.parquet").is_file()


def test_a_round_that_keeps_crashing_is_given_up_and_the_service_moves_on(tmp_path, tiny_base):
    from pipeline.recurring.contributions import find
    from pipeline.recurring.history import history
    from pipeline.recurring.round import MAX_FAILURES, RoundState, run_round
    from pipeline.store import CheckpointStore

    spec = _write_spec(tmp_path, tiny_base)
    wf = load_workflow(spec)
    assert CliRunner().invoke(_main(), ["contribute", str(spec), str(tmp_path / "data" / "half.parquet"),
                                        "--task", "half", "--id", "01-half"]).exit_code == 0
    (c,) = find(wf)
    # the plan a crashed round leaves, after MAX_FAILURES crashes (each recorded by the failing attempt)
    state = RoundState(wf, CheckpointStore(wf.store.root))
    state.write_plan(1, {"round": 1, "planned_at": "2026-11-26T00:00:00Z", "planned_by": "pid 1 on elsewhere",
                         "champion": {"version": None, "kind": "base", "path": "", "key": "", "uri": ""},
                         "contributions": [{**c.record(), "manifest": c.manifest}], "skipped": [], "waiting": [],
                         "replay": {}, "failures": [f"RuntimeError: out of memory #{i}" for i in range(MAX_FAILURES)]})
    out = run_round(wf, address="in-process", report=lambda m: None)
    assert out.status == "failed" and out.round == 1
    assert out.reason.startswith("failed 3 times, last: RuntimeError: out of memory #2; its contributions are set aside")
    assert state.rounds()[0][2]["verdict"] == "failed"
    # the next firing does not retry it: the contribution counts as consumed, nothing else is new
    assert run_round(wf, address="in-process", report=lambda m: None).status == "nothing_to_do"
    assert [(r.round, r.verdict, r.status) for r in history(wf)] == [("1", "failed", "FAILED"),
                                                                     ("-", "nothing_to_do", "FINISHED")]


def test_an_expert_contributed_as_a_checkpoint_is_fused_as_it_is(tmp_path, pico):
    """A finished expert (a mergeflow expert checkpoint of the task) joins the round unchanged: no training;
    it is copied into the store once (checksummed), and its head is the fused model's head of its task."""
    from operators.checkpoint_files import HEAD_WEIGHTS, HEADS_DIR
    from operators.data import load_task_data
    from operators.finetune import finetune
    from pipeline.recurring.round import run_round
    from pipeline.spec import DatasetSpec, FinetuneSpec

    spec = _write_spec(tmp_path, pico)
    wf = load_workflow(spec)
    data = load_task_data("length", DatasetSpec(source=str(tmp_path / "data" / "length.parquet")), ["short", "long"])
    finetune(pico, data, FinetuneSpec(max_steps=40, batch_size=16, learning_rate=1e-3, head_learning_rate=1e-2,
                                      max_length=12), tmp_path / "length-expert", torch_threads=1)
    res = CliRunner().invoke(_main(), ["contribute", str(spec), str(tmp_path / "length-expert"), "--task", "length",
                                       "--id", "01-length-expert", "--contributor", "erin"])
    assert res.exit_code == 0, res.output
    assert "for task 'length': an expert" in res.output
    lines: list[str] = []
    out = run_round(wf, address="in-process", report=lines.append)
    assert out.status == "promoted", out.reason
    assert any("expert 'length' contributed as a checkpoint (01-length-expert)" in m for m in lines)
    assert not any("[expert" in m or "fine-tuning" in m for m in lines)
    assert out.verdict.challenger["length"] > out.verdict.champion["length"]
    store = Path(wf.store.root) / "tinyrec"
    (imported,) = (store / "recurring" / "imported").iterdir()
    assert (imported / "_COMPLETE").is_file()
    (merged,) = (store / "round-001" / "merged").iterdir()
    head = HEADS_DIR + "/length/" + HEAD_WEIGHTS
    assert (merged / head).read_bytes() == (tmp_path / "length-expert" / head).read_bytes()


# --- the three-round story on real Ray and real MLflow ---------------------------------------------

def _registry(tmp: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _alias(client, alias: str) -> str:
    return str(client.get_model_version_by_alias("tinyrec-merged", alias).version)


def _relabelled(tmp: Path) -> Path:
    """The half task with every label inverted: a contributor whose labelling pipeline broke.

    (The README's story on MiniLM uses shuffled labels, which the gate rejects there; a pico head
    fine-tuned from the champion's keeps most of its accuracy through 60 steps of shuffled labels,
    so here the labels are flipped: a contribution that is certainly harmful.)
    """
    t = pq.read_table(tmp / "data" / "half.parquet").to_pydict()
    flip = {"early": "late", "late": "early"}
    out = tmp / "half-relabelled.jsonl"
    out.write_text("".join(json.dumps({"text": x, "label": flip[y]}) + "\n" for x, y in zip(t["text"], t["label"], strict=True)))
    return out


@pytest.mark.e2e
def test_three_round_story(tmp_path, pico):
    from pipeline.cli import main

    spec = _write_spec(tmp_path, pico)
    wf = load_workflow(spec)
    data = tmp_path / "data"
    runner = CliRunner()

    def contribute(src: Path, task: str, cid: str) -> None:
        res = runner.invoke(main, ["contribute", str(spec), str(src), "--task", task, "--id", cid])
        assert res.exit_code == 0, res.output

    contribute(data / "half.parquet", "half", "001-half")
    contribute(data / "length.parquet", "length", "002-length")
    # a bad contribution beside them (written by hand: `contribute` would refuse it) never blocks them
    _contribution(tmp_path / "contributions", "002b-unknown", {"task": "sentiment", "data": "x.parquet"},
                  {"text": ["a"], "label": ["b"]})
    lines: list[str] = []
    # one local Ray cluster for the whole story (every round's runtime finds it and uses it)
    import ray

    from pipeline.runtime import WORKER_ENV

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": dict(WORKER_ENV)})
    try:
        _story(tmp_path, spec, wf, contribute, lines)
    finally:
        ray.shutdown()


def _story(tmp_path: Path, spec: Path, wf, contribute, lines: list[str]) -> None:
    from pipeline.cli import main
    from pipeline.recurring.history import history, plot, table
    from pipeline.recurring.round import run_round

    data = tmp_path / "data"
    runner = CliRunner()
    r1 = run_round(wf, num_cpus=2, report=lines.append)
    assert r1.status == "promoted", r1.reason
    assert (r1.round, r1.version, r1.champion_before, r1.champion_after) == (1, "1", None, "1")
    assert [c.id for c in r1.contributions] == ["001-half", "002-length"]
    assert [c.id for c in r1.skipped] == ["002b-unknown"]
    assert r1.verdict.champion["anyvowel"] == r1.verdict.challenger["anyvowel"]  # no head yet on either side
    assert r1.verdict.challenger["half"] > r1.verdict.champion["half"]
    reg = _registry(tmp_path)
    assert _alias(reg, "champion") == _alias(reg, "challenger") == "1"
    v1 = reg.get_model_version("tinyrec-merged", "1")
    assert v1.tags["mergeflow.gate"] == "promoted" and v1.tags["mergeflow.contributions"] == "001-half:half,002-length:length"

    contribute(data / "anyvowel.parquet", "anyvowel", "003-anyvowel")
    r2 = run_round(wf, num_cpus=2, report=lines.append)
    assert r2.status == "promoted", r2.reason
    assert (r2.round, r2.version, r2.champion_before, r2.champion_after) == (2, "2", "1", "2")
    assert any("replaying the accepted data of half, length" in m for m in lines)
    assert r2.verdict.challenger["anyvowel"] > r2.verdict.champion["anyvowel"]
    assert _alias(reg, "champion") == "2"

    contribute(_relabelled(tmp_path), "half", "004-half-relabelled")
    r3 = run_round(wf, num_cpus=2, report=lines.append)
    assert r3.status == "rejected"
    assert (r3.round, r3.version, r3.champion_after) == (3, "3", "2")
    assert r3.reason.startswith("half dropped "), r3.reason
    assert _alias(reg, "champion") == "2" and _alias(reg, "challenger") == "3"
    v3 = reg.get_model_version("tinyrec-merged", "3")
    assert v3.tags["mergeflow.gate"] == "rejected" and v3.tags["mergeflow.gate.reason"] == r3.reason

    # nothing new: nothing trained, nothing registered, the aliases stay
    r4 = run_round(wf, num_cpus=2, report=lines.append)
    assert r4.status == "nothing_to_do" and "no new contributions" in r4.reason
    assert len(reg.search_model_versions("name = 'tinyrec-merged'")) == 3
    experts = reg.search_runs([reg.get_experiment_by_name("tinyrec").experiment_id], "tags.`mergeflow.kind` = 'expert'")
    # round 1: half, length; round 2: anyvowel + replays of half and length; round 3: half (shuffled) + replays
    # of length and anyvowel
    by_round = sorted((int(r.data.tags["mergeflow.round"]), r.data.tags["mergeflow.task"]) for r in experts)
    assert by_round == [(1, "half"), (1, "length"), (2, "anyvowel"), (2, "half"), (2, "length"),
                        (3, "anyvowel"), (3, "half"), (3, "length")]
    assert all(r.info.status == "FINISHED" for r in experts)

    rows = history(wf)
    assert [(r.round, r.verdict) for r in rows] == [("1", "promoted"), ("2", "promoted"), ("3", "rejected"),
                                                    ("-", "nothing_to_do")]
    assert [(r.champion_before, r.champion_after) for r in rows[:3]] == [("base", "1"), ("1", "2"), ("2", "2")]
    assert "002b-unknown: contributions" not in rows[0].skipped and rows[0].skipped.startswith("002b-unknown: ")
    text = table(rows)
    assert "| 3 |" in text and "half dropped" in text and "v2 → v2" in text
    png = plot(rows, tmp_path / "history.png")
    assert png.stat().st_size > 5000
    res = runner.invoke(main, ["history", str(spec)])
    assert res.exit_code == 0 and res.output == text


# --- idempotence under faults: killed half-way, two at once ---------------------------------------

def _mergeflow(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _merged_weights(store: Path) -> dict:
    from safetensors.torch import load_file

    (merged,) = (store / "tinyrec" / "round-001" / "merged").iterdir()
    out = {}
    for f in sorted(merged.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


@pytest.mark.e2e
def test_a_round_killed_half_way_is_finished_by_the_next_with_the_same_weights(tmp_path, tiny_base):
    # the uninterrupted reference
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref_spec = _write_spec(ref_dir, tiny_base)
    for rule in ("half", "length"):
        assert CliRunner().invoke(_main(), ["contribute", str(ref_spec), str(ref_dir / "data" / f"{rule}.parquet"),
                                            "--task", rule, "--id", f"0-{rule}"]).exit_code == 0
    from pipeline.recurring.round import run_round

    assert run_round(load_workflow(ref_spec), address="in-process", report=lambda m: None).round == 1

    work = tmp_path / "work"
    work.mkdir()
    spec = _write_spec(work, tiny_base)
    for rule in ("half", "length"):
        assert CliRunner().invoke(_main(), ["contribute", str(spec), str(work / "data" / f"{rule}.parquet"),
                                            "--task", rule, "--id", f"0-{rule}"]).exit_code == 0
    proc = _mergeflow("round", str(spec), "--address", "in-process")
    seen = []
    for line in proc.stdout:  # kill the driver while the second expert trains (the first is in the store)
        seen.append(line)
        if "[expert length] round 1: fine-tuning" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    plan = work / "store" / "tinyrec" / "recurring" / "rounds" / "round-0001"
    assert (plan / "plan.json").is_file() and not (plan / "verdict.json").exists()

    said: list[str] = []  # the next call (here, in this process) finishes it
    assert run_round(load_workflow(spec), address="in-process", report=said.append).round == 1
    out = "\n".join(said)
    assert "finishing the round planned at" in out and "expert 'half' already in the store, reused" in out
    assert "died" in out and "marked KILLED" in out
    a, b = _merged_weights(ref_dir / "store"), _merged_weights(work / "store")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # bitwise
    reg = _registry(work)
    assert len(reg.search_model_versions("name = 'tinyrec-merged'")) == 1
    exp = reg.get_experiment_by_name("tinyrec").experiment_id
    assert not reg.search_runs([exp], "attributes.status = 'RUNNING'")
    killed = reg.search_runs([exp], "attributes.status = 'KILLED'")
    assert {r.data.tags["mergeflow.kind"] for r in killed} >= {"round", "expert"}


def _main():
    from pipeline.cli import main

    return main


@pytest.mark.e2e
def test_two_rounds_at_once_train_once(tmp_path, tiny_base):
    spec = _write_spec(tmp_path, tiny_base, fresh_mlflow=True)  # both rounds race to create the database too
    for rule in ("half", "length"):
        assert CliRunner().invoke(_main(), ["contribute", str(spec), str(tmp_path / "data" / f"{rule}.parquet"),
                                            "--task", rule, "--id", f"0-{rule}"]).exit_code == 0
    procs = [_mergeflow("round", str(spec), "--address", "in-process") for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    worked = [o for o in outs if "round 1: gate" in o]
    assert len(worked) == 1, outs
    other = next(o for o in outs if o is not worked[0])
    assert "is already running" in other or "nothing to do" in other, other
    reg = _registry(tmp_path)
    exp = reg.get_experiment_by_name("tinyrec").experiment_id
    assert len(reg.search_model_versions("name = 'tinyrec-merged'")) == 1
    assert len(reg.search_runs([exp], "tags.`mergeflow.kind` = 'expert'")) == 2
    assert not (tmp_path / "store" / "tinyrec" / "recurring" / "lease.json").exists()


# --- the embedded scheduler (APScheduler, SQLite job store) ----------------------------------------

@pytest.mark.e2e
def test_scheduler_fires_rounds_never_overlapping_and_keeps_its_schedule_across_restarts(tmp_path, tiny_base):
    spec = _write_spec(tmp_path, tiny_base)
    db = tmp_path / "schedule.db"
    proc = _mergeflow("schedule", str(spec), "--db", str(db), "--address", "in-process", "--max-firings", "2")
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out
    assert "created" in out and "2 firing(s) done" in out
    reg = _registry(tmp_path)
    exp = reg.get_experiment_by_name("tinyrec").experiment_id
    runs = sorted(reg.search_runs([exp], "tags.`mergeflow.kind` = 'round'"), key=lambda r: r.info.start_time)
    assert len(runs) == 2 and all(r.data.tags["mergeflow.gate.verdict"] == "nothing_to_do" for r in runs)
    assert runs[0].info.end_time <= runs[1].info.start_time  # one round at a time

    # a restart keeps the stored schedule: same trigger, the next firing not reset, not doubled
    from pipeline.recurring.scheduler import serve

    slow = tmp_path / "slow.yaml"
    slow.write_text(yaml.safe_dump(_spec_dict(tmp_path, tiny_base, schedule={"interval": "1h"})))
    p = _mergeflow("schedule", str(slow), "--db", str(db), "--address", "in-process")
    lines, nexts = [], []
    for line in p.stdout:
        lines.append(line)
        if "next firing" in line and "Ctrl-C" in line:
            nexts.append(line.split("next firing ", 1)[1].split(";")[0])
            p.send_signal(signal.SIGINT)  # Ctrl-C: stops cleanly, between rounds
    p.wait(timeout=60)
    text = "".join(lines)
    assert p.returncode == 0 and "stopping: no new firings" in text and "changed" in text, text
    said: list[str] = []  # restarted (here, in this process): the stored job and its next firing are kept
    assert serve(load_workflow(slow), str(slow), db=str(db), extra_args=["--address", "in-process"],
                 report=said.append, max_firings=0) == 0
    assert any("resumed from" in m for m in said), said
    nexts.append(next(m for m in said if "Ctrl-C" in m).split("next firing ", 1)[1].split(";")[0])
    assert nexts[0] == nexts[1]
    assert len(reg.search_runs([exp], "tags.`mergeflow.kind` = 'round'")) == 2  # nothing fired meanwhile


def test_emit_kubernetes_from_the_spec(tmp_path, tiny_base):
    from pipeline.recurring.emit import render_kubernetes

    spec = tmp_path / "daily.yaml"
    spec.write_text(yaml.safe_dump(_spec_dict(tmp_path, tiny_base, schedule={"cron": "30 1 * * *",
                                                                              "timezone": "Europe/Berlin"})))
    res = CliRunner().invoke(_main(), ["schedule", str(spec), "--emit", "kubernetes", "--out", str(tmp_path / "k8s"),
                                       "--image", "registry.example/mergeflow:1"])
    assert res.exit_code == 0, res.output
    expected = render_kubernetes(name="tinyrec", spec_path=str(spec), cron="30 1 * * *", timezone="Europe/Berlin",
                                 image="registry.example/mergeflow:1")
    for name, text in expected.items():
        assert (tmp_path / "k8s" / name).read_text() == text
    cron = yaml.safe_load(expected["cronjob.yaml"])
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and cron["spec"]["timeZone"] == "Europe/Berlin"
    # an interval with no exact cron equivalent: refused, naming it
    odd = tmp_path / "odd.yaml"
    odd.write_text(yaml.safe_dump(_spec_dict(tmp_path, tiny_base, schedule={"interval": "7s"})))
    res = CliRunner().invoke(_main(), ["schedule", str(odd), "--emit", "kubernetes"])
    assert res.exit_code == 2 and "recurring.schedule.interval" in res.output


def test_round_jobs_have_their_own_submission_id(tmp_path, tiny_base):
    from pipeline.jobs import JobError, submission_id, submit

    wf = load_workflow(_write_spec(tmp_path, tiny_base))
    assert submission_id(wf, "round") == submission_id(wf).replace("mergeflow-tinyrec-", "mergeflow-tinyrec-round-")
    plain = parse_workflow({k: v for k, v in _spec_dict(tmp_path, tiny_base).items() if k != "recurring"})
    with pytest.raises(JobError, match="no recurring: section"):
        submit(plain, "", "http://127.0.0.1:1", verb="round")
