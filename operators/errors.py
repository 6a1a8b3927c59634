"""Errors every operator may raise about its inputs (below the merge engine and the checkpoint readers, so
that any of them can raise one without importing the other)."""

from __future__ import annotations


class MergeError(ValueError):
    """Inputs that cannot be merged, with what differs and how to fix it."""


class TrainingDiverged(RuntimeError):
    """A fine-tune whose loss stopped being finite: where it diverged, its last finite loss, what to change.
    Nothing of that expert is saved."""
