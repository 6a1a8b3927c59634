"""The checkpoint store on a real S3-compatible server (moto in server mode, on loopback).

pyarrow talks S3 to it over HTTP exactly as to AWS (endpoint and credentials from the environment:
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...): checkpoints published with their marker last,
downloaded file by file and checked against their manifest, small records and leases for recurring
rounds, and a whole workflow through Ray whose experts and merged model live in the bucket.
"""

from __future__ import annotations

import json
import os

import pyarrow.fs as pafs
import pytest
from click.testing import CliRunner

from pipeline.spec import parse_workflow
from pipeline.store import COMPLETE_MARKER, CheckpointStore, CorruptCheckpoint, StoreError, fetch_checkpoint
from tests.helpers import tiny_workflow_dict

moto_server = pytest.importorskip("moto.server", reason="moto[server] is a dev dependency (make setup installs it)")

BUCKET = "mergeflow-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free loopback port; the environment points pyarrow (and Ray workers) at it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "MERGEFLOW_CACHE": str(tmp_path_factory.mktemp("s3-cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", access_key="testing",
                           secret_key="testing", region="us-east-1", allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    try:
        yield fs
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def test_publish_fetch_verify_on_s3(s3, tmp_path, tiny_experts):
    store = CheckpointStore(f"s3://{BUCKET}/unit")
    assert not store.is_local
    path = store.path("wf", "experts", "vowel-abc")
    # a half-uploaded checkpoint (files, no marker) is invisible to readers
    s3.create_dir(path)
    with s3.open_output_stream(f"{path}/config.json") as f:
        f.write(b"{}")
    assert not store.is_complete(path)
    with pytest.raises(StoreError, match="no complete checkpoint there"):
        store.materialize(path)
    store.publish(tiny_experts["vowel"], path, move=False)
    assert store.is_complete(path) and store.uri(path) == f"s3://{BUCKET}/unit/wf/experts/vowel-abc"
    marker = json.loads(s3.open_input_stream(f"{path}/{COMPLETE_MARKER}").read())
    local_files = sorted(str(p.relative_to(tiny_experts["vowel"])) for p in tiny_experts["vowel"].rglob("*") if p.is_file())
    assert sorted(marker["files"]) == local_files
    got = fetch_checkpoint(store.uri(path))
    assert got.is_dir() and (got / "model.safetensors").read_bytes() == (tiny_experts["vowel"] / "model.safetensors").read_bytes()
    # bytes changed in the bucket after publishing: a fresh download is refused, naming the file
    data = bytearray(s3.open_input_stream(f"{path}/model.safetensors").read())
    data[-8] ^= 0xFF
    with s3.open_output_stream(f"{path}/model.safetensors") as f:
        f.write(bytes(data))
    fresh = CheckpointStore(f"s3://{BUCKET}/unit", cache_dir=tmp_path / "other-cache")
    with pytest.raises(CorruptCheckpoint, match="model.safetensors has other bytes than were published"):
        fresh.materialize(path)


def test_records_and_leases_on_s3(s3):
    store = CheckpointStore(f"s3://{BUCKET}/records")
    rec = store.path("wf", "recurring", "rounds", "round-0001", "plan.json")
    assert store.read_record(rec) is None
    store.write_record(rec, {"round": 1, "contributions": ["a@1"]})
    assert store.read_record(rec) == {"round": 1, "contributions": ["a@1"]}
    assert store.list_names(store.path("wf", "recurring", "rounds")) == ["round-0001"]
    lease = store.path("wf", "recurring", "lease.json")
    assert store.try_lease(lease, {"holder": "first"}) is None
    assert store.try_lease(lease, {"holder": "second"}) == {"holder": "first"}
    store.break_lease(lease)
    assert store.try_lease(lease, {"holder": "second"}) is None


