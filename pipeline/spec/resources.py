"""``resources``: what Ray reserves for each step (one expert's fine-tuning, a merge, an evaluation)."""

from __future__ import annotations

from pydantic import Field

from pipeline.spec.common import _Frozen


class ResourcesSpec(_Frozen):
    """Ray resources for each expert's fine-tuning task (and the merge/eval tasks)."""

    num_cpus: float = Field(default=1.0, gt=0, description="Ray CPUs reserved by each step (one expert = one task).")
    num_gpus: float = Field(
        default=0.0, ge=0,
        description="Ray GPUs reserved by each step; above 0 the step runs on CUDA (a fraction shares a device, "
        "e.g. 0.5).",
    )
    max_retries: int = Field(
        default=1, ge=0, description="How many times Ray re-runs a step whose worker process died."
    )
    torch_threads: int | None = Field(
        default=None, gt=0, description="torch intra-op threads inside each step; defaults to num_cpus."
    )
