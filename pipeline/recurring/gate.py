"""The promotion gate: does a round's fused model (the challenger) replace the champion?

Both are scored on the same fixed gate tasks (each task's held-out eval split). A task a model has
no head for yet scores what knowing nothing of it scores: the share of the task's most frequent
label in the eval split (so a round that adds a task gains exactly what its head learned above
that). Then, with Δ_t = challenger_t − champion_t:

    promote  ⇔  mean_t Δ_t > 0  and  mean_t Δ_t ≥ min_mean_gain  and  min_t Δ_t ≥ −max_task_drop

A rejection names the rule that failed, and for a drop the task and by how much.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Verdict:
    """What the gate decided and why (scores are per gate task)."""

    promoted: bool
    reason: str
    champion: dict[str, float]
    challenger: dict[str, float]
    deltas: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return "promoted" if self.promoted else "rejected"

    @property
    def champion_mean(self) -> float:
        return _mean(self.champion)

    @property
    def challenger_mean(self) -> float:
        return _mean(self.challenger)

    @property
    def mean_gain(self) -> float:
        return self.challenger_mean - self.champion_mean


def _mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores) if scores else float("nan")


def decide(champion: dict[str, float], challenger: dict[str, float], *, min_mean_gain: float,
           max_task_drop: float) -> Verdict:
    """Apply the gate to per-task scores of the champion and the challenger (same tasks in both)."""
    if set(champion) != set(challenger) or not champion:
        raise ValueError(f"the gate needs scores of the same tasks for both models (champion: {sorted(champion)}, "
                         f"challenger: {sorted(challenger)})")
    deltas = {t: challenger[t] - champion[t] for t in sorted(champion)}
    gain = _mean(challenger) - _mean(champion)
    worst = min(deltas, key=lambda t: (deltas[t], t))
    scores = f"mean {_mean(champion):.3f} → {_mean(challenger):.3f} ({gain:+.3f})"
    if deltas[worst] < -max_task_drop - 1e-12:
        return Verdict(False, f"{worst} dropped {champion[worst]:.3f} → {challenger[worst]:.3f} ({deltas[worst]:+.3f}; "
                              f"gate allows -{max_task_drop:g}); {scores}", champion, challenger, deltas)
    if gain <= 0 or gain < min_mean_gain - 1e-12:
        need = f"more than 0 and at least {min_mean_gain:+g}" if min_mean_gain > 0 else "more than 0"
        return Verdict(False, f"{scores}: the gain must be {need}", champion, challenger, deltas)
    return Verdict(True, f"{scores}; worst task {worst} {deltas[worst]:+.3f} (gate allows -{max_task_drop:g})",
                   champion, challenger, deltas)


def knows_nothing_score(labels: list[int]) -> float:
    """What a model without a head for a task scores on it: the most frequent label's share."""
    if not labels:
        return 0.0
    counts: dict[int, int] = {}
    for y in labels:
        counts[y] = counts.get(y, 0) + 1
    return max(counts.values()) / len(labels)
