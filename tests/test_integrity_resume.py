"""Faults between and during runs, on real MLflow (SQLite) and real processes: a stored checkpoint
corrupted on disk is caught by its publish-time checksums and rebuilt, never merged; a driver
killed with SIGKILL mid-round leaves no run RUNNING once the next run starts, and that run
finishes with the same weights and no duplicate registry version."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from pipeline.spec import parse_workflow
from tests.helpers import tiny_workflow_dict

pytestmark = pytest.mark.e2e


def tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, keyed by file and name."""
    out = {}
    for f in sorted(checkpoint.rglob("*.safetensors")):
        for name, t in load_file(f).items():
            out[f"{f.relative_to(checkpoint)}:{name}"] = t.clone()  # not a view of a file that changes later
    return out


def assert_bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), f"{k} differs"


def flip_bytes(safetensors_file: Path) -> None:
    """Change the lowest mantissa byte of a few float32 values: the tensors stay finite."""
    raw = bytearray(safetensors_file.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    start = 8 + header_len
    for i in range(4):
        raw[start + 64 + 4 * i] ^= 0x01  # float32 little-endian: byte 0 is the lowest mantissa byte
    safetensors_file.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def undisturbed(tiny_base, tmp_path_factory):
    """One undisturbed run of the tiny 2-task workflow: its spec, result and merged tensors."""
    from pipeline.driver import run_workflow

    tmp = tmp_path_factory.mktemp("undisturbed")
    wf = parse_workflow(tiny_workflow_dict(tmp, tiny_base))
    result = run_workflow(wf, address="in-process", report=lambda _m: None)
    return wf, result, tensors(Path(result.final.merged.path))


def test_corrupt_checkpoints_are_detected_and_rebuilt_never_merged(undisturbed):
    from pipeline.driver import run_workflow

    wf, first, merged_before = undisturbed
    vowel = Path(first.final.experts["vowel"].path)
    expert_file = vowel / "model.safetensors"
    expert_before = tensors(vowel)
    flip_bytes(expert_file)
    flipped = load_file(expert_file)
    assert all(torch.isfinite(t).all() for t in flipped.values()), "the corruption keeps values finite"
    assert any(not torch.equal(flipped[k], expert_before[f"model.safetensors:{k}"]) for k in flipped)
    merged_file = next(Path(first.final.merged.path).glob("*.safetensors"))
    with merged_file.open("r+b") as f:  # and the merged model's weights cut short
        f.truncate(merged_file.stat().st_size - 100)

    lines: list[str] = []
    second = run_workflow(wf, address="in-process", report=lines.append)

    corrupt = [line for line in lines if "CORRUPT" in line]
    assert len(corrupt) == 2, lines
    assert "expert 'vowel'" in corrupt[0] and "model.safetensors has other bytes" in corrupt[0]
    assert "merged model" in corrupt[1] and "bytes, " in corrupt[1] and "were published" in corrupt[1]
    experts = second.final.experts
    assert not experts["vowel"].reused, "the corrupt expert is trained again"
    assert experts["length"].reused, "the intact one is reused"
    assert not second.final.merged.reused, "the corrupt merged model is made again"
    assert_bitwise_equal(tensors(Path(experts["vowel"].path)), expert_before)
    assert_bitwise_equal(tensors(Path(second.final.merged.path)), merged_before)

    client = MlflowClient(tracking_uri=wf.tracking.uri, registry_uri=wf.tracking.uri)
    versions = client.search_model_versions(f"name = '{wf.registered_model_name}'")
    assert [str(v.version) for v in versions] == ["1"], "the same merge, rebuilt, keeps its one version"
    assert second.final.registered_version == "1"
    exp = client.get_experiment_by_name(wf.experiment_name)
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    # the rebuilt checkpoints carry checksums of their own, which hold
    import pipeline.store as store_module

    store_module._VERIFIED.clear()
    store = store_module.CheckpointStore(wf.store.root)
    assert store.verify(experts["vowel"].path) and store.verify(second.final.merged.path)


def test_driver_killed_mid_round_then_next_run_closes_its_runs_and_resumes(undisturbed, tiny_base, tmp_path):
    """The driver is a real ``mergeflow run`` process, in-process mode (no Ray): the fault under test
    is the driver's death and MLflow's record of it; Ray's own start-up would double the test's time
    (worker deaths under Ray are covered by the cluster tests)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml
    from click.testing import CliRunner

    from pipeline.attempts import TAG_DRIVER_HOST, TAG_DRIVER_PID, TAG_KILLED_REASON, driver_tags
    from pipeline.cli import main
    from pipeline.driver import run_workflow
    from pipeline.lineage import TAG_KIND, Lineage

    _, _, merged_want = undisturbed
    spec = tiny_workflow_dict(tmp_path, tiny_base)
    wf = parse_workflow(spec)
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(spec))
    experts_dir = tmp_path / "store" / "tiny" / "round-000" / "experts"
    log = (tmp_path / "driver.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mergeflow"), "run", str(tmp_path / "wf.yaml"),
                             "--address", "in-process"], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                            env={**os.environ, "COLUMNS": "200"})
    try:
        deadline = time.time() + 300
        while not list(experts_dir.glob("*/_COMPLETE")):  # the first expert is published
            assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.time() < deadline, "no expert published within 300 s"
            time.sleep(0.05)
        # a second run of the same spec on the same store while the driver lives is refused: exit 3, naming it
        busy = CliRunner().invoke(main, ["run", str(tmp_path / "wf.yaml"), "--address", "in-process"])
        assert proc.poll() is None, "the driver finished before the second run was tried"
        assert busy.exit_code == 3, busy.output
        assert f"workflow 'tiny' is already running on store {wf.store.root!r} (pid {proc.pid} on" in busy.output
        assert "MLflow run " in busy.output and "reuses every step it finished" in busy.output
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    client = MlflowClient(tracking_uri=wf.tracking.uri, registry_uri=wf.tracking.uri)
    exp = client.get_experiment_by_name(wf.experiment_name)
    left_running = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    kinds = sorted(r.data.tags[TAG_KIND] for r in left_running)
    assert {"workflow", "round", "expert"} <= set(kinds), kinds
    assert kinds.count("workflow") == 1, kinds  # the refused second run created no run at all
    dead_id = next(r.info.run_id for r in left_running if r.data.tags[TAG_KIND] == "workflow")
    # a live concurrent attempt of the same workflow (this test process) and one on another host
    lineage = Lineage(wf.tracking.uri, exp.experiment_id)
    live = lineage.start_run("tiny", kind="workflow", tags=driver_tags())
    elsewhere = lineage.start_run("tiny", kind="workflow", tags={**driver_tags(), TAG_DRIVER_HOST: "other-host"})

    lines: list[str] = []
    result = run_workflow(wf, address="in-process", report=lines.append)

    assert any(f"earlier attempt {dead_id} died" in line and "KILLED" in line for line in lines), lines
    # the killed driver's lease was left behind; its pid is gone, so the next run took it over
    assert any(f"pid {proc.pid} on" in line and "taking over" in line for line in lines), lines
    assert any(f"attempt {live} is still running" in line for line in lines)
    assert any(f"attempt {elsewhere} is RUNNING" in line and "cannot be checked" in line for line in lines)
    for r in left_running:
        after = client.get_run(r.info.run_id)
        assert after.info.status == "KILLED", (r.data.tags[TAG_KIND], after.info.status)
        reason = after.data.tags[TAG_KILLED_REASON]
        assert f"pid {r.data.tags.get(TAG_DRIVER_PID, proc.pid)}" in reason and "is gone" in reason
        assert result.run_id in reason
    lineage.end_run(live)
    lineage.end_run(elsewhere)
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    assert sum("already in the store, reused" in line for line in lines) == 1, "the published expert is reused"
    assert_bitwise_equal(tensors(Path(result.final.merged.path)), merged_want)
    versions = client.search_model_versions(f"name = '{wf.registered_model_name}'")
    assert [str(v.version) for v in versions] == ["1"]
    # nothing half-written is visible: every checkpoint directory in the store is complete
    for d in (tmp_path / "store" / "tiny").glob("round-*/*/*"):
        assert d.name.startswith(".") or (d / "_COMPLETE").is_file(), d
    # and nothing the killed driver was writing is left: the resume removed its staging (a line says so)
    staging = tmp_path / "store" / ".staging"
    assert not staging.is_dir() or list(staging.iterdir()) == [], list(staging.iterdir())
    assert not [d for d in (tmp_path / "store").rglob(".*partial-*")], "no partial copy left"


def test_resume_finishes_a_workflow_from_its_run_id_alone(tiny_base, tmp_path):
    """``mergeflow resume RUN_ID``: the spec comes from the run's own workflow.json; complete steps are
    reused, the missing ones made again, and the registry keeps its one version."""
    import shutil

    from click.testing import CliRunner

    from pipeline.cli import main
    from pipeline.driver import run_workflow

    wf = parse_workflow(tiny_workflow_dict(tmp_path, tiny_base))
    first = run_workflow(wf, address="in-process", report=lambda _m: None)
    merged_before = tensors(Path(first.final.merged.path))
    shutil.rmtree(first.final.merged.path)  # the merge is lost (say, a disk was replaced): resume makes it again
    expert_run = first.final.experts["vowel"].run_id  # any run of the workflow names it
    res = CliRunner().invoke(main, ["resume", expert_run, "--tracking-uri", wf.tracking.uri, "--address", "in-process"])
    assert res.exit_code == 0, res.output
    assert f"resuming workflow 'tiny' (run {first.run_id}, FINISHED)" in res.output
    assert res.output.count("already in the store, reused") == 2  # both experts; the merge is made again
    assert_bitwise_equal(tensors(Path(first.final.merged.path)), merged_before)
    client = MlflowClient(tracking_uri=wf.tracking.uri, registry_uri=wf.tracking.uri)
    assert [str(v.version) for v in client.search_model_versions(f"name = '{wf.registered_model_name}'")] == ["1"]
    # a run id that is not there: one line, exit 2
    res = CliRunner().invoke(main, ["resume", "0" * 32, "--tracking-uri", wf.tracking.uri])
    assert res.exit_code == 2 and "no run '000" in res.output and res.output.count("\n") == 1


def test_store_disk_full_mid_write_is_a_clear_error_and_the_next_run_with_space_completes(undisturbed, tiny_base,
                                                                                          tmp_path):
    """The store on a real filesystem that fills up: a tmpfs sized to hold one expert, not two. The run
    fails with a message that says the store is full and what to do, nothing half-written is visible,
    no run stays RUNNING, no registry version exists; with space again, the next run reuses the expert
    that made it and finishes with the undisturbed weights."""
    import os
    import subprocess

    from pipeline.driver import run_workflow
    from pipeline.store import StoreFull

    wf_want, result_want, merged_want = undisturbed
    expert_bytes = sum(f.stat().st_size for f in Path(result_want.final.experts["vowel"].path).rglob("*") if f.is_file())
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    size_kb = int(expert_bytes * 1.5) // 1024
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs as the store needs root (CAP_SYS_ADMIN)")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(store_dir)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs as the store here: {mount.stderr.strip()}")
    try:
        wf = parse_workflow(tiny_workflow_dict(tmp_path, tiny_base))
        lines: list[str] = []
        with pytest.raises(StoreFull) as failed:
            run_workflow(wf, address="in-process", report=lines.append)
        msg = str(failed.value)
        assert msg.startswith("the checkpoint store is full: writing expert 'length' to "), msg
        assert "No space left on device" in msg and "free space on the store" in msg and "run the workflow again" in msg
        # nothing half-written is visible: one complete expert, no partial copies, no staging left
        visible = [d for d in store_dir.glob("tiny/round-*/*/*")]
        assert [d.name.split("-")[0] for d in visible] == ["vowel"] and (visible[0] / "_COMPLETE").is_file(), visible
        assert not any((store_dir / ".staging").iterdir())
        client = MlflowClient(tracking_uri=wf.tracking.uri, registry_uri=wf.tracking.uri)
        exp = client.get_experiment_by_name(wf.experiment_name)
        assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
        assert not client.search_model_versions(f"name = '{wf.registered_model_name}'")
        models = {m.name: m.status for m in client.search_logged_models([exp.experiment_id])}
        assert str(models["expert-length"]) in ("LoggedModelStatus.FAILED", "FAILED"), models
        assert str(models["expert-vowel"]) in ("LoggedModelStatus.READY", "READY"), models

        # space again: the next run resumes from the expert that made it
        subprocess.run(["mount", "-o", "remount,size=64m", str(store_dir)], check=True)
        lines.clear()
        result = run_workflow(wf, address="in-process", report=lines.append)
        assert sum("expert 'vowel' already in the store, reused" in line for line in lines) == 1, lines
        assert_bitwise_equal(tensors(Path(result.final.merged.path)), merged_want)
        assert [str(v.version) for v in client.search_model_versions(f"name = '{wf.registered_model_name}'")] == ["1"]
        assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    finally:
        subprocess.run(["umount", "-l", str(store_dir)], check=False)


# --- the tracking server goes away -------------------------------------------------------------------

@pytest.fixture
def postgres_tracking_server(tmp_path):
    """``mlflow server`` on a real PostgreSQL with proxied artifacts, as infra/mlflow deploys it; yields
    (url, restart) where ``restart(down_s)`` kills the server (SIGKILL, like a crash) and, unless
    ``down_s`` is None, starts it again on the same port after ``down_s`` seconds."""
    import os
    import signal
    import socket
    import time

    from tests.helpers import Postgres, free_ports, start_mlflow_server, stop_process_group

    pg_port, port = free_ports(2)
    pg = Postgres(pg_port)
    try:
        backend = pg.start()
    except RuntimeError as exc:
        pytest.skip(f"PostgreSQL cannot run here: {exc}")
    log = tmp_path / "mlflow-server.log"
    state = {"proc": None}

    def start():
        state["proc"] = start_mlflow_server(port, backend, tmp_path / "server-artifacts", log)

    def kill(down_s: float | None):
        os.killpg(state["proc"].pid, signal.SIGKILL)
        state["proc"].wait()
        deadline = time.time() + 30
        while time.time() < deadline:  # a worker of the old server may hold the port a moment longer
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) != 0:
                    break
            time.sleep(0.1)
        if down_s is not None:
            time.sleep(down_s)
            start()

    try:
        start()
        yield f"http://127.0.0.1:{port}", kill, start
    finally:
        if state["proc"] is not None:
            stop_process_group(state["proc"])
        pg.stop()


def _kill_after_first_expert(store: Path, kill, down_s: float | None):
    """A thread that waits for the first published expert, then kills the tracking server for ``down_s``."""
    import threading
    import time

    def watch():
        deadline = time.time() + 300
        while not list(store.glob("*/round-000/experts/*/_COMPLETE")) and time.time() < deadline:
            time.sleep(0.02)
        kill(down_s)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_tracking_server_on_postgresql_down_30s_loses_nothing_and_down_for_good_fails_clearly(undisturbed, tiny_base, tmp_path,
                                                                      postgres_tracking_server):
    """The production set-up (MLflow server on PostgreSQL, proxied artifacts) killed right after the first
    expert is published and back 30 s later: every MLflow call in between waits (backoff capped at 5 s)
    and the workflow finishes as if nothing happened: same weights, every run FINISHED with its metrics,
    the merged model's artifacts equal to the store's, one registry version. Then the same server down for
    longer than ``tracking.retry_seconds``: the driver stops, naming what was not recorded, and the next
    run, once the server is back, closes the dead attempt's runs and finishes with the same weights."""
    import hashlib
    import os
    import subprocess
    import sys

    import mlflow.artifacts
    import yaml

    from pipeline.driver import run_workflow
    from pipeline.lineage import TAG_KIND

    url, kill, start = postgres_tracking_server
    _, _, merged_want = undisturbed
    wf = parse_workflow(tiny_workflow_dict(tmp_path, tiny_base, tracking={"uri": url}))
    watcher = _kill_after_first_expert(tmp_path / "store", kill, down_s=30)
    lines: list[str] = []
    result = run_workflow(wf, address="in-process", report=lines.append)
    watcher.join(timeout=120)
    assert not watcher.is_alive()

    assert_bitwise_equal(tensors(Path(result.final.merged.path)), merged_want)
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    exp = client.get_experiment_by_name(wf.experiment_name)
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * len(runs)
    kinds = sorted(r.data.tags[TAG_KIND] for r in runs)
    assert kinds.count("expert") == 2 and kinds.count("workflow") == 1 and kinds.count("merge") == 1, kinds
    for r in runs:
        if r.data.tags[TAG_KIND] == "expert":
            task = r.data.params["task"]
            assert {"train_seconds", "train_final_loss", f"eval/{task}/accuracy"} <= set(r.data.metrics), r.data.metrics
            assert len(client.get_metric_history(r.info.run_id, "train_loss")) == 3  # steps 2, 4, 6: none lost
            assert {d.dataset.name for d in r.inputs.dataset_inputs} == {f"{task}-train", f"{task}-eval"}
    versions = client.search_model_versions(f"name = '{wf.registered_model_name}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert client.get_model_version_by_alias(wf.registered_model_name, "current").version == "1"
    model = client.get_logged_model(result.final.merged.model_id)
    assert str(model.status).endswith("READY")
    got = Path(mlflow.artifacts.download_artifacts(f"{model.artifact_location}/model.safetensors",
                                                   tracking_uri=url, dst_path=str(tmp_path / "dl")))
    want = Path(result.final.merged.path) / "model.safetensors"
    assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(want.read_bytes()).digest()
    # --- down past tracking.retry_seconds: the driver (a process of its own: a failed driver exits, and the
    # next run finds its pid gone) stops with a message naming what was not recorded; once the server is
    # back, the next run closes the dead attempt's runs (none stays RUNNING) and finishes from the store
    tmp_path = tmp_path / "past-the-bound"
    spec = tiny_workflow_dict(tmp_path, tiny_base, name="tiny-b", tracking={"uri": url, "retry_seconds": 3})
    wf = parse_workflow(spec)
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(spec))
    watcher = _kill_after_first_expert(tmp_path / "store", kill, down_s=None)
    # the driver is its own process (a failed driver exits; the next run sees its pid gone)
    proc = subprocess.run([str(Path(sys.executable).parent / "mergeflow"), "run", str(tmp_path / "wf.yaml"),
                           "--address", "in-process"], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "COLUMNS": "400"})
    watcher.join(timeout=60)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    msg = " ".join(proc.stderr.split())  # the console wraps long lines
    assert f"TrackingUnavailable: the MLflow tracking server {url} did not answer for " in msg, msg
    assert " was not recorded. The workflow stops here" in msg and "run the workflow again" in msg
    assert "raise tracking.retry_seconds" in msg

    start()  # back: the next run (this process, a new attempt) closes the dead attempt's runs and resumes
    lines: list[str] = []
    result = run_workflow(wf, address="in-process", report=lines.append)
    assert any("earlier attempt" in line and "KILLED" in line for line in lines), lines
    assert sum("already in the store, reused" in line for line in lines) == 1, lines
    assert_bitwise_equal(tensors(Path(result.final.merged.path)), merged_want)
    client = MlflowClient(tracking_uri=url, registry_uri=url)
    exp = client.get_experiment_by_name(wf.experiment_name)
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    assert [str(v.version) for v in client.search_model_versions(f"name = '{wf.registered_model_name}'")] == ["1"]
