"""Checkpoints load with transformers' from_pretrained; the store publishes atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from operators.checkpoint import (
    export_task_model,
    load_task_model,
    resolve_model_path,
    validate_base_checkpoint,
)
from operators.checkpoint_files import head_names, read_provenance
from operators.tensor_io import CheckpointError
from pipeline.store import COMPLETE_MARKER, CheckpointStore, StoreError


def test_expert_round_trip_through_from_pretrained(tiny_experts, tmp_path):
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    expert = tiny_experts["vowel"]
    assert head_names(expert) == ["vowel"]
    # the body alone, with plain transformers
    body = AutoModel.from_pretrained(str(expert))
    # the task model, with mergeflow's helper, equals the body + the saved head
    model = load_task_model(expert, "vowel")
    assert model.config.id2label == {0: "consonant", 1: "vowel"}
    for k, v in body.state_dict().items():
        assert torch.equal(model.bert.state_dict()[k], v), k
    # export → a stand-alone checkpoint that transformers loads on its own
    out = export_task_model(expert, "vowel", tmp_path / "export")
    plain = AutoModelForSequenceClassification.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    enc = tok(["apple", "tree"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(plain(**enc).logits, model(**enc).logits, atol=1e-6)


def test_missing_head_is_a_clear_error(tiny_experts):
    with pytest.raises(CheckpointError, match=r"no head for task 'length' \(heads: \['vowel'\]\)"):
        load_task_model(tiny_experts["vowel"], "length")


def test_provenance_missing_says_what_to_run(tmp_path):
    with pytest.raises(CheckpointError, match="no mergeflow.json.*mergeflow run SPEC"):
        read_provenance(tmp_path)


def test_base_validation(tiny_base, tmp_path):
    assert validate_base_checkpoint(tiny_base)["model_type"] == "bert"
    assert resolve_model_path("packaged:all-minilm-l6-v2").joinpath("config.json").is_file()
    with pytest.raises(CheckpointError, match="unknown packaged model 'nope'"):
        resolve_model_path("packaged:nope")
    with pytest.raises(CheckpointError, match="no such model directory"):
        resolve_model_path(str(tmp_path / "missing"))
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    shutil.copy(tiny_base / "config.json", no_tok)
    shutil.copy(tiny_base / "model.safetensors", no_tok)
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        validate_base_checkpoint(no_tok)


def _ckpt(tmp_path: Path, name: str = "src") -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "weights.bin").write_bytes(os.urandom(1000))
    return d


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
def test_publish_is_atomic_and_marked(tmp_path, as_uri):
    root = tmp_path / "store"
    store = CheckpointStore(root.as_uri() if as_uri else str(root))
    path = store.path("wf", "round-000", "experts", "a-123")
    assert not store.is_complete(path)
    store.publish(_ckpt(tmp_path), path)
    assert store.is_complete(path)
    local = store.materialize(path)
    assert (local / "weights.bin").stat().st_size == 1000
    assert (local / COMPLETE_MARKER).is_file()
    # no staging or partial directories left around
    assert sorted(p.name for p in (root / "wf" / "round-000" / "experts").iterdir()) == ["a-123"]


def test_crash_mid_publish_leaves_nothing_visible(tmp_path, monkeypatch):
    store = CheckpointStore(str(tmp_path / "store"))
    path = store.path("wf", "x")
    src = _ckpt(tmp_path)

    def crash(*_a, **_k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="simulated"):
        store.publish(src, path)
    monkeypatch.undo()
    assert not store.is_complete(path)
    assert not Path(path).exists()
    assert [p.name for p in (tmp_path / "store" / "wf").iterdir()] == []
    with pytest.raises(StoreError, match="no complete checkpoint there"):
        store.materialize(path)


def test_incomplete_leftover_is_not_trusted_and_is_replaced(tmp_path):
    store = CheckpointStore(str(tmp_path / "store"))
    path = store.path("wf", "x")
    Path(path).mkdir(parents=True)
    (Path(path) / "config.json").write_text("half-written")
    assert not store.is_complete(path)
    store.publish(_ckpt(tmp_path), path)
    assert json.loads((Path(path) / "config.json").read_text()) == {}


def test_publishing_twice_keeps_the_first(tmp_path):
    store = CheckpointStore(str(tmp_path / "store"))
    path = store.path("k")
    store.publish(_ckpt(tmp_path, "a"), path)
    first = (Path(path) / "weights.bin").read_bytes()
    store.publish(_ckpt(tmp_path, "b"), path)
    assert (Path(path) / "weights.bin").read_bytes() == first


def test_a_baseline_key_changes_with_what_changes_its_numbers(tiny_base, tmp_path):
    """A linear probe's record is found by its content key: anything that changes its numbers changes the key."""
    import dataclasses

    from pipeline.context import ModelRef
    from pipeline.spec import parse_workflow
    from pipeline.steps import probe_key
    from tests.helpers import tiny_lm_workflow_dict, tiny_workflow_dict

    spec = tiny_workflow_dict(tmp_path, tiny_base)
    wf = parse_workflow(spec)
    task = wf.tasks[0]
    ref = ModelRef("base", "base", "", str(tiny_base), "k1")
    key = probe_key(ref, task, "digest", wf, "cpu")
    assert probe_key(ref, task, "digest", parse_workflow(spec), "cpu") == key  # the same: found again
    assert probe_key(ref, task, "digest", wf, "cuda:0") == probe_key(ref, task, "digest", wf, "cuda:1")
    changed = {
        "another model": probe_key(dataclasses.replace(ref, key="k2"), task, "digest", wf, "cpu"),
        "other rows": probe_key(ref, task, "other", wf, "cpu"),
        "labels in another order": probe_key(ref, task.model_copy(update={"labels": task.labels[::-1]}), "digest", wf, "cpu"),
        "another seed": probe_key(ref, task, "digest", parse_workflow({**spec, "finetune": {**spec["finetune"], "seed": 1}}), "cpu"),
        "longer rows": probe_key(ref, task, "digest", parse_workflow({**spec, "finetune": {**spec["finetune"], "max_length": 16}}), "cpu"),
        "a GPU": probe_key(ref, task, "digest", wf, "cuda:0"),
    }
    assert key not in changed.values() and len(set(changed.values())) == len(changed), changed

    # a causal LM's baseline is the base's own scores: its headline metric and its task's row length count
    lm_spec = tiny_lm_workflow_dict(tmp_path / "lm", tiny_base)
    lm = parse_workflow(lm_spec)
    lm_task = lm.tasks[0]
    lm_key = probe_key(ref, lm_task, "digest", lm, "cpu")
    assert probe_key(ref, lm_task.model_copy(update={"metric": "token_accuracy"}), "digest", lm, "cpu") != lm_key
    longer = {**lm_spec, "tasks": [{**lm_spec["tasks"][0], "finetune": {"max_length": 32}}, *lm_spec["tasks"][1:]]}
    assert probe_key(ref, parse_workflow(longer).tasks[0], "digest", parse_workflow(longer), "cpu") != lm_key


