"""The cluster path: an existing Ray cluster (head + a second node, started with `ray start`) and a
real `mlflow server` on loopback; the workflow reaches both by address, as it would on a cluster."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.spec import parse_workflow
from tests.helpers import tiny_workflow_dict

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--serve-artifacts", "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    import urllib.request

    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail("mlflow server exited at start")
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("mlflow server did not answer /health within 90 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def ray_cluster(tmp_path, monkeypatch):
    import secrets

    port = _free_port()
    # Ray clusters authenticate with a shared token: every node and the driver carry the same one
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    for k, v in auth.items():
        monkeypatch.setenv(k, v)
    env = {**os.environ, **auth}
    common = ["--disable-usage-stats"]
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=1",
                    "--include-dashboard=false", *common], check=True, env=env, capture_output=True)
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run([str(BIN / "ray"), "start", f"--address={address}", "--num-cpus=1", *common],
                       check=True, env=env, capture_output=True)
        yield address
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)


def test_workflow_on_existing_cluster_with_tracking_server(tiny_base, tmp_path, ray_cluster, mlflow_server):
    import ray
    from mlflow import MlflowClient

    from pipeline.driver import run_workflow

    spec = tiny_workflow_dict(tmp_path, tiny_base)
    spec["tracking"] = {"uri": mlflow_server}
    wf = parse_workflow(spec)
    result = run_workflow(wf, address=ray_cluster, report=lambda _m: None)
    assert not ray.is_initialized(), "the driver disconnects; the cluster stays up"

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    version = client.get_model_version_by_alias(wf.registered_model_name, "current")
    model = client.get_logged_model(result.final.merged.model_id)
    assert version.source == model.artifact_location
    # the merged checkpoint went through the server into its artifact store, and comes back out
    import mlflow.artifacts

    got = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(tmp_path / "dl"),
                                                   tracking_uri=mlflow_server))
    assert (got / "config.json").is_file() and (got / "heads" / "length" / "head.safetensors").is_file()
    assert (tmp_path / "server-artifacts").is_dir()
    # expert runs were logged by workers on the cluster's nodes through the server
    for e in result.final.experts.values():
        assert len(client.get_metric_history(e.run_id, "train_loss")) == 3
