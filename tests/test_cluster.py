"""The cluster path: an existing 3-node Ray cluster (a head and two workers of one CPU each, started with
`ray start`), which the workflow reaches by address, as it would on a cluster:

- experts fine-tuned by 2 Ray Train workers (DDP over gloo) spread over the nodes, one worker killed
  mid-training (Ray Train restarts the group from its last resume state), and the merge split by tensors into
  3 parts, one per node, put together into the one-process merge byte for byte;
- with a real `mlflow server` on loopback, a worker node dies mid-expert.

One cluster for both (starting one costs half a minute); the test that kills a node goes last."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.spec import parse_workflow
from tests.helpers import (
    free_ports,
    make_tiny_causal_lm,
    start_mlflow_server,
    stop_process_group,
    tiny_lm_workflow_dict,
    tiny_workflow_dict,
    wait_for_mlflow_server,
)

# serial: its teardown, `ray stop --force`, stops every Ray process of the user on the machine (another
# xdist worker's private cluster too): `make test` runs it alone, after the parallel phase
pytestmark = [pytest.mark.e2e, pytest.mark.serial]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def mlflow_server_starting(tmp_path_factory):
    """An ``mlflow server`` launched, not yet waited for: it starts while the Ray nodes do."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_ports()[0]
    proc = start_mlflow_server(port, f"sqlite:///{root / 'server.db'}", root / "server-artifacts", wait=False)
    yield proc, port, root
    stop_process_group(proc, grace_s=3)


@pytest.fixture
def mlflow_server(mlflow_server_starting, ray_cluster):
    proc, port, _ = mlflow_server_starting
    wait_for_mlflow_server(proc, port)
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def ray_cluster(mlflow_server_starting):
    """A head and two worker nodes, one CPU each, started with `ray start` (one cluster for this file's tests:
    the multi-worker test first, then the one that loses a worker node)."""
    import secrets

    port = free_ports()[0]
    # Ray clusters authenticate with a shared token: every node and the driver carry the same one.
    # It stays out of this test process (Ray caches a token per process), only in the children.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    env = {**os.environ, **auth}
    common = ["--disable-usage-stats", "--num-cpus=1"]
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
                   check=True, env=env, capture_output=True)
    address = f"127.0.0.1:{port}"
    try:
        for _ in range(2):  # one after the other: two nodes starting at once on one machine time out
            subprocess.run([str(BIN / "ray"), "start", f"--address={address}", *common],
                           check=True, env=env, capture_output=True)
        yield address, env
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)


def _raylets(gcs_port: int) -> dict[str, int]:
    """node id → raylet pid of this cluster's worker nodes (the head's left out)."""
    import re

    import psutil

    out = {}
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if not cmd or not cmd[0].endswith("/raylet"):
            continue
        joined = " ".join(cmd)
        node = next((a.split("=", 1)[1] for a in cmd if a.startswith("--node_id=")), None)
        if node and re.search(rf"--gcs-address=\S+:{gcs_port}\b", joined) and "__internal_head__" not in joined:
            out[node] = proc.pid
    return out


def _kill_node(raylet_pid: int) -> None:
    """A node lost at once: its raylet and everything under it (workers, agents) SIGKILLed."""
    import psutil

    raylet = psutil.Process(raylet_pid)
    for proc in [raylet, *raylet.children(recursive=True)]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def _kill_one_train_worker_after_first_resume_state(train_dir: Path, done: threading.Event, killed: list[int]) -> None:
    """As soon as Ray Train has registered a multi-worker expert's first resume state, SIGKILL one of its workers."""
    import psutil

    def registered() -> bool:  # Ray Train has taken a resume state in (it restarts from the last one registered)
        for f in train_dir.glob("*/checkpoint_manager_snapshot.json"):
            try:
                if json.loads(f.read_text()).get("latest_checkpoint_result"):
                    return True
            except ValueError:  # being written
                pass
        return False

    while not done.is_set():
        if registered():
            for proc in psutil.process_iter(["cmdline", "pid"]):
                if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
                    proc.kill()
                    killed.append(proc.info["pid"])
                    return
        time.sleep(0.05)


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name not in ("mergeflow.json", "_COMPLETE")}


