"""The merged model's task heads: each expert keeps its own task's head, and a checkpoint given as
``heads_from`` supplies the heads of tasks no expert brings (files, or checkpoints held in memory)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from operators.checkpoint_files import copy_head, head_names
from operators.errors import MergeError
from operators.state import AdapterCheckpoint, StateCheckpoint


def _copy_heads(heads: list[tuple[str, str]], paths: Mapping[str, Path], heads_from: str | Path | None,
                out: Path) -> list[str]:
    """Copy each planned expert head into ``out``, then ``heads_from``'s heads of the other tasks.

    Returns:
        The tasks whose heads the output carries, sorted.
    """
    for expert_name, task in heads:
        copy_head(paths[expert_name], out, task)
    carried = []
    if heads_from is not None:
        carried = [t for t in head_names(heads_from) if t not in {task for _, task in heads}]
        for task in carried:
            copy_head(Path(heads_from), out, task)
    return sorted([t for _, t in heads] + carried)


def _plan_heads(paths: Mapping[str, Path]) -> list[tuple[str, str]]:
    """Which head to take from which expert: its own task's head, else all it carries (no clashes)."""
    plan: dict[str, str] = {}
    for name, path in paths.items():
        available = head_names(path)
        chosen = [name] if name in available else available
        for task in chosen:
            if task in plan:
                raise MergeError(
                    f"two experts carry a head for task {task!r} ({plan[task]!r} and {name!r}); "
                    "name each expert after its task"
                )
            plan[task] = name
    return [(expert, task) for task, expert in sorted(plan.items())]


def _state_heads(experts: Mapping[str, StateCheckpoint | AdapterCheckpoint], names: list[str],
                 heads_from: StateCheckpoint | None) -> dict[str, tuple[dict[str, torch.Tensor], str]]:
    """Each expert's own task's head (or every head it carries), then ``heads_from``'s for the other tasks."""
    heads: dict[str, tuple[dict[str, torch.Tensor], str]] = {}
    for n in names:
        own = [n] if n in experts[n].heads else list(experts[n].heads)
        for task in own:
            if task in heads:
                raise MergeError(f"two experts carry a head for task {task!r}; name each expert after its task")
            heads[task] = experts[n].heads[task]
    if heads_from is not None:
        heads |= {t: h for t, h in heads_from.heads.items() if t not in heads}
    return heads
