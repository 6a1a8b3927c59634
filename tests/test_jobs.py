"""Cluster jobs for real: a head started with ``ray start --head`` (token auth, job server on a free
loopback port), ``mergeflow submit / jobs / logs --follow / stop`` as subprocesses, MLflow on SQLite."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from pipeline.jobs import EXCLUDES, JobError, package_project, submission_id
from pipeline.lineage import TAG_KIND
from pipeline.spec import parse_workflow
from tests.helpers import free_ports, tiny_workflow_dict

BIN = Path(sys.executable).parent
SECRET = "sekrit-" + secrets.token_hex(8)


def test_upload_leaves_out_stores_and_refuses_above_the_limit(tmp_path):
    project = tmp_path / "project"
    for rel in ["pipeline/a.py", ".venv/lib/x.py", ".git/HEAD", "mergeflow-store/e/model.safetensors", "mlflow.db",
                "data/big.parquet", "pipeline/__pycache__/a.pyc"]:
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_text("x" * 100)
    dest = tmp_path / "dest"
    dest.mkdir()
    size = package_project(dest, "name: w\n", project=project)
    shipped = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert shipped == ["_mergeflow_job/workflow.yaml", "pipeline/a.py"] and size == 108
    assert ".git" in EXCLUDES and ".venv" in EXCLUDES
    with pytest.raises(JobError, match=r"working_dir: .* above Ray's upload limit .*largest: pipeline/a.py"):
        package_project(tmp_path / "dest2", "name: w\n", project=project, limit=50)


@contextlib.contextmanager
def _head(tmp_path: Path, path: str):
    """A head of its own (``ray start --head --block`` in a new session) whose processes see ``path`` as
    PATH, stopped by signalling that session only: ``ray stop`` would stop every Ray on the machine."""
    import signal

    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    env = {**os.environ, **auth, "PATH": path}
    for attempt in range(3):  # a port picked free can be taken (by Ray's own randomly placed ports) before use
        port, dashboard, *agents = free_ports(6)
        log_path = tmp_path / f"head-{attempt}.log"
        head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                                 "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                 f"--dashboard-port={dashboard}",
                                 # its agents on free ports too: the defaults (52365, …) clash with other local heads
                                 f"--dashboard-agent-listen-port={agents[0]}", f"--dashboard-agent-grpc-port={agents[1]}",
                                 f"--runtime-env-agent-port={agents[2]}", f"--metrics-export-port={agents[3]}",
                                 "--disable-usage-stats"], env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 180
        while head.poll() is None and _mergeflow(env, "jobs", "--address", address, timeout=120).returncode != 0:
            assert time.time() < deadline, "the head's job server did not answer within 180 s"
            time.sleep(1)
        if head.poll() is None:
            break
        text = log_path.read_text()
        assert "port number" in text and attempt < 2, text[-3000:]  # anything but a port clash fails here
    try:
        yield address, env
    finally:
        try:
            os.killpg(head.pid, signal.SIGTERM)  # --block: ray start stops its own processes
        except ProcessLookupError:
            return
        try:
            head.wait(timeout=3)  # (its graceful stop takes ~30 s; nothing of it is under test here)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


@pytest.fixture
def ray_head(tmp_path):
    # the cluster's `python` is the one with Ray and mergeflow's dependencies, as on a cluster image
    with _head(tmp_path, f"{BIN}{os.pathsep}{os.environ['PATH']}") as head:
        yield head


def _mergeflow(env, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mergeflow"), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.e2e
def test_submit_follow_and_stop_jobs_on_a_real_head(ray_head, tiny_base, tmp_path):
    address, env = ray_head
    env = {**env, "MLFLOW_TRACKING_PASSWORD": SECRET, "AWS_SECRET_ACCESS_KEY": SECRET}
    spec = tiny_workflow_dict(tmp_path, tiny_base)
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(spec))
    wf = parse_workflow(spec)
    job_id = submission_id(wf)

    out = _mergeflow(env, "submit", str(tmp_path / "wf.yaml"), "--address", address)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"as job {job_id}" in out.stdout and f"tagged mergeflow.job_id={job_id}" in out.stdout
    again = _mergeflow(env, "submit", str(tmp_path / "wf.yaml"), "--address", address)
    assert again.returncode == 2 and job_id in again.stderr and "already" in again.stderr, again.stderr
    assert len(again.stderr.strip().splitlines()) == 1

    follow = _mergeflow(env, "logs", job_id, "--follow", "--address", address)
    assert follow.returncode == 0, follow.stderr
    assert "workflow 'tiny': MLflow run" in follow.stdout and "registered tiny-merged v1" in follow.stdout, follow.stdout
    assert follow.stdout.rstrip().endswith(f"job {job_id} ended: SUCCEEDED")
    listed = _mergeflow(env, "jobs", "--address", address, "--tracking-uri", wf.tracking.uri)

    client = MlflowClient(tracking_uri=wf.tracking.uri)
    exp = client.get_experiment_by_name(wf.experiment_name)
    runs = client.search_runs([exp.experiment_id])
    workflow_runs = [r for r in runs if r.data.tags[TAG_KIND] == "workflow"]
    assert [r.info.status for r in workflow_runs] == ["FINISHED"]
    # the job's driver tagged its workflow run with the job id: `jobs` links each job to its run in the UI
    assert workflow_runs[0].data.tags["mergeflow.job_id"] == job_id
    run_link = f"/#/experiments/{exp.experiment_id}/runs/{workflow_runs[0].info.run_id}?"
    assert any(line.startswith(job_id) and "SUCCEEDED" in line and "tiny" in line and run_link in line
               for line in listed.stdout.splitlines()), listed.stdout
    for r in runs:  # credentials passed to the job are never recorded
        assert SECRET not in str(r.data.params) and SECRET not in str(r.data.tags)
    assert SECRET not in follow.stdout + listed.stdout

    # a long job, stopped while it trains: STOPPED, and its runs end KILLED, none left RUNNING
    long_spec = tiny_workflow_dict(tmp_path / "long", tiny_base, name="long")
    long_spec["finetune"] = {**long_spec["finetune"], "max_steps": 100000}
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(long_spec))
    out = _mergeflow(env, "submit", str(tmp_path / "long.yaml"), "--address", address)
    assert out.returncode == 0, out.stderr
    long_id = submission_id(parse_workflow(long_spec))
    deadline = time.time() + 300
    while "fine-tuning" not in _mergeflow(env, "logs", long_id, "--address", address).stdout:
        assert time.time() < deadline, "the long job never started fine-tuning"
        time.sleep(1)
    stopped = _mergeflow(env, "stop", long_id, "--address", address)
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"job {long_id}: STOPPED", stopped.stdout
    long_wf = parse_workflow(long_spec)
    client = MlflowClient(tracking_uri=long_wf.tracking.uri)
    exp = client.get_experiment_by_name(long_wf.experiment_name)
    runs = client.search_runs([exp.experiment_id])
    statuses = {(r.data.tags[TAG_KIND], r.info.status) for r in runs}
    assert {"workflow", "round", "expert"} <= {kind for kind, _ in statuses}
    assert {status for _, status in statuses} == {"KILLED"}, statuses


def _python_without_torch() -> str | None:
    """A Python on this machine that lacks mergeflow's dependencies (the system's), or None."""
    for candidate in ("/usr/bin/python3", "/bin/python3"):
        if Path(candidate).exists() and subprocess.run([candidate, "-c", "import torch"],
                                                       capture_output=True).returncode != 0:
            return candidate
    return None


@pytest.mark.e2e
def test_a_cluster_whose_python_cannot_run_mergeflow_fails_the_job_in_one_line(tmp_path, tiny_base):
    # a head started with the venv's `ray` but not the venv on PATH: the job's `python` is the system's
    bare_python = _python_without_torch()
    if bare_python is None:
        pytest.skip("no Python without torch on this machine to play the cluster's wrong interpreter")
    bare = tmp_path / "bare-bin"
    bare.mkdir()
    (bare / "python").symlink_to(bare_python)
    spec = tiny_workflow_dict(tmp_path, tiny_base)
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(spec))
    with _head(tmp_path, f"{bare}{os.pathsep}/usr/bin{os.pathsep}/bin") as (address, env):
        out = _mergeflow(env, "submit", str(tmp_path / "wf.yaml"), "--address", address, "--wait")
    assert out.returncode == 1, out.stdout + out.stderr
    job_id = submission_id(parse_workflow(spec))
    assert out.stdout.rstrip().endswith(f"job {job_id} ended: FAILED"), out.stdout
    lines = [line for line in out.stdout.splitlines() if line.startswith("mergeflow job:")]
    assert len(lines) == 1 and "Traceback" not in out.stdout, out.stdout
    assert f"the cluster's python, {bare / 'python'}" in lines[0] or bare_python in lines[0], lines[0]
    assert "cannot import torch" in lines[0] and "ray start --head" in lines[0], lines[0]
