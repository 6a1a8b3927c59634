"""Past one worker per expert and one process per merge, on a real 3-node Ray cluster (a head and two workers
started with `ray start`, one CPU each): every expert fine-tuned by 2 Ray Train workers (DDP over gloo) spread
over the nodes, one worker killed mid-training (Ray Train restarts the group from its last resume state), and
the merge split by tensors into 3 parts, one per node, put together into the one-process merge byte for byte."""

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
from tests.helpers import free_ports, make_tiny_causal_lm, tiny_lm_workflow_dict

# serial: its teardown, `ray stop --force`, stops every Ray process of the user on the machine
pytestmark = [pytest.mark.e2e, pytest.mark.serial]
BIN = Path(sys.executable).parent


@pytest.fixture
def three_nodes():
    import secrets

    port = free_ports()[0]
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    env = {**os.environ, **auth}
    common = ["--disable-usage-stats", "--num-cpus=1"]
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", "--include-dashboard=false", *common],
                   check=True, env=env, capture_output=True)
    address = f"127.0.0.1:{port}"
    try:
        for _ in range(2):  # one after the other: two nodes starting at once on one machine time out
            subprocess.run([str(BIN / "ray"), "start", f"--address={address}", *common], check=True, env=env,
                           capture_output=True)
        yield address, env
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)


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


def test_multiworker_experts_and_a_merge_split_over_three_nodes(tmp_path, three_nodes):
    from mlflow import MlflowClient

    from operators.finetune import finetune
    from operators.merge.engine import merge_checkpoints, output_plan
    from operators.merge.split import part_shard_bytes
    from operators.tensor_io import TensorReader
    from pipeline.context import task_data

    address, env = three_nodes
    base = make_tiny_causal_lm(tmp_path / "base")
    spec = tiny_lm_workflow_dict(tmp_path, base, resources={
        "num_cpus": 1, "workers_per_expert": 2, "placement": "spread", "resume_every": 8, "max_retries": 2,
        "merge_workers": 3})
    spec["tasks"] = spec["tasks"][:1]  # one expert: a worker group takes two of the three nodes' slots
    spec["finetune"].update(mode="full", max_steps=48, batch_size=8, log_every=1)
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
        assert sorted(curve) == [s for s, _ in one.losses] == list(range(1, 49))
        for step, loss in one.losses:
            assert curve[step] == pytest.approx(loss, rel=1e-4), (name, step)
    assert resumed and resumed[0] % 8 == 0, "the killed group went on from a resume state, not from step 0"
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
