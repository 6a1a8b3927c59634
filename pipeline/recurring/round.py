"""One recurring round: an idempotent unit that a person, a scheduler or a cluster CronJob fires.

    champion  = the registry version the champion alias points at (the base model before round 1)
    new       = contributions not yet consumed (store records), checked; bad ones skipped and recorded
    if fewer than gate.min_contributions:  record "nothing to do", exit 0, nothing trained
    plan      = round n, the champion, the contributions (one per task; later ones wait a round),
                written to the store before anything runs
    θ_c       = finetune(champion, contribution c)              for data contributions, Ray tasks
    θ_c       = the contributed expert                          for checkpoint contributions
    challenger= fuse(θ_c) keeping the champion's heads for other tasks   (ColD Fusion)
    verdict   = gate(champion, challenger on the fixed gate tasks)
    register the challenger (alias challenger); promoted → alias champion moves; rejected → tagged why

Exactly one round runs at a time per workflow: a lease in the store (created exclusively). A
second caller reports who holds it and exits 0. A round whose driver died left its plan without a
verdict: the next call closes the dead attempt's MLflow runs (KILLED), finishes that plan (the
experts already in the store are reused, the others retrained with the same seeds, so the weights
are bitwise those of an uninterrupted round) and registers once (the version is found by its model).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from operators.checkpoint_files import ADAPTER_CONFIG, HEAD_WEIGHTS, HEADS_DIR
from pipeline.attempts import TAG_KILLED_REASON, Lease, dead_because, describe_holder, driver_tags
from pipeline.context import ModelRef, StepContext, base_ref, ref_from_store, task_data
from pipeline.lineage import TAG_ROUND, TAG_SPEC_HASH, TAG_WORKFLOW_RUN, Lineage
from pipeline.recurring.contributions import (
    Contribution,
    find,
    import_checkpoint,
    prepare_expert_task,
    prepare_replay_task,
)
from pipeline.recurring.gate import Verdict, decide, knows_nothing_score
from pipeline.spec import Workflow, parse_interval
from pipeline.steps import evaluate_step
from pipeline.store import CheckpointStore, content_key

Reporter = Callable[[str], None]

TAG_RECURRING = "mergeflow.recurring"
TAG_VERDICT = "mergeflow.gate.verdict"
TAG_REASON = "mergeflow.gate.reason"
TAG_CONTRIBUTIONS = "mergeflow.contributions"
TAG_SKIPPED = "mergeflow.skipped_contributions"
TAG_CHAMPION_BEFORE = "mergeflow.champion_before"
TAG_CHAMPION_AFTER = "mergeflow.champion_after"
TAG_SCHEDULED = "mergeflow.scheduled_for"
TAG_STORE_PATH = "mergeflow.store_path"
TAG_KEY = "mergeflow.key"
MAX_FAILURES = 3  # a round that crashed this often (not stopped: crashed) is given up, so the service moves on


@dataclass
class RoundOutcome:
    """What a call of ``mergeflow round`` did."""

    status: str  # promoted | rejected | nothing_to_do | busy | failed
    round: int | None
    reason: str
    run_id: str | None = None
    version: str | None = None
    champion_before: str | None = None
    champion_after: str | None = None
    contributions: list[Contribution] = field(default_factory=list)
    skipped: list[Contribution] = field(default_factory=list)
    verdict: Verdict | None = None


# --- durable state (the store) ----------------------------------------------------------------------

class RoundState:
    """What is done, read from the store: every round's plan and verdict, the lease, skipped contributions."""

    def __init__(self, wf: Workflow, store: CheckpointStore):
        self.wf, self.store = wf, store
        self.root = store.path(wf.name, "recurring")
        self.lease_path = f"{self.root}/lease.json"
        self._lease: Lease | None = None

    def round_dir(self, n: int) -> str:
        return f"{self.root}/rounds/round-{n:04d}"

    def rounds(self) -> list[tuple[int, dict[str, Any], dict[str, Any] | None]]:
        """(round, plan, verdict or None), in round order."""
        out = []
        for name in self.store.list_names(f"{self.root}/rounds"):
            if not name.startswith("round-"):
                continue
            n = int(name.split("-", 1)[1])
            plan = self.store.read_record(f"{self.round_dir(n)}/plan.json")
            if plan is not None:
                out.append((n, plan, self.store.read_record(f"{self.round_dir(n)}/verdict.json")))
        return out

    def consumed(self, rounds: list[tuple[int, dict[str, Any], dict[str, Any] | None]]) -> set[str]:
        """Identities (id@digest) of contributions a finished round (of ``rounds``) used or skipped, or
        already reported bad."""
        seen = set((self.store.read_record(f"{self.root}/skipped.json") or {}).get("identities", []))
        for _n, plan, verdict in rounds:
            if verdict is not None:
                seen |= {f"{c['id']}@{c['digest']}" for c in plan["contributions"] + plan.get("skipped", [])}
        return seen

    def accepted_data(self, rounds: list[tuple[int, dict[str, Any], dict[str, Any] | None]]) -> dict[str, list[str]]:
        """Task → identities (id@digest) of the data contributions that promoted rounds (of ``rounds``)
        fused, oldest first."""
        out: dict[str, list[str]] = {}
        for _n, plan, verdict in rounds:
            if verdict is not None and verdict["verdict"] == "promoted":
                for c in plan["contributions"]:
                    if c["kind"] == "data":
                        out.setdefault(c["task"], []).append(f"{c['id']}@{c['digest']}")
        return out

    def remember_skipped(self, bad: list[Contribution]) -> None:
        rec = self.store.read_record(f"{self.root}/skipped.json") or {"identities": [], "reasons": {}}
        for c in bad:
            if c.identity not in rec["identities"]:
                rec["identities"].append(c.identity)
                rec["reasons"][c.identity] = c.problem
        self.store.write_record(f"{self.root}/skipped.json", rec)

    def write_plan(self, n: int, plan: dict[str, Any]) -> None:
        self.store.write_record(f"{self.round_dir(n)}/plan.json", plan)

    def write_verdict(self, n: int, verdict: dict[str, Any]) -> None:
        self.store.write_record(f"{self.round_dir(n)}/verdict.json", verdict)

    # --- the lease --------------------------------------------------------------------------------
    def acquire(self, timeout_s: int, report: Reporter) -> dict[str, Any] | None:
        """Take the round lease; ``None`` when taken, else the live holder's record."""
        self._lease = Lease(self.store, self.lease_path, timeout_s)
        return self._lease.acquire(report, f"recurring {self.wf.name!r}")

    def release(self) -> None:
        if self._lease is not None:
            self._lease.release()


