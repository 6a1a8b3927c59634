"""``mergeflow history``: every firing of a recurring workflow, read back from MLflow, as a table and a plot."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.lineage import Lineage
from pipeline.recurring.round import (
    TAG_CHAMPION_AFTER,
    TAG_CHAMPION_BEFORE,
    TAG_CONTRIBUTIONS,
    TAG_REASON,
    TAG_RECURRING,
    TAG_SKIPPED,
    TAG_VERDICT,
)
from pipeline.spec import Workflow


@dataclass
class HistoryRow:
    round: str
    started: str
    status: str  # the run's: FINISHED, KILLED, FAILED, RUNNING
    verdict: str  # promoted | rejected | nothing_to_do | "" (unfinished attempt)
    contributions: str
    skipped: str
    champion_before: str
    champion_after: str
    champion_mean: float | None
    challenger_mean: float | None
    reason: str
    run_id: str


def history(wf: Workflow) -> list[HistoryRow]:
    """Every round run of ``wf`` (oldest first), including nothing-to-do firings and killed attempts."""
    lineage = Lineage.init(wf.tracking.uri, wf.experiment_name, wf.tracking.artifact_location,
                           wf.tracking.retry_seconds)
    rows = []
    for run in lineage.find_runs(f"tags.`{TAG_RECURRING}` = '{wf.name}' and tags.`mergeflow.kind` = 'round'"):
        t, m = run["tags"], run["metrics"]
        verdict = t.get(TAG_VERDICT, "")
        rows.append(HistoryRow(
            round=t.get("mergeflow.round", "?") if verdict != "nothing_to_do" else "-",
            started=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run["start_time"] / 1000)),
            status=run["status"], verdict=verdict or run["status"].lower(),
            contributions=t.get(TAG_CONTRIBUTIONS, ""), skipped=t.get(TAG_SKIPPED, ""),
            champion_before=t.get(TAG_CHAMPION_BEFORE, ""), champion_after=t.get(TAG_CHAMPION_AFTER, ""),
            champion_mean=m.get("gate/mean/champion"), challenger_mean=m.get("gate/mean/challenger"),
            reason=t.get(TAG_REASON, t.get("mergeflow.killed_reason", "")), run_id=run["run_id"]))
    return rows


def _v(tag: str) -> str:
    return "base" if tag in ("", "base") else f"v{tag}"


def table(rows: list[HistoryRow]) -> str:
    """The history as a Markdown table (one line per firing)."""
    head = "| round | started | contributions | verdict | champion → challenger (gate mean) | champion | reason |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        scores = (f"{r.champion_mean:.3f} → {r.challenger_mean:.3f}" if r.champion_mean is not None
                  and r.challenger_mean is not None else "-")
        champ = f"{_v(r.champion_before)} → {_v(r.champion_after)}" if r.champion_after else "-"
        contrib = r.contributions or "-"
        if r.skipped:
            contrib += f" (skipped: {r.skipped})"
        lines.append(f"| {r.round} | {r.started} | {contrib} | {r.verdict} | {scores} | {champ} | {r.reason} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[HistoryRow], out: str | Path, title: str = "") -> Path:
    """The champion's gate score over rounds (a step line), each challenger marked promoted or rejected."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decided = [r for r in rows if r.verdict in ("promoted", "rejected") and r.challenger_mean is not None]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    if decided:
        xs = [int(r.round) for r in decided]
        champion = [r.challenger_mean if r.verdict == "promoted" else r.champion_mean for r in decided]
        ax.step([xs[0] - 1, *xs], [decided[0].champion_mean, *champion], where="post", color="#1f77b4",
                label="champion (after the round)")
        for verdict, marker, color in (("promoted", "o", "#2ca02c"), ("rejected", "x", "#d62728")):
            pts = [(int(r.round), r.challenger_mean) for r in decided if r.verdict == verdict]
            if pts:
                ax.scatter(*zip(*pts, strict=True), marker=marker, color=color, zorder=3, label=f"challenger {verdict}")
        ax.set_xticks(range(xs[0] - 1, xs[-1] + 1))
    ax.set_xlabel("round")
    ax.set_ylabel("mean gate score")
    ax.set_title(title or "recurring rounds")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
