"""``mergeflow gc``: the store's old rounds go, what a registry version points at (and what it was merged
from) never does, a dry run removes nothing, and a running workflow's store is not touched."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from pipeline.attempts import driver_tags
from pipeline.cli import EXIT_BUSY, main
from pipeline.driver import RUN_LEASE, run_workflow
from pipeline.spec import parse_workflow
from pipeline.store import COMPLETE_MARKER, CheckpointStore
from tests.helpers import tiny_workflow_dict


def _checkpoints(store: Path) -> set[str]:
    return {str(p.parent.relative_to(store)) for p in store.glob(f"tiny/round-*/*/*/{COMPLETE_MARKER}")}


def test_gc_removes_old_rounds_and_never_what_a_version_points_at(tiny_base, tmp_path):
    spec = tiny_workflow_dict(tmp_path, tiny_base, strategy="atm", rounds={"count": 3})
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(spec))
    wf = parse_workflow(spec)
    result = run_workflow(wf, address="in-process", report=lambda _m: None)
    store = tmp_path / "store"
    made = _checkpoints(store)
    by_round = {r: {c for c in made if c.startswith(f"tiny/round-00{r}/")} for r in range(3)}
    assert all(len(by_round[r]) == 3 for r in range(3)), made  # 2 experts and 1 merge a round

    # every round registered a version; the user deletes round 0's (v1): nothing pins round 0 any more
    client = MlflowClient(tracking_uri=wf.tracking.uri, registry_uri=wf.tracking.uri)
    versions = {v.tags["mergeflow.round"]: v for v in client.search_model_versions(f"name = '{wf.registered_model_name}'")}
    client.delete_model_version(wf.registered_model_name, versions["0"].version)

    runner = CliRunner()
    dry = runner.invoke(main, ["gc", str(tmp_path / "wf.yaml"), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert _checkpoints(store) == made, "a dry run removes nothing"
    would = {line.split()[2] for line in dry.output.splitlines() if line.startswith("would remove ")}
    assert would == {str(store / c) for c in by_round[0]}, dry.output
    assert "gc 'tiny': would remove 3 checkpoint(s)" in dry.output

    done = runner.invoke(main, ["gc", str(tmp_path / "wf.yaml")])
    assert done.exit_code == 0, done.output
    assert _checkpoints(store) == by_round[1] | by_round[2]
    assert not (store / "tiny" / "round-000" / "experts").exists() or not any((store / "tiny" / "round-000" / "experts").iterdir())
    # round 1 is older than the last round, and stays: v2 points at its merge, which was merged from its experts
    kept = {line.split()[1].rstrip(":"): line for line in done.output.splitlines() if line.startswith("kept ")}
    merged1 = next(c for c in by_round[1] if "/merged/" in c)
    assert f"registered as {wf.registered_model_name} v{versions['1'].version}" in kept[str(store / merged1)]
    for expert in by_round[1] - {merged1}:
        assert f"needed by {Path(merged1).name}" in kept[str(store / expert)], kept
    # every remaining version's checkpoint is complete and loads; the final result is still there
    for v in client.search_model_versions(f"name = '{wf.registered_model_name}'"):
        assert (Path(v.tags["mergeflow.store_uri"]) / COMPLETE_MARKER).is_file(), v.version
    assert (Path(result.final.merged.uri) / "mergeflow.json").is_file()
    again = runner.invoke(main, ["gc", str(tmp_path / "wf.yaml")])
    assert "removed 0 checkpoint(s)" in again.output, again.output


def test_gc_keeps_every_round_asked_and_refuses_a_running_workflows_store(tiny_base, tmp_path):
    spec = tiny_workflow_dict(tmp_path, tiny_base, strategy="atm", rounds={"count": 2})
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(spec))
    wf = parse_workflow(spec)
    run_workflow(wf, address="in-process", report=lambda _m: None)
    client = MlflowClient(tracking_uri=wf.tracking.uri, registry_uri=wf.tracking.uri)
    for v in client.search_model_versions(f"name = '{wf.registered_model_name}'"):
        client.delete_model_version(wf.registered_model_name, v.version)
    made = _checkpoints(tmp_path / "store")
    out = CliRunner().invoke(main, ["gc", str(tmp_path / "wf.yaml"), "--keep-rounds", "5"])  # more than there are
    assert out.exit_code == 0 and _checkpoints(tmp_path / "store") == made, out.output

    # a live driver of the workflow holds its lease (this process, as a run would): gc refuses, exit 3
    store = CheckpointStore(wf.store.root)
    store.write_record(store.path("tiny", RUN_LEASE), {**driver_tags(), "since": 0, "expires": 4e9})
    busy = CliRunner().invoke(main, ["gc", str(tmp_path / "wf.yaml")])
    assert busy.exit_code == EXIT_BUSY and "gc waits until no run of it writes" in busy.output, busy.output
    assert _checkpoints(tmp_path / "store") == made
    store.break_lease(store.path("tiny", RUN_LEASE))
    others = {p.name for p in (tmp_path / "store" / "tiny").iterdir() if not p.name.startswith("round-")}
    gone = CliRunner().invoke(main, ["gc", str(tmp_path / "wf.yaml"), "--keep-rounds", "0"])
    assert gone.exit_code == 0 and _checkpoints(tmp_path / "store") == set(), gone.output
    # records, baselines and evaluations outside the rounds stay (the lease was released: not among them)
    assert others - {RUN_LEASE} <= {p.name for p in (tmp_path / "store" / "tiny").iterdir()}


def test_gc_refuses_a_registry_it_cannot_trust_and_honours_every_registered_models_versions(tiny_base, tmp_path):
    from tests.helpers import seeded_mlflow_db

    spec = tiny_workflow_dict(tmp_path, tiny_base, strategy="atm", rounds={"count": 2})
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(spec))
    wf = parse_workflow(spec)
    run_workflow(wf, address="in-process", report=lambda _m: None)
    store = tmp_path / "store"
    made = _checkpoints(store)
    runner = CliRunner()
    # a tracking URI that is not the workflow's (no database; a database without its experiment): its registry
    # would pin nothing, so gc removes nothing and says why (exit 2)
    for other, why in ((tmp_path / "nowhere.db", "no MLflow database there"),
                       (seeded_mlflow_db(tmp_path / "other.db"), "no experiment 'tiny' there")):
        out = runner.invoke(main, ["gc", str(tmp_path / "wf.yaml"), "--tracking-uri", f"sqlite:///{other}"])
        assert out.exit_code == 2 and why in out.output, out.output
        assert _checkpoints(store) == made

    # the workflow's own versions deleted; a version of another registered model (as `compare` registers its
    # variants) points at round 0's merge: it stays, with the experts it was merged from
    client = MlflowClient(tracking_uri=wf.tracking.uri, registry_uri=wf.tracking.uri)
    for v in client.search_model_versions(f"name = '{wf.registered_model_name}'"):
        client.delete_model_version(wf.registered_model_name, v.version)
    merged0 = next(c for c in made if c.startswith("tiny/round-000/merged/"))
    client.create_registered_model("tiny-merged-atm-variant")
    client.create_model_version("tiny-merged-atm-variant", source=str(store / merged0),
                                tags={"mergeflow.store_uri": str(store / merged0)})
    done = runner.invoke(main, ["gc", str(tmp_path / "wf.yaml")])
    assert done.exit_code == 0, done.output
    assert _checkpoints(store) == made, "round 0 is pinned by the variant's version, round 1 is the last round"
    assert f"{store / merged0}: registered as tiny-merged-atm-variant v1" in done.output
    assert sum("needed by " + Path(merged0).name in line for line in done.output.splitlines()) == 2