# --- the round ---------------------------------------------------------------------------------------

def run_round(wf: Workflow, *, address: str | None = None, num_cpus: int | None = None, report: Reporter = print,
              scheduled_for: str | None = None) -> RoundOutcome:
    """Run the next round of recurring workflow ``wf`` (or finish an interrupted one)."""
    from pipeline.driver import preflight

    if wf.recurring is None:
        raise ValueError(f"workflow {wf.name!r} has no recurring: section; mergeflow round needs one "
                         "(see workflows/recurring-quickstart.yaml)")
    preflight(wf, report)
    store = CheckpointStore(wf.store.root)
    state = RoundState(wf, store)
    # the lease comes first: even creating a fresh MLflow database is not safe twice at once
    holder = state.acquire(parse_interval(wf.recurring.lease_timeout), report)
    if holder is not None:
        msg = f"a round of {wf.name!r} is already running ({describe_holder(holder)}); this call does nothing"
        report(msg)
        return RoundOutcome("busy", None, msg)
    try:
        lineage = Lineage.init(wf.tracking.uri, wf.experiment_name, wf.tracking.artifact_location,
                               wf.tracking.retry_seconds)
        return _round(wf, lineage, store, state, address, num_cpus, report, scheduled_for)
    finally:
        state.release()


def recurring_parent(lineage: Lineage, wf: Workflow) -> str:
    """The long-lived run every round of ``wf`` sits under (made by the first round)."""
    found = lineage.find_runs(f"tags.`{TAG_RECURRING}` = '{wf.name}' and tags.`mergeflow.kind` = 'recurring'")
    if found:
        return found[0]["run_id"]
    run_id = lineage.start_run(wf.name, kind="recurring", tags={TAG_RECURRING: wf.name, TAG_SPEC_HASH: wf.spec_hash()})
    lineage.log_params(run_id, wf.model_dump(mode="json", exclude={"tasks"}) | {
        "tasks": ",".join(t.name for t in wf.tasks)})
    lineage.log_dict(run_id, wf.model_dump(mode="json"), "workflow.json")
    lineage.end_run(run_id)  # finished, not RUNNING forever: rounds are added under it as they come
    return run_id


