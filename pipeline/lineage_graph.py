"""The lineage graph of a workflow as a PNG: base → experts → merge, round after round.

Drawn with matplotlib alone (boxes and arrows on a grid; no graph library): one column of experts
and one merged model per round, each round starting from the previous round's merged model. For
iterated strategies a second panel plots the mean held-out accuracy per round. The driver logs the
picture as ``lineage.png`` on the workflow run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# rounds beyond this are elided in the graph panel (the accuracy panel shows them all)
MAX_DRAWN_ROUNDS = 8


@dataclass(frozen=True)
class GraphRound:
    """What the graph shows of one round.

    Attributes:
        index: The round number.
        experts: Task name to the expert's accuracy on its own task.
        method: The merge method of the round.
        merged_mean: The merged model's mean held-out accuracy over the tasks.
        registered_version: The registry version of the merged model, if any.
    """

    index: int
    experts: dict[str, float]
    method: str
    merged_mean: float
    registered_version: str | None = None


@dataclass(frozen=True)
class GraphData:
    """A whole workflow for :func:`draw_lineage`.

    Attributes:
        workflow: The workflow's name (the title).
        strategy: ``oneshot``, ``atm`` or ``cold_fusion``.
        base: The base model's reference (``packaged:NAME`` or a path).
        rounds: The rounds in order.
        base_mean: The base's mean linear-probe accuracy, if measured.
    """

    workflow: str
    strategy: str
    base: str
    rounds: list[GraphRound] = field(default_factory=list)
    base_mean: float | None = None


def drawn_rounds(rounds: list[GraphRound], limit: int = MAX_DRAWN_ROUNDS) -> list[GraphRound | None]:
    """The rounds the graph panel draws: all of them up to ``limit``, else the first and last few
    around a ``None`` (drawn as an ellipsis).

    Args:
        rounds: Every round.
        limit: How many round columns fit.

    Returns:
        Rounds in order, with one ``None`` where rounds were left out.
    """
    if len(rounds) <= limit:
        return list(rounds)
    head = (limit - 1) // 2
    tail = limit - 1 - head
    return [*rounds[:head], None, *rounds[-tail:]]


def _short(text: str, width: int = 22) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _draw_curve(ax, data: GraphData) -> None:
    """The merged model's and the experts' mean accuracy by round, against the base's probe."""
    xs = [r.index for r in data.rounds]
    ax.plot(xs, [r.merged_mean for r in data.rounds], marker="o", label="merged model")
    expert_means = [sum(r.experts.values()) / len(r.experts) if r.experts else float("nan") for r in data.rounds]
    ax.plot(xs, expert_means, marker=".", linestyle="--", label="experts (own task)")
    if data.base_mean is not None:
        ax.axhline(data.base_mean, color="#999999", linestyle=":", label="base (linear probe)")
    ax.set_xlabel("round")
    ax.set_ylabel("mean accuracy")
    ax.set_xticks(xs if len(xs) <= 16 else xs[:: max(1, len(xs) // 16)])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")


def draw_lineage(data: GraphData, path: str | Path, dpi: int = 110) -> Path:
    """Draw ``data`` as a PNG at ``path``.

    Args:
        data: The workflow's rounds.
        path: Where to write the PNG.
        dpi: Resolution.

    Returns:
        The PNG's path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = drawn_rounds(data.rounds)
    tasks = sorted({t for r in data.rounds for t in r.experts}) or ["-"]
    with_curve = data.strategy != "oneshot" and len(data.rounds) > 1
    width = 2.6 + 3.2 * len(columns)
    height = max(3.0, 0.75 * len(tasks) + 1.6)
    if with_curve:
        fig, (ax, ax_curve) = plt.subplots(2, 1, figsize=(width, height + 3.0),
                                           gridspec_kw={"height_ratios": [height, 3.0]})
    else:
        fig, ax = plt.subplots(figsize=(width, height))
        ax_curve = None

    ys = {t: (len(tasks) - 1) / 2 - i for i, t in enumerate(tasks)}  # experts stacked around y = 0
    box = {"boxstyle": "round,pad=0.35", "linewidth": 1.0}
    colors = {"base": "#dbe9f6", "expert": "#fdebd0", "merged": "#d5f5e3", "gap": "#ffffff"}

    def node(x: float, y: float, text: str, kind: str):
        return ax.text(x, y, text, ha="center", va="center", fontsize=8, zorder=3,
                       bbox={**box, "facecolor": colors[kind], "edgecolor": "#555555"})

    def arrow(src, dst) -> None:  # from the right edge of one box to the left edge of the next
        ax.annotate("", xy=(0.0, 0.5), xycoords=dst, xytext=(1.0, 0.5), textcoords=src, zorder=1,
                    arrowprops={"arrowstyle": "-|>", "color": "#777777", "lw": 0.9, "shrinkA": 4, "shrinkB": 4})

    base_text = "base\n" + _short(data.base if "://" in data.base or data.base.startswith("packaged:")
                                 else Path(data.base).name)  # a local folder: its name, not the whole path
    if data.base_mean is not None:
        base_text += f"\nprobe mean {data.base_mean:.3f}"
    start = node(0.0, 0.0, base_text, "base")
    for col, rnd in enumerate(columns):
        x_exp, x_merge = 1.6 + 3.2 * col, 3.2 + 3.2 * col
        if rnd is None:
            gap = node(x_merge - 0.8, 0.0, f"… {len(data.rounds) - len(columns) + 1} rounds …", "gap")
            arrow(start, gap)
            start = gap
            continue
        merged_text = f"round {rnd.index}: {rnd.method}\nmean {rnd.merged_mean:.3f}"
        if rnd.registered_version:
            merged_text += f"\nv{rnd.registered_version}"
        merged = node(x_merge, 0.0, merged_text, "merged")
        for task, acc in sorted(rnd.experts.items()):
            expert = node(x_exp, ys[task], f"{task}\n{acc:.3f}", "expert")
            arrow(start, expert)
            arrow(expert, merged)
        start = merged
    span = (len(tasks) - 1) / 2
    ax.set_xlim(-1.3, 3.2 * len(columns) + 1.3)
    ax.set_ylim(-span - 0.9, span + 0.9)
    ax.axis("off")
    ax.set_title(f"{data.workflow} ({data.strategy})\nbase → experts (own-task accuracy) → merged model "
                 "(mean held-out accuracy)", fontsize=9)

    if ax_curve is not None:
        _draw_curve(ax_curve, data)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