def test_multiworker_experts_and_a_merge_split_over_three_nodes(tmp_path, ray_cluster):
    from mlflow import MlflowClient

    from operators.finetune import finetune
    from operators.merge.engine import merge_checkpoints
    from operators.merge.output import output_plan
    from operators.merge.split import part_shard_bytes
    from operators.tensor_io import TensorReader
    from pipeline.context import task_data

    address, env = ray_cluster
    base = make_tiny_causal_lm(tmp_path / "base")
    spec = tiny_lm_workflow_dict(tmp_path, base, resources={
        "num_cpus": 1, "workers_per_expert": 2, "placement": "spread", "resume_every": 4, "max_retries": 2,
        "merge_workers": 3})
    spec["tasks"] = spec["tasks"][:1]  # one expert: a worker group takes two of the three nodes' slots
    spec["finetune"].update(mode="full", max_steps=12, batch_size=8, log_every=1)
    wf = parse_workflow(spec)
    (tmp_path / "wf.yaml").write_text(json.dumps(spec))
    done, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_one_train_worker_after_first_resume_state,
                               args=(tmp_path / "store" / ".train", done, killed), daemon=True)
    watcher.start()
    try:
        proc = subprocess.run([str(BIN / "mergeflow"), "run", str(tmp_path / "wf.yaml"), "--address", address, "--json"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    finally:
        done.set()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (tmp_path / "driver.log").write_text(proc.stderr + proc.stdout)
    assert killed, "a Ray Train worker was killed mid-training"
    final = json.loads(proc.stdout[proc.stdout.index("{\n"):])["rounds"][0]
    client = MlflowClient(tracking_uri=wf.tracking.uri)

    # 1. every expert: trained by 2 workers, its loss curve the one-worker expert's at the same global batch
    resumed = []
    for name, e in final["experts"].items():
        run = client.get_run(e["run_id"])
        assert run.data.tags["mergeflow.workers"] == "2" and run.data.tags["mergeflow.strategy"] == "ddp"
        if "mergeflow.resumed_from_step" in run.data.tags:
            resumed.append(int(run.data.tags["mergeflow.resumed_from_step"]))
        curve: dict[int, float] = {}
        for m in sorted(client.get_metric_history(e["run_id"], "train_loss"), key=lambda m: m.timestamp):
            curve[m.step] = m.value  # (steps after the resume state, before the kill, are logged twice: the last)
        task = wf.task(name)
        one = finetune(base, task_data(task, "all", 0.0, task.dataset.split_seed), wf.finetune_for(task), None)
        assert sorted(curve) == [s for s, _ in one.losses] == list(range(1, 13))
        for step, loss in one.losses:
            assert curve[step] == pytest.approx(loss, rel=1e-4), (name, step)
    assert resumed and resumed[0] % 4 == 0, "the killed group went on from a resume state, not from step 0"
    assert not any((tmp_path / "store" / ".train").glob("*/checkpoint_*")), "resume states go once the expert is in"

    # 2. the merge: three parts, one on each node, put together into the one-process merge, byte for byte
    merged = Path(final["merged"])
    run = client.get_run(client.get_logged_model(final["merged_model_id"]).source_run_id)
    prov = json.loads((merged / "mergeflow.json").read_text())
    assert prov["split"]["parts"] == 3
    nodes = {p.get("mergeflow.ray_node_id") for p in prov["parts"]}
    assert len(nodes) == 3, f"spread: each part on its own node, got {prov['parts']}"
    assert run.data.metrics["merge_parts"] == 3 and run.data.metrics["merge_part_peak_rss_mb_max"] > 0
    assert len(run.data.tags["mergeflow.merge_part_nodes"].split(",")) == 3
    experts = {t: Path(e["uri"]) for t, e in final["experts"].items()}
    ref = TensorReader(merged)
    shard = part_shard_bytes(output_plan(ref.keys(), ref, None), 2 * 1024**3, 3)
    ref.close()
    one = merge_checkpoints(base, experts, wf.merge.method, wf.merge.params, tmp_path / "one", max_shard_bytes=shard)
    assert len(one.output_files) >= 3
    assert _digests(merged) == _digests(tmp_path / "one")
    assert not list((tmp_path / "store").rglob("*.parts/*")), "the parts' folders are gone once put together"


def test_workflow_on_existing_cluster_with_tracking_server_and_a_node_lost_mid_expert(
        tiny_base, tmp_path, ray_cluster, mlflow_server, mlflow_server_starting):
    """The driver on a 3-node cluster, lineage through the tracking server. As soon as an expert runs on a
    worker node, that node is killed (raylet, workers, agents): Ray retries the expert on a node that is left
    and the workflow finishes with merged weights bitwise equal to an undisturbed run of the same spec."""

    import mlflow.artifacts
    import yaml
    from mlflow import MlflowClient

    from pipeline.driver import run_workflow
    from tests.test_integrity_resume import assert_bitwise_equal, tensors

    address, env = ray_cluster
    spec = tiny_workflow_dict(tmp_path, tiny_base)
    spec["finetune"].update(max_steps=300, log_every=50)  # a few seconds per expert: time to lose a node under it
    reference = parse_workflow({**spec, "tracking": {"uri": f"sqlite:///{tmp_path / 'ref.db'}"},
                                "store": {"root": str(tmp_path / "ref-store")}})
    want = tensors(Path(run_workflow(reference, address="in-process", report=lambda _m: None).final.merged.path))
    spec["tracking"] = {"uri": mlflow_server}
    wf = parse_workflow(spec)
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(spec))
    nodes = _raylets(int(address.rsplit(":", 1)[1]))
    assert len(nodes) == 2, nodes
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    log = (tmp_path / "driver.log").open("w")
    proc = subprocess.Popen([str(BIN / "mergeflow"), "run", str(tmp_path / "wf.yaml"), "--address", address, "--json"],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        lost = victim = None
        deadline = time.time() + 300
        while lost is None:  # the first expert seen running on a worker node: kill that node
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "driver.log").read_text()[-3000:]
            exp = client.get_experiment_by_name(wf.experiment_name)
            for run in client.search_runs([exp.experiment_id], "tags.`mergeflow.kind` = 'expert' and "
                                          "attributes.status = 'RUNNING'") if exp else []:
                node = run.data.tags.get("mergeflow.ray_node_id")
                if node in nodes and "train_loss" in run.data.metrics:  # training, not just scheduled
                    lost, victim = node, run.info.run_id
                    _kill_node(nodes[node])
                    break
            time.sleep(0.1)
        out, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, out[-3000:] + (tmp_path / "driver.log").read_text()[-3000:]
    result = json.loads(out[out.index("{\n"):])
    final = result["rounds"][0]
    # with a tracking server, the printed links point at its own UI (nothing to serve by hand)
    assert f"workflow run:       {mlflow_server}/#/experiments/" in out and "serve them with" not in out, out[-2000:]
    assert_bitwise_equal(tensors(Path(final["merged"])), want)  # a local store: its URI is the path
    exp = client.get_experiment_by_name(wf.experiment_name)
    retried = client.get_run(victim)
    assert retried.info.status == "FINISHED"
    assert retried.data.tags["mergeflow.ray_node_id"] != lost, "the retry ran on the node that is left"
    assert retried.data.tags["mergeflow.attempt"] == "2" and lost in retried.data.tags["mergeflow.retried_after"]
    models = [m for m in client.search_logged_models([exp.experiment_id]) if m.source_run_id == victim]
    # the lost attempt's model is FAILED (it never got weights), the retry's READY: none left PENDING
    assert sorted(str(m.status).rsplit(".", 1)[-1] for m in models) == ["FAILED", "READY"], models
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")

    version = client.get_model_version_by_alias(wf.registered_model_name, "current")
    model = client.get_logged_model(final["merged_model_id"])
    assert version.source == f"models:/{model.model_id}", "registered from the LoggedModel"
    # the merged checkpoint went through the server into its artifact store, and comes back out
    # (through the registry's download URI: MLflow resolves a models:/ URI with its global tracking URI)
    download_uri = client.get_model_version_download_uri(wf.registered_model_name, version.version)
    assert download_uri == model.artifact_location
    got = Path(mlflow.artifacts.download_artifacts(artifact_uri=download_uri, dst_path=str(tmp_path / "dl"),
                                                   tracking_uri=mlflow_server))
    assert (got / "config.json").is_file() and (got / "heads" / "length" / "head.safetensors").is_file()
    assert (mlflow_server_starting[2] / "server-artifacts").is_dir()
    # expert runs were logged by workers on the cluster's nodes, through the server
    for e in final["experts"].values():
        steps = [m.step for m in client.get_metric_history(e["run_id"], "train_loss")]
        if e["run_id"] == victim:  # the lost attempt's steps, then the retry's from the start
            assert steps[-6:] == [50, 100, 150, 200, 250, 300], steps
        else:
            assert steps == [50, 100, 150, 200, 250, 300], steps