@pytest.mark.e2e
def test_workflow_on_s3_through_ray_resume_export_and_merge(s3, tmp_path, tiny_base):
    from transformers import AutoModelForSequenceClassification

    from pipeline.cli import main
    from pipeline.driver import run_workflow

    spec = tiny_workflow_dict(tmp_path, tiny_base, store={"root": f"s3://{BUCKET}/wf"})
    wf = parse_workflow(spec)
    lines: list[str] = []
    first = run_workflow(wf, address="local", num_cpus=2, report=lines.append)
    merged_uri = first.final.merged.uri
    assert merged_uri.startswith(f"s3://{BUCKET}/wf/tiny/round-000/merged/")
    keys = sorted(i.path for i in s3.get_file_info(pafs.FileSelector(f"{BUCKET}/wf/tiny", recursive=True))
                  if i.path.endswith(COMPLETE_MARKER))
    assert len(keys) == 3  # two experts and the merged model, each complete
    # a second run reads everything back from the bucket: nothing trained again, the same merge
    again: list[str] = []
    second = run_workflow(wf, address="in-process", report=again.append)  # (no need to start Ray again)
    assert sum("already in the store, reused" in m for m in again) == 3, again
    assert second.final.merged.uri == merged_uri
    # export and merge straight from the bucket
    out = tmp_path / "vowel-model"
    res = CliRunner().invoke(main, ["export", merged_uri, "vowel", str(out)])
    assert res.exit_code == 0, res.output
    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert model.config.num_labels == 2
    experts = {t: e.uri for t, e in first.final.experts.items()}
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(json.dumps({"base": str(tiny_base), "experts": experts, "method": "task_arithmetic",
                               "params": {"scaling": 0.5}}))
    res = CliRunner().invoke(main, ["merge", str(cfg), str(tmp_path / "merged-again"), "--quiet"])
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file

    a = load_file(str(fetch_checkpoint(merged_uri) / "model.safetensors"))
    b = load_file(str(tmp_path / "merged-again" / "model.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    # a URI with nothing complete behind it: one line, exit 2
    res = CliRunner().invoke(main, ["export", f"s3://{BUCKET}/wf/nothing-here", "vowel", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no complete checkpoint there" in res.output


@pytest.mark.e2e
def test_keys_in_the_store_uri_never_reach_the_lineage(s3, tmp_path, tiny_base):
    """A store URI with S3 keys in it (pyarrow reads them there): the run works, and the secret key is in no
    byte of the MLflow database, its artifacts, the store's files or the console; resume asks for it again."""
    from pipeline.cli import main
    from pipeline.driver import run_workflow
    from pipeline.lineage import TAG_REDACTED, Lineage

    host, port = s3.endpoint_override if hasattr(s3, "endpoint_override") else os.environ["AWS_ENDPOINT_URL"][7:].split(":")
    secret = "Z9topSECRETkeyNeverRecorded"
    root = f"s3://AKIAKEYID:{secret}@{BUCKET}/creds?endpoint_override={host}:{port}&scheme=http"
    spec = tiny_workflow_dict(tmp_path, tiny_base, store={"root": root})
    wf = parse_workflow(spec)
    lines: list[str] = []
    result = run_workflow(wf, address="in-process", report=lines.append, spec_text=json.dumps(spec))
    assert result.final.merged.uri.startswith(f"s3://{BUCKET}/creds/"), result.final.merged.uri
    # every byte written: the tracking database, every artifact next to it, every object in the bucket, the console
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".db") for p in written) and any("mlartifacts" in str(p) for p in written)
    leaks = [str(p) for p in written if secret.encode() in p.read_bytes()]
    objects = [i.path for i in s3.get_file_info(pafs.FileSelector(f"{BUCKET}/creds", recursive=True))
               if i.type == pafs.FileType.File]
    assert any(o.endswith("mergeflow.json") for o in objects)
    leaks += [o for o in objects if secret.encode() in s3.open_input_stream(o).read()]
    leaks += [line for line in lines if secret in line]
    assert not leaks, leaks
    lineage = Lineage(wf.tracking.uri, result.experiment_id)
    tags = lineage.run_tags(result.run_id)
    assert tags[TAG_REDACTED] == "store.root" and tags["mergeflow.store_root"].startswith(f"s3://***@{BUCKET}/creds?")
    # resume cannot guess the key: it asks for the store, then goes on from it (everything reused)
    res = CliRunner().invoke(main, ["resume", result.run_id, "--tracking-uri", wf.tracking.uri, "--address", "in-process"])
    assert res.exit_code == 2 and "store.root held a password or key" in res.output and "--store" in res.output, res.output
    res = CliRunner().invoke(main, ["resume", result.run_id, "--tracking-uri", wf.tracking.uri, "--address", "in-process",
                                    "--store", root])
    assert res.exit_code == 0, res.output
    assert res.output.count("already in the store, reused") == 3 and secret not in res.output, res.output
