"""The cluster path: an existing Ray cluster (head + a second node, started with `ray start`) and a
real `mlflow server` on loopback; the workflow reaches both by address, as it would on a cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.spec import parse_workflow
from tests.helpers import free_ports, tiny_workflow_dict

# serial: its teardown, `ray stop --force`, stops every Ray process of the user on the machine (another
# xdist worker's private cluster too): `make test` runs it alone, after the parallel phase
pytestmark = [pytest.mark.e2e, pytest.mark.serial]
BIN = Path(sys.executable).parent


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_ports()[0]
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--serve-artifacts", "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no GenAI job runners: less CPU
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
def ray_cluster(tmp_path):
    import secrets

    port = free_ports()[0]
    # Ray clusters authenticate with a shared token: every node and the driver carry the same one.
    # It stays out of this test process (Ray caches a token per process), only in the children.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    env = {**os.environ, **auth}
    common = ["--disable-usage-stats"]
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=1",
                    "--include-dashboard=false", *common], check=True, env=env, capture_output=True)
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run([str(BIN / "ray"), "start", f"--address={address}", "--num-cpus=1", "--disable-usage-stats"],
                       check=True, env=env, capture_output=True)
        yield address, env
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True)


def test_workflow_on_existing_cluster_with_tracking_server(tiny_base, tmp_path, ray_cluster, mlflow_server):
    import json

    import mlflow.artifacts
    import yaml
    from mlflow import MlflowClient

    address, env = ray_cluster
    spec = tiny_workflow_dict(tmp_path, tiny_base)
    spec["tracking"] = {"uri": mlflow_server}
    wf = parse_workflow(spec)
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(spec))
    proc = subprocess.run([str(BIN / "mergeflow"), "run", str(tmp_path / "wf.yaml"), "--address", address, "--json"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{\n"):])
    final = result["rounds"][0]

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
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
    assert (tmp_path / "server-artifacts").is_dir()
    # expert runs were logged by workers on the cluster's nodes, through the server
    for e in final["experts"].values():
        assert len(client.get_metric_history(e["run_id"], "train_loss")) == 3