def close_dead_rounds(lineage: Lineage, wf: Workflow, report: Reporter) -> int:
    """End the RUNNING round runs (and their children) whose driver is gone; returns how many."""
    closed = 0
    for run in lineage.find_runs(f"tags.`{TAG_RECURRING}` = '{wf.name}' and tags.`mergeflow.kind` = 'round' "
                                 "and attributes.status = 'RUNNING'"):
        why = dead_because(run["tags"])
        if why is None:
            continue
        ended, models = lineage.end_attempt(run["run_id"], "KILLED", {TAG_KILLED_REASON: f"{why}; closed by the next round"})
        report(f"recurring {wf.name!r}: {run['name']} ({run['run_id']}) died ({why}): {ended} runs marked KILLED, "
               f"{models} unfinished models FAILED; finishing it from the store")
        closed += 1
    return closed


def champion_ref(lineage: Lineage, store: CheckpointStore, wf: Workflow) -> tuple[ModelRef, str | None]:
    """The current champion (the alias's version in the store), or the base model when there is none."""
    name = wf.registered_model_name
    version = lineage.alias_version(name, wf.recurring.champion_alias)
    if version is None:
        return base_ref(wf), None
    tags = lineage.version_tags(name, version)
    if TAG_STORE_PATH not in tags:
        raise ValueError(f"registry {name} v{version} (alias {wf.recurring.champion_alias!r}) was not made by a "
                         "recurring round (no store path tag); point the alias at a version a round registered")
    return ref_from_store(store, tags[TAG_STORE_PATH], "merged", name, tags[TAG_KEY]), version


def _ref_record(ref: ModelRef, version: str | None) -> dict[str, Any]:
    return {"version": version, "kind": ref.kind, "path": ref.path, "key": ref.key, "uri": ref.uri}


def _ref_from_plan(store: CheckpointStore, wf: Workflow, rec: dict[str, Any]) -> ModelRef:
    if rec["kind"] == "base":
        return base_ref(wf)
    return ref_from_store(store, rec["path"], "merged", wf.registered_model_name, rec["key"])


def _round(wf: Workflow, lineage: Lineage, store: CheckpointStore, state: RoundState, address: str | None,
           num_cpus: int | None, report: Reporter, scheduled_for: str | None) -> RoundOutcome:
    rec = wf.recurring
    parent = recurring_parent(lineage, wf)
    close_dead_rounds(lineage, wf, report)
    rounds = state.rounds()
    open_plans = [(n, plan) for n, plan, verdict in rounds if verdict is None]
    finished = [n for n, _plan, verdict in rounds if verdict is not None]
    if open_plans:
        n, plan = open_plans[0]
        failures = plan.get("failures", [])
        if len(failures) >= MAX_FAILURES:
            reason = (f"failed {len(failures)} times, last: {failures[-1]}; its contributions are set aside (fix "
                      "them and contribute again under a new id)")
            state.write_verdict(n, {"round": n, "verdict": "failed", "reason": reason, "version": None,
                                    "champion_before": plan["champion"]["version"],
                                    "champion_after": plan["champion"]["version"],
                                    "decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            run_id = _start_round_run(lineage, wf, parent, f"round-{n}", n, [], scheduled_for, {
                TAG_VERDICT: "failed", TAG_REASON: reason[:4000],
                TAG_CONTRIBUTIONS: ",".join(c["id"] for c in plan["contributions"]),
                TAG_CHAMPION_BEFORE: plan["champion"]["version"] or "base",
                TAG_CHAMPION_AFTER: plan["champion"]["version"] or "base"})
            lineage.end_run(run_id, "FAILED")
            report(f"round {n}: FAILED for good: {reason}")
            return RoundOutcome("failed", n, reason, run_id)
        report(f"round {n}: finishing the round planned at {plan['planned_at']} (its driver stopped before the verdict"
               + (f"; {len(failures)} earlier attempt(s) failed" if failures else "") + ")")
        chosen = [Contribution.from_record(c) for c in plan["contributions"]]
        skipped = [Contribution.from_record(c) for c in plan.get("skipped", [])]
        replay = plan.get("replay", {})
        champion = _ref_from_plan(store, wf, plan["champion"])
        champion_version = plan["champion"]["version"]
    else:
        n = (max(finished) if finished else 0) + 1
        consumed = state.consumed(rounds)
        new = [c for c in find(wf) if c.identity not in consumed]
        skipped = [c for c in new if not c.ok]
        for c in skipped:
            report(f"round {n}: contribution {c.id!r} SKIPPED: {c.problem}")
        chosen, waiting = [], []
        for c in (c for c in new if c.ok):
            (waiting if any(x.task == c.task for x in chosen) else chosen).append(c)
        for c in waiting:
            report(f"round {n}: contribution {c.id!r} ({c.task}) waits for the next round (one per task per round)")
        if len(chosen) < rec.gate.min_contributions:
            reason = (f"no new contributions in {rec.contributions}" if not chosen else
                      f"{len(chosen)} new contribution(s); the gate waits for {rec.gate.min_contributions} "
                      "(recurring.gate.min_contributions)")
            return _nothing_to_do(wf, lineage, state, parent, n, reason, skipped, report, scheduled_for)
        champion, champion_version = champion_ref(lineage, store, wf)
        replay = {t: ids for t, ids in state.accepted_data(rounds).items()
                  if rec.replay and t not in {c.task for c in chosen}}
        plan = {"round": n, "planned_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "planned_by": f"pid {os.getpid()} on {socket.gethostname()}",
                "champion": _ref_record(champion, champion_version),
                "contributions": [{**c.record(), "manifest": c.manifest} for c in chosen],
                "skipped": [c.record() for c in skipped], "waiting": [c.id for c in waiting], "replay": replay,
                "merge": rec.merge.model_dump(mode="json"), "spec_hash": wf.spec_hash()}
        state.write_plan(n, plan)
    report(f"round {n}: champion {'v' + champion_version if champion_version else 'the base model'}; "
           f"contributions {', '.join(f'{c.id} ({c.task})' for c in chosen)}"
           + (f"; replaying the accepted data of {', '.join(sorted(replay))}" if replay else ""))
    return _train_fuse_gate(wf, lineage, store, state, parent, n, chosen, skipped, replay, champion,
                            champion_version, address, num_cpus, report, scheduled_for)


