"""LiNeS: layer-increasing network scaling (Wang, Dimitriadis et al., ICLR 2025, arXiv 2410.17146).

Any task-vector merge gives a merged update τ_m = merge(θ_0, θ_1..T) − θ_0. LiNeS scales the update
of residual block ℓ (1-based, L blocks) by

    λ(ℓ) = α + β · (ℓ − 1) / (L − 1)

so shallow layers stay close to the base (general features) and deep layers keep the task-specific
update; parameters outside the blocks (embeddings, final norm) get α. The block index is read from
parameter names (``….layers.N.…``, ``.layer.N.``, ``.h.N.``, ``.blocks.N.``, ``.resblocks.N.``) or
from ``layer_pattern``, a regular expression whose first group captures it.

α defaults to the paper's multi-task choice, α = (1/T) · ‖Σ_t w_t τ_t‖₁ / ‖τ_m‖₁ over the whole model
(computed in a streaming first pass); β is tuned on validation data in the paper (default 0.5).
The inner method runs with λ = 1 unless ``method_params`` sets its ``scaling``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import Field, model_validator
from torch import Tensor

from operators.merge.registry import MergeParams, TensorContext, get_method, register, resolve_weights
from operators.merge.task_vectors import stack_task_vectors

DEFAULT_LAYER_PATTERN = r"(?:^|\.)(?:layers?|h|blocks?|resblocks)\.(\d+)\."


class LinesParams(MergeParams):
    method: str = Field(default="task_arithmetic", description="the task-vector merge whose update is scaled")
    method_params: dict[str, Any] = Field(default_factory=dict)
    alpha: float | None = Field(default=None, ge=0.0, description="λ of the first block; default: the norm ratio")
    beta: float = Field(default=0.5, ge=0.0, description="extra λ of the last block over the first")
    layer_pattern: str = DEFAULT_LAYER_PATTERN

    @model_validator(mode="after")
    def _inner_method(self) -> LinesParams:
        if self.method == "lines":
            raise ValueError("method: LiNeS cannot wrap itself; name a task-vector merge such as task_arithmetic or ties")
        inner = get_method(self.method)
        if not inner.needs_base:
            raise ValueError(f"method: {self.method!r} does not produce a task vector; use task_arithmetic, ties, "
                             "dare_linear, dare_ties, breadcrumbs or consensus")
        try:
            re.compile(self.layer_pattern)
        except re.error as exc:
            raise ValueError(f"layer_pattern: not a regular expression ({exc})") from None
        self.inner_params()  # validate now, not mid-merge
        return self

    def inner_params(self) -> MergeParams:
        inner = get_method(self.method)
        raw = dict(self.method_params)
        if "scaling" in inner.params.model_fields:
            raw.setdefault("scaling", 1.0)
        if self.weights is not None:
            raw.setdefault("weights", self.weights)
        try:
            return inner.parse_params(raw)
        except ValueError as exc:
            raise ValueError(f"method_params ({self.method}): {exc}") from None


def layer_indices(keys: Sequence[str], pattern: str) -> dict[str, int]:
    """Block index (1-based, from the smallest index found) of every key inside a residual block.

    Returns:
        θ_0 + λ(ℓ) · τ_merged (float32).

    Raises:
        ValueError: when no key has a block index.
    """
    rx = re.compile(pattern)
    found = {k: int(m.group(1)) for k in keys if (m := rx.search(k))}
    if not found:
        example = next(iter(keys), "")
        raise ValueError(
            f"LiNeS: no parameter name has a block index (e.g. {example!r}); LiNeS scales residual blocks "
            f"by depth, so names must match params.layer_pattern ({pattern!r}). Set layer_pattern to a "
            "regular expression whose first group captures the block number"
        )
    low = min(found.values())
    return {k: i - low + 1 for k, i in found.items()}


def _prepare(stream, params: LinesParams, names: Sequence[str]) -> dict[str, Any]:
    inner = get_method(params.method)
    inner_p = params.inner_params()
    inner_stats = inner.prepare(stream, inner_p, names) if inner.prepare else None
    keys = getattr(stream, "keys", None)
    if keys is None:
        keys = [k for k, _, _ in stream()]
    layers = layer_indices(keys, params.layer_pattern)
    alpha = params.alpha
    if alpha is None:
        weights = resolve_weights(inner_p, names)
        summed = merged = 0.0
        for key, base, experts in stream():
            tv = stack_task_vectors(base, experts)
            summed += float(sum(w * tv[t] for t, w in enumerate(weights)).abs().sum())
            ctx = TensorContext(key=key, stats=inner_stats, experts=tuple(names))
            merged += float((inner.fn(base, experts, weights, inner_p, ctx) - base.float()).abs().sum())
        alpha = summed / (len(names) * merged) if merged > 0 else 1.0 / len(names)
    return {"layers": layers, "n_layers": max(layers.values()), "alpha": alpha, "inner": inner_stats}


def lines_scale(layer: int | None, n_layers: int, alpha: float, beta: float) -> float:
    """λ(ℓ) = α + β (ℓ − 1)/(L − 1); α outside the blocks (``layer`` None) or with a single block."""
    if layer is None or n_layers <= 1:
        return alpha
    return alpha + beta * (layer - 1) / (n_layers - 1)


@register(
    "lines",
    params=LinesParams,
    needs_base=True,
    paper="https://arxiv.org/abs/2410.17146",
    formula="θ = θ_0 + (α + β(ℓ−1)/(L−1)) · τ_merged(ℓ)",
    prepare=_prepare,
)
def lines(
    base: Tensor | None, experts: Sequence[Tensor], weights: Sequence[float], params: LinesParams,
    ctx: TensorContext | None = None,
) -> Tensor:
    """Scale one tensor's merged update by its block's LiNeS coefficient.

    Returns:
        θ_0 + λ(ℓ) · τ_merged (float32).

    Raises:
        ValueError: outside the engine (the block count needs the whole model's names).
    """
    assert base is not None
    if ctx is None or not isinstance(ctx.stats, dict):
        raise ValueError("LiNeS needs the whole model's block count: run it through the merge engine")
    s = ctx.stats
    inner = get_method(params.method)
    inner_ctx = TensorContext(key=ctx.key, stats=s["inner"], experts=ctx.experts)
    update = inner.fn(base, experts, weights, params.inner_params(), inner_ctx) - base.float()
    return base.float() + lines_scale(s["layers"].get(ctx.key), s["n_layers"], s["alpha"], params.beta) * update
