"""What every section of the spec shares: the frozen base model, name checks, the error and defaults."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

# The spec accepts every strategy of the design (see Workflow.strategy); only these run today, the
# others are recognised so that a spec written for them gets a precise "not available yet" error.
IMPLEMENTED_STRATEGIES = ("oneshot", "atm", "cold_fusion")

DEFAULT_BASE_MODEL = "packaged:all-minilm-l6-v2"
PACKAGED_ENCODERS = (DEFAULT_BASE_MODEL,)
PACKAGED_CAUSAL_LM = "word-llama"  # a small Llama that mergeflow pre-trains itself on packaged text
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_STORE = "mergeflow-store"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class SpecError(ValueError):
    """A workflow spec that cannot run, with one line per problem (field path, value, fix)."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        head = f"{source}: {len(problems)} problem" + ("s" if len(problems) != 1 else "")
        super().__init__(head + "\n" + "\n".join(f"  - {p}" for p in problems))


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def check_name(value: str, what: str) -> str:
    """A name that becomes part of a path or a registry alias: 1-64 safe characters.

    Args:
        value: The name given.
        what: What it names, for the message (e.g. "a task name").

    Returns:
        ``value`` unchanged.

    Raises:
        ValueError: naming ``what``, the rule and the value.
    """
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{what} must be 1-64 characters of letters, digits, '_' or '-', starting with a "
            f"letter or digit (got {value!r})" + ("; MLflow's model names cannot hold '.': write '-' or '_' instead"
                                                  if "." in value else "")
        )
    return value


def contributor_count(count: float | None, n_tasks: int) -> int:
    """How many tasks contribute to a ColD Fusion round: all (``count`` None), a count, or a fraction of them
    (at least one), never more than there are tasks."""
    if count is None:
        return n_tasks
    return min(n_tasks, int(count) if count >= 1 else max(1, round(count * n_tasks)))