def test_what_a_writer_killed_mid_write_left_is_removed_and_a_live_writers_is_not(tmp_path):
    """A real process stages a checkpoint and starts publishing it, then is SIGKILLed mid-write: its staging
    directory and partial copy stay. The next run's ``remove_leftovers`` removes exactly those; this (live)
    process's staging stays, and so does one of a writer on another host (unknowable from here)."""
    import signal
    import subprocess
    import sys

    root = tmp_path / "store"
    code = f"""
import os, signal, shutil
from pathlib import Path
from pipeline.store import CheckpointStore, _writer_tag
store = CheckpointStore({str(root)!r})
d = store.staging_dir() / "ckpt"
d.mkdir()
(d / "model.safetensors").write_bytes(b"x" * 300_000)
target = Path(store.path("wf", "round-000", "experts", "e-1"))
target.parent.mkdir(parents=True)
partial = target.parent / f".{{target.name}}.partial-{{_writer_tag()}}0123abcd"
shutil.copytree(d, partial)
print(d.parent, partial, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    dead = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert dead.returncode == -signal.SIGKILL, dead.stderr
    store = CheckpointStore(str(root))
    mine = store.staging_dir()  # a live writer's (this process): never touched
    (mine / "half.bin").write_bytes(b"y" * 1000)
    left = {Path(p) for p in dead.stdout.split()}  # its staging directory and its partial copy
    assert all(p.is_dir() for p in left) and len(left) == 2
    other_host = root / ".staging" / "w~another-host~1~1~abcd"  # a writer elsewhere: unknowable, kept
    other_host.mkdir()

    removed, size = store.remove_leftovers("wf")
    assert set(removed) == left and size == 2 * 300_000
    assert mine.is_dir() and (mine / "half.bin").is_file() and other_host.is_dir()
    assert not list((root / "wf" / "round-000" / "experts").iterdir())
    assert store.remove_leftovers("wf") == ([], 0), "nothing more to remove"