def _start_round_run(lineage: Lineage, wf: Workflow, parent: str, name: str, n: int, skipped: list[Contribution],
                     scheduled_for: str | None, tags: dict[str, str]) -> str:
    """A round's MLflow run under the recurring parent, carrying its driver (for dead-attempt cleanup),
    the contributions it skipped and when it was scheduled; it is its own attempt's root."""
    tags = {TAG_RECURRING: wf.name, TAG_ROUND: str(n), **tags, **driver_tags()}
    if skipped:
        tags[TAG_SKIPPED] = "; ".join(f"{c.id}: {c.problem}" for c in skipped)[:4000]
    if scheduled_for:
        tags[TAG_SCHEDULED] = scheduled_for
    run_id = lineage.start_run(name, kind="round", parent=parent, tags=tags)
    lineage.set_tags(run_id, {TAG_WORKFLOW_RUN: run_id})
    return run_id


def _nothing_to_do(wf: Workflow, lineage: Lineage, state: RoundState, parent: str, n: int, reason: str,
                   skipped: list[Contribution], report: Reporter, scheduled_for: str | None) -> RoundOutcome:
    run_id = _start_round_run(lineage, wf, parent, f"round-{n} (nothing to do)", n, skipped, scheduled_for,
                              {TAG_VERDICT: "nothing_to_do", TAG_REASON: reason})
    if skipped:
        lineage.log_dict(run_id, {"skipped": [c.record() for c in skipped]}, "contributions.json")
    lineage.end_run(run_id)
    state.remember_skipped(skipped)  # reported once, not at every firing
    report(f"round {n}: nothing to do ({reason}); nothing was trained")
    return RoundOutcome("nothing_to_do", None, reason, run_id, skipped=skipped)


