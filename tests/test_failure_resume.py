"""A step that crashes loses nothing: no half checkpoint, no registry version pointing at nothing,
runs and models marked FAILED; the next run reuses what finished and completes."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus

from pipeline.lineage import TAG_KIND
from pipeline.spec import parse_workflow
from tests.helpers import tiny_workflow_dict


def test_crash_in_merge_then_resume(tiny_base, tmp_path, monkeypatch):
    import operators.merge.engine as engine
    from pipeline.driver import run_workflow

    wf = parse_workflow(tiny_workflow_dict(tmp_path, tiny_base))
    real_merge = engine.merge_checkpoints

    def crashing_merge(*args, **kwargs):
        def boom(done, total):
            if done == 3:
                raise RuntimeError("node lost mid-merge (simulated)")
        return real_merge(*args, **{**kwargs, "progress": boom})

    monkeypatch.setattr(engine, "merge_checkpoints", crashing_merge)
    with pytest.raises(RuntimeError, match="simulated"):
        run_workflow(wf, address="in-process", report=lambda _m: None)

    client = MlflowClient(tracking_uri=wf.tracking.uri, registry_uri=wf.tracking.uri)
    exp = client.get_experiment_by_name(wf.experiment_name)
    runs = client.search_runs([exp.experiment_id])
    status = {r.data.tags[TAG_KIND]: r.info.status for r in runs if r.data.tags[TAG_KIND] in ("workflow", "merge")}
    assert status == {"workflow": "FAILED", "merge": "FAILED"}
    workflow_run = next(r for r in runs if r.data.tags[TAG_KIND] == "workflow")
    assert "simulated" in workflow_run.data.tags["mergeflow.error"]
    models = client.search_logged_models([exp.experiment_id])
    merged_models = [m for m in models if m.tags.get("mergeflow.kind") == "merged"]
    assert [m.status for m in merged_models] == [LoggedModelStatus.FAILED]
    assert all(m.status == LoggedModelStatus.READY for m in models if m.tags.get("mergeflow.kind") == "expert")
    assert client.search_registered_models() == [], "no registry version without weights"
    merged_dir = tmp_path / "store" / "tiny" / "round-000" / "merged"
    assert not merged_dir.exists() or list(merged_dir.iterdir()) == [], "no half-written merged checkpoint"
    leftovers = list((tmp_path / "store" / ".staging").iterdir())
    assert leftovers == [], "staging is cleaned up"

    # the next run reuses both finished experts and completes
    monkeypatch.setattr(engine, "merge_checkpoints", real_merge)
    lines: list[str] = []
    result = run_workflow(wf, address="in-process", report=lines.append)
    assert all(e.reused for e in result.final.experts.values())
    assert sum("already in the store, reused" in line for line in lines) == 2
    assert result.final.registered_version == "1"