def _train_fuse_gate(wf: Workflow, lineage: Lineage, store: CheckpointStore, state: RoundState, parent: str, n: int,
                     chosen: list[Contribution], skipped: list[Contribution], replay: dict[str, list[str]],
                     champion: ModelRef,
                     champion_version: str | None, address: str | None, num_cpus: int | None, report: Reporter,
                     scheduled_for: str | None) -> RoundOutcome:
    from pipeline.driver import WORKER_PRELOAD
    from pipeline.runtime import make_runtime
    from pipeline.strategies.rounds import Rounds, ended_status

    rec = wf.recurring
    run_id = _start_round_run(lineage, wf, parent, f"round-{n}", n, skipped, scheduled_for, {
        TAG_CONTRIBUTIONS: ",".join(c.id for c in chosen), TAG_CHAMPION_BEFORE: champion_version or "base",
        TAG_SPEC_HASH: wf.spec_hash()})
    report(f"round {n}: MLflow run {run_id}")
    lineage.log_dict(run_id, {"contributions": [c.record() for c in chosen], "skipped": [c.record() for c in skipped]},
                     "contributions.json")
    ctx = StepContext(wf, wf.tracking.uri, lineage.experiment_id, run_id, wf.base_model)
    try:
        data = [c for c in chosen if c.kind == "data"]
        tasks = [prepare_expert_task(wf, c, store) for c in data]
        for c, task in zip(data, tasks, strict=True):
            split = task_data(task)
            lineage.log_dataset(run_id, name=f"contribution:{c.id}", texts=split.inputs(split.train),
                                labels=split.targets(split.train), source=c.source, digest=c.digest,
                                context="contribution")
        tasks += [prepare_replay_task(wf, store, t, ids) for t, ids in sorted(replay.items())]
        if replay:
            lineage.set_tags(run_id, {"mergeflow.replay": ",".join(f"{t}:{len(ids)}" for t, ids in sorted(replay.items()))})
        with make_runtime(address, num_cpus=num_cpus, preload=WORKER_PRELOAD) as runtime:
            steps = Rounds(ctx, runtime, lineage, store, report)
            experts = steps.finetune(champion, tasks, n, run_id)
            for c in (c for c in chosen if c.kind == "checkpoint"):
                path = import_checkpoint(wf, c, store)
                adapter = store.exists(f"{path}/{ADAPTER_CONFIG}")
                experts[c.task] = ModelRef("expert", c.task, path, store.uri(path), content_key("contribution", c.digest),
                                           adapter_base=base_ref(wf) if adapter else None)
                report(f"round {n}: expert {c.task!r} contributed as a checkpoint ({c.id})")
            heads_from = champion if champion.kind != "base" else None
            fused = steps.merge(champion, experts, n, run_id, merge=rec.merge, heads_from=heads_from)
            verdict = _gate(wf, ctx, steps, champion, fused, n, run_id)
    except BaseException as exc:
        lineage.end_attempt(run_id, ended_status(exc), {"mergeflow.ended_because": f"{type(exc).__name__}: {exc}"[:4000]})
        if ended_status(exc) == "FAILED":  # a crash, not a stop: after MAX_FAILURES the round is given up
            plan = state.store.read_record(f"{state.round_dir(n)}/plan.json")
            plan["failures"] = [*plan.get("failures", []), f"{type(exc).__name__}: {str(exc)[:300]}"]
            state.write_plan(n, plan)
        raise
    report(f"round {n}: gate {verdict.label.upper()}: {verdict.reason}")
    version = _register(wf, lineage, fused, verdict, n, chosen, champion_version, report)
    champion_after = version if verdict.promoted else champion_version
    metrics = {f"gate/{t}/champion": s for t, s in verdict.champion.items()}
    metrics |= {f"gate/{t}/challenger": s for t, s in verdict.challenger.items()}
    metrics |= {"gate/mean/champion": verdict.champion_mean, "gate/mean/challenger": verdict.challenger_mean,
                "gate/mean/gain": verdict.mean_gain, "promoted": float(verdict.promoted)}
    lineage.log_metrics(run_id, metrics, step=n)
    champion_score = verdict.challenger_mean if verdict.promoted else verdict.champion_mean
    lineage.log_metrics(parent, {"champion_gate_mean": champion_score, "challenger_gate_mean": verdict.challenger_mean},
                        step=n)
    state.write_verdict(n, {"round": n, "verdict": verdict.label, "reason": verdict.reason, "version": version,
                            "champion_before": champion_version, "champion_after": champion_after,
                            "champion": verdict.champion, "challenger": verdict.challenger,
                            "decided_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "run_id": run_id})
    lineage.set_tags(run_id, {TAG_VERDICT: verdict.label, TAG_REASON: verdict.reason,
                              TAG_CHAMPION_AFTER: champion_after or "base", "mergeflow.version": version or ""})
    lineage.end_run(run_id)
    state.remember_skipped(skipped)
    return RoundOutcome(verdict.label, n, verdict.reason, run_id, version, champion_version, champion_after,
                        chosen, skipped, verdict)


def _stored_heads(store: CheckpointStore, ref: ModelRef) -> list[str]:
    """The tasks a stored checkpoint has heads for, listed in the store (nothing downloaded)."""
    if ref.kind == "base":
        return []
    heads = f"{ref.path}/{HEADS_DIR}"
    return [t for t in store.list_names(heads) if store.exists(f"{heads}/{t}/{HEAD_WEIGHTS}")]


def _gate(wf: Workflow, ctx: StepContext, steps, champion: ModelRef, fused: ModelRef, n: int, run_id: str) -> Verdict:
    """Score champion and challenger on the gate tasks (in parallel, through ``steps``' runtime) and decide."""
    from pipeline.strategies.rounds import ended_status

    runtime, lineage = steps.runtime, steps.lineage
    gate = [t.name for t in wf.gate_tasks]
    models = {"challenger": fused, "champion": champion}
    heads = {name: [t for t in _stored_heads(steps.store, ref) if t in gate] for name, ref in models.items()}
    runs, futures = {}, {}
    for name, ref in models.items():
        if not heads[name]:
            continue
        reuse = name == "challenger" and ref.run_id and not ref.reused
        runs[name] = ref.run_id if reuse else lineage.start_run(
            f"evaluate:{name}", kind="evaluation", parent=run_id, workflow_run=run_id, tags={TAG_ROUND: str(n)})
        futures[name] = runtime.submit(evaluate_step, ctx, ref, {t: ref for t in heads[name]}, runs[name], n,
                                       prefix="gate", name=f"gate-{name}-r{n}", resources=steps.eval_resources())
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        for name, fut in futures.items():
            results[name] = runtime.result(fut)
    except BaseException as exc:
        for run in runs.values():
            lineage.end_run(run, ended_status(exc))
        raise
    for run in runs.values():
        lineage.end_run(run)
    if fused.run_id and fused.run_id not in runs.values():
        lineage.end_run(fused.run_id)  # the merge run (left open by Rounds.merge)
    scores: dict[str, dict[str, float]] = {}
    for name in models:
        scores[name] = {}
        for t in wf.gate_tasks:
            got = results.get(name, {}).get(t.name)
            scores[name][t.name] = got["accuracy"] if got else knows_nothing_score(task_data(t).eval.labels)
    g = wf.recurring.gate
    return decide(scores["champion"], scores["challenger"], min_mean_gain=g.min_mean_gain, max_task_drop=g.max_task_drop)


def _register(wf: Workflow, lineage: Lineage, fused: ModelRef, verdict: Verdict, n: int, chosen: list[Contribution],
              champion_version: str | None, report: Reporter) -> str | None:
    """Register the challenger once (found again by its LoggedModel on a re-run) and move the aliases."""
    rec, name = wf.recurring, wf.registered_model_name
    if not fused.model_id:
        return None
    version = lineage.find_version(name, fused.model_id)
    tags = {"mergeflow.round": str(n), "mergeflow.strategy": "recurring", "mergeflow.method": rec.merge.method,
            "mergeflow.store_uri": fused.uri, TAG_STORE_PATH: fused.path, TAG_KEY: fused.key,
            TAG_CONTRIBUTIONS: ",".join(f"{c.id}:{c.task}" for c in chosen),
            "mergeflow.gate": verdict.label, TAG_REASON: verdict.reason,
            "gate_mean": f"{verdict.challenger_mean:.4f}", "champion_before": champion_version or "base"}
    if version is None:
        source = None if wf.tracking.log_model_artifacts else fused.uri
        version = lineage.register(name, model_id=fused.model_id, source=source, run_id=fused.run_id or "",
                                   alias=None, tags=tags,
                                   description=f"recurring round {n}: {rec.merge.method} of "
                                               f"{', '.join(f'{c.id} ({c.task})' for c in chosen)}; {verdict.label}")
        report(f"round {n}: registered {name} v{version}")
    else:
        lineage.set_version_tags(name, version, tags)
        report(f"round {n}: challenger already registered as {name} v{version}")
    lineage.set_alias(name, rec.challenger_alias, version)
    if verdict.promoted:
        lineage.set_alias(name, rec.champion_alias, version)
        report(f"round {n}: PROMOTED: alias {rec.champion_alias!r} → v{version}")
    else:
        report(f"round {n}: REJECTED: alias {rec.champion_alias!r} stays on "
               f"{'v' + champion_version if champion_version else 'nothing (the base model)'}; v{version} is "
               f"{rec.challenger_alias!r}")
    return version
