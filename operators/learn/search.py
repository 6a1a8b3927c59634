"""Coefficient search on validation data: pick a merge method's scalar parameter by validation score.

A merge parameter given as ``{search: [v1, v2, ...]}`` (a grid), ``{search: {from: a, to: b, step: s}}``
(an inclusive range) or ``{search: {from: a, to: b, method: golden, evaluations: n}}`` (a golden-section
search for a unimodal score, n evaluations) is chosen by merging in memory with each candidate and
scoring the merged body, with every task's own head, on a validation slice held out of each task's
train split. The score is the mean *normalised* validation accuracy (merged / the task's expert on the
same slice), the selection rule of TALL-masks / TSV / LiNeS (``ALGORITHMS.md`` §5); ties keep the
earliest candidate.

Cost: the base and the experts are read once and kept in memory; each candidate is one in-memory
merge plus one evaluation pass. For ``scaling`` of the methods whose result is affine in it
(θ_0 + λ·f(τ): task arithmetic, TIES, DARE, DELLA, SCE, breadcrumbs, consensus, and the subspace merges TSV-M, Iso-C,
Iso-CTS, WUDI), the method runs once at λ = 1 and each candidate is θ_0 + λ·(θ_1 − θ_0), so a candidate
costs one evaluation pass and an axpy. CART's is θ̄ + λ·f(τ), centred on the experts' average: it runs
at λ = 0 and λ = 1 and each candidate is θ_0' + λ·(θ_1 − θ_0') with θ_0' its result at λ = 0.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from operators.data import Split
from operators.merge.registry import ModelStream, TensorContext, get_method, resolve_weights

# methods whose merge is θ_0 + scaling · f(task vectors) with f independent of scaling
AFFINE_IN_SCALING = frozenset({"task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "consensus",
                               "tsv_m", "iso_c", "iso_cts", "wudi", "cart", "della", "della_linear", "sce"})
# of those, the methods whose result at scaling 0 is not θ_0 (it is merged too)
OFFSET_AT_ZERO = frozenset({"cart"})
MAX_CANDIDATES = 1000
GOLDEN_DEFAULT_EVALUATIONS = 8


@dataclass(frozen=True)
class SearchSpace:
    """What to search: one parameter, a grid (or a range for golden-section search)."""

    param: str
    grid: tuple[float, ...] = ()
    low: float = 0.0
    high: float = 0.0
    method: str = "grid"  # "grid" | "golden"
    evaluations: int = 0

    def describe(self) -> str:
        if self.method == "golden":
            return f"golden-section over [{self.low}, {self.high}], {self.evaluations} evaluations"
        return f"grid of {len(self.grid)}: {', '.join(f'{v:g}' for v in self.grid)}"

    def probe_values(self) -> list[float]:
        """Values the spec validates the method's parameters with (every grid value, or the range's ends)."""
        return list(self.grid) if self.method == "grid" else [self.low, self.high]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_search(param: str, value: Any) -> SearchSpace | None:
    """The search a parameter value asks for, or None when it is a plain value.

    Raises:
        ValueError: naming ``params.<param>.search``, the value received and the fix.
    """
    if not (isinstance(value, dict) and "search" in value):
        return None
    where = f"params.{param}.search"
    extra = sorted(set(value) - {"search"})
    if extra:
        raise ValueError(f"{where}: unknown key {extra[0]!r} beside search (got {value!r}); write "
                         f"{param}: {{search: [0.1, 0.2, ...]}}")
    s = value["search"]
    if isinstance(s, list):
        if not s:
            raise ValueError(f"{where}: the grid is empty (got []); give at least one value, e.g. [0.1, 0.3, 0.5, 1.0]")
        bad = [v for v in s if not _is_number(v)]
        if bad:
            raise ValueError(f"{where}: {bad[0]!r} is not a number (got {s!r}); the grid holds numbers only")
        if len(s) > MAX_CANDIDATES:
            raise ValueError(f"{where}: {len(s)} candidates is more than {MAX_CANDIDATES}; use a coarser grid")
        return SearchSpace(param, tuple(float(v) for v in s))
    if isinstance(s, dict):
        keys = {"from", "to", "step", "method", "evaluations"}
        unknown = sorted(set(s) - keys)
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r} (got {s!r}); a range is {{from, to, step}} or "
                             "{from, to, method: golden, evaluations}")
        lo, hi = s.get("from"), s.get("to")
        if not _is_number(lo) or not _is_number(hi) or not lo < hi:
            raise ValueError(f"{where}: a range needs numbers from < to (got from={lo!r}, to={hi!r}); "
                             "e.g. {from: 0.1, to: 1.0, step: 0.1}")
        method = s.get("method", "grid")
        if method == "golden":
            n = s.get("evaluations", GOLDEN_DEFAULT_EVALUATIONS)
            if isinstance(n, bool) or not isinstance(n, int) or not 3 <= n <= MAX_CANDIDATES:
                raise ValueError(f"{where}.evaluations: must be an integer from 3 to {MAX_CANDIDATES} (got {n!r})")
            if "step" in s:
                raise ValueError(f"{where}.step: a golden-section search has no step (got {s['step']!r}); "
                                 "give evaluations instead")
            return SearchSpace(param, low=float(lo), high=float(hi), method="golden", evaluations=n)
        if method != "grid":
            raise ValueError(f"{where}.method: {method!r} is not a search method; use grid or golden")
        step = s.get("step")
        if not _is_number(step) or step <= 0:
            raise ValueError(f"{where}.step: a grid range needs a positive step (got {step!r}); e.g. step: 0.1")
        count = int(math.floor((hi - lo) / step + 1e-9)) + 1
        if count > MAX_CANDIDATES:
            raise ValueError(f"{where}: from {lo} to {hi} by {step} is {count} candidates, more than "
                             f"{MAX_CANDIDATES}; use a larger step")
        return SearchSpace(param, tuple(round(lo + i * step, 10) for i in range(count)))
    raise ValueError(f"{where}: expected a list of numbers or a range {{from, to, step}} (got {s!r})")


def split_search(params: Mapping[str, Any]) -> tuple[dict[str, Any], SearchSpace | None]:
    """Separate the one searched parameter from the fixed ones.

    Raises:
        ValueError: when more than one parameter is searched, or a search is malformed.
    """
    fixed, spaces = {}, []
    for k, v in params.items():
        space = parse_search(k, v)
        if space is None:
            fixed[k] = v
        else:
            spaces.append(space)
    if len(spaces) > 1:
        raise ValueError(f"params.{spaces[1].param}.search: one parameter is searched at a time (searched: "
                         f"{', '.join(s.param for s in spaces)}); fix all but one")
    return fixed, (spaces[0] if spaces else None)


# --- merging in memory ---------------------------------------------------------------------------

def merge_in_memory(base: Mapping[str, torch.Tensor], experts: Mapping[str, Mapping[str, torch.Tensor]],
                    method: str, params: Mapping[str, Any] | None,
                    tensor_params: Callable[[str], Mapping[str, Any]] | None = None) -> dict[str, torch.Tensor]:
    """Merge whole state dicts (float32) with a registered method: the engine's maths without files.

    Args:
        base: θ_0, tensor name → tensor (floating-point tensors only are merged; others are copied).
        experts: Expert name → state dict with the base's names.
        method: A registered merge method.
        params: Its parameters.
        tensor_params: Tensor name → that tensor's parameters, where they vary by tensor (a method without a
            whole-model pass).
    """
    spec = get_method(method)
    p = spec.parse_params(dict(params or {}))
    names = sorted(experts)
    weights = resolve_weights(p, names)
    parsed: dict[str, tuple[Any, list[float]]] = {}

    def params_of(key: str) -> tuple[Any, list[float]]:
        if tensor_params is None:
            return p, weights
        raw = dict(tensor_params(key))
        sig = repr(sorted(raw.items()))
        if sig not in parsed:
            pk = spec.parse_params(raw)
            parsed[sig] = (pk, resolve_weights(pk, names))
        return parsed[sig]

    keys = [k for k in base if base[k].is_floating_point()]
    stats = None
    if spec.prepare is not None:
        stats = spec.prepare(ModelStream(keys, lambda k: (base[k], [experts[n][k] for n in names])), p, names)
    out = {}
    for k, b in base.items():
        if not b.is_floating_point():
            out[k] = b
            continue
        ctx = TensorContext(key=k, stats=stats, experts=tuple(names))
        pk, wk = params_of(k)
        out[k] = spec.fn(b if spec.needs_base else None, [experts[n][k] for n in names], wk, pk, ctx).float()
    return out


# --- scoring ---------------------------------------------------------------------------------------

@dataclass
class Candidate:
    """One candidate value and its validation scores."""

    value: float
    score: float  # mean normalised validation accuracy
    accuracy: dict[str, float]  # task → validation accuracy of the merged body with the task's head
    normalized: dict[str, float]
    merge_seconds: float
    eval_seconds: float


@dataclass
class SearchResult:
    """The searched parameter, every candidate, the chosen value, and what it cost."""

    param: str
    method: str
    space: str
    chosen: float
    best_score: float
    candidates: list[Candidate]
    expert_accuracy: dict[str, float]  # task → its expert's accuracy on the validation slice
    validation_examples: dict[str, int]
    load_seconds: float = 0.0
    reference_seconds: float = 0.0  # one evaluation pass: the experts on their validation slices
    seconds: float = 0.0
    fast_path: bool = False
    heads: str = "experts"  # "aligned": each candidate scored with the heads aligned to its body
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def eval_pass_seconds(self) -> float:
        """Mean time of one candidate's evaluation pass (every task's validation slice)."""
        return sum(c.eval_seconds for c in self.candidates) / max(1, len(self.candidates))

    @property
    def cost_ratio(self) -> float:
        """Whole search time / (candidates × one evaluation pass): 1.0 would be evaluation alone."""
        return self.seconds / max(1e-9, len(self.candidates) * self.eval_pass_seconds)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eval_pass_seconds"] = self.eval_pass_seconds
        d["cost_ratio"] = self.cost_ratio
        return d


class ValidationScorer:
    """Scores a merged body on every task's validation slice with that task's head (kept in memory)."""

    def __init__(self, experts: Mapping[str, str | Path], validation: Mapping[str, Split], *, max_length: int = 64,
                 batch_size: int = 256, device: str = "cpu", align: Mapping[str, list[str]] | None = None,
                 ridge: float | None = None):
        """``align``: task → unlabeled inputs; each candidate body is then scored with every head aligned to
        it on those inputs (``merge.heads: aligned``, :func:`operators.learn.heads.fit_head`), as it would be merged."""
        from transformers import AutoTokenizer

        from operators.checkpoint import load_task_model, quiet_transformers
        from operators.learn.heads import DEFAULT_RIDGE, layer_io, output_layer

        quiet_transformers()
        self.device = device
        self.ridge = DEFAULT_RIDGE if ridge is None else ridge
        self.models, self.batches, self.gold = {}, {}, {}
        self.align: dict[str, tuple[torch.nn.Linear, list, torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        for task in sorted(validation):
            model = load_task_model(experts[task], task).to(device).eval()  # the expert's body and its head
            tok = AutoTokenizer.from_pretrained(str(experts[task]))
            split = validation[task]
            self.batches[task] = [tok(split.texts[i:i + batch_size], padding=True, truncation=True,
                                      max_length=max_length, return_tensors="pt").to(device)
                                  for i in range(0, len(split), batch_size)]
            self.gold[task] = np.asarray(split.labels)
            self.models[task] = model
            if align is not None:  # the expert's logits on the alignment inputs are the targets
                texts = list(align[task])
                layer = output_layer(model)[1]
                enc = [tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                           return_tensors="pt").to(device) for i in range(0, len(texts), batch_size)]
                _, targets = layer_io(model, layer, enc)
                bias = layer.bias.detach().clone() if layer.bias is not None else None
                self.align[task] = (layer, enc, targets, layer.weight.detach().clone(), bias)

    @torch.no_grad()
    def accuracy(self, body_state: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Validation accuracy per task; with ``body_state``, of that body (else of each expert as loaded)."""
        from operators.learn.heads import fit_head, layer_io

        out = {}
        for task, model in self.models.items():
            if body_state is not None:
                body = model.base_model
                # integer buffers (position ids) are not merged, and some models do not keep them as state
                floating = {k: v for k, v in body_state.items() if v.is_floating_point()}
                missing, unexpected = body.load_state_dict(floating, strict=False)
                floats = {k for k, v in body.state_dict().items() if v.is_floating_point()}
                if unexpected or set(missing) & floats:
                    raise ValueError(f"the merged body does not fit task {task!r}'s model (missing "
                                     f"{sorted(set(missing) & floats)[:3]}, unexpected {sorted(unexpected)[:3]})")
            if task in self.align:  # the head aligned to this body (the expert's own head for the experts)
                layer, enc, targets, w0, b0 = self.align[task]
                w, b = (w0, b0) if body_state is None else fit_head(layer_io(model, layer, enc)[0], targets, w0, b0,
                                                                    self.ridge)
                layer.weight.copy_(w)
                if b is not None:
                    layer.bias.copy_(b)
            pred = np.concatenate([model(**enc).logits.argmax(-1).cpu().numpy() for enc in self.batches[task]])
            out[task] = float((pred == self.gold[task]).mean()) if len(pred) else float("nan")
        return out


def _golden_points(lo: float, hi: float, n: int, score: Callable[[float], float]) -> None:
    """Golden-section search for the maximum of ``score`` on [lo, hi] with ``n`` evaluations."""
    inv = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - inv * (b - a), a + inv * (b - a)
    fc, fd = score(c), score(d)
    for _ in range(n - 2):
        if fc >= fd:  # ties move left: prefer the smaller coefficient
            b, d, fd = d, c, fc
            c = b - inv * (b - a)
            fc = score(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv * (b - a)
            fd = score(d)


def affine_line(base_sd: Mapping[str, torch.Tensor], expert_sd: Mapping[str, Mapping[str, torch.Tensor]], method: str,
                fixed: Mapping[str, Any]) -> tuple[Mapping[str, torch.Tensor], dict[str, torch.Tensor]]:
    """θ(0) and θ(1) − θ(0) of a method affine in ``scaling`` (θ(0) = θ_0 but for :data:`OFFSET_AT_ZERO`):
    the method runs once (twice), and θ(λ) = θ(0) + λ·(θ(1) − θ(0)) for every candidate."""
    origin = merge_in_memory(base_sd, expert_sd, method, {**fixed, "scaling": 0.0}) if method in OFFSET_AT_ZERO \
        else base_sd
    at_one = merge_in_memory(base_sd, expert_sd, method, {**fixed, "scaling": 1.0})
    return origin, {k: at_one[k] - origin[k] for k in at_one if base_sd[k].is_floating_point()}


def search_coefficient(base: str | Path, experts: Mapping[str, str | Path], method: str, params: Mapping[str, Any],
                       validation: Mapping[str, Split], *, max_length: int = 64, device: str = "cpu",
                       on_candidate: Callable[[Candidate], None] | None = None,
                       align: Mapping[str, list[str]] | None = None, ridge: float | None = None) -> SearchResult:
    """Choose the searched parameter of ``params`` by mean normalised validation accuracy.

    Args:
        base: θ_0's checkpoint.
        experts: Task name → expert checkpoint (full weights, with that task's head).
        method: The registered merge method.
        params: Its parameters, exactly one given as a search (see :func:`parse_search`).
        validation: Task name → the validation split (rows held out of the train split).
        on_candidate: Called after each candidate is scored (the pipeline logs a nested run).
        align: Task → unlabeled inputs: score each candidate with the heads aligned to its body on them
            (``merge.heads: aligned``), with ``ridge``; the aligning is part of each evaluation pass.

    Returns:
        A :class:`SearchResult`; ``chosen`` is the value to merge with.
    """
    from operators.tensor_io import load_state_dict

    start = time.perf_counter()
    fixed, space = split_search(params)
    if space is None:
        raise ValueError("params: no parameter is given as a search, e.g. scaling: {search: [0.1, 0.3, 0.5]}")
    missing = sorted(set(experts) - set(validation))
    if missing:
        raise ValueError(f"no validation data for task(s) {missing}; a search scores every task the merge covers")
    base_sd = {k: v.float() if v.is_floating_point() else v for k, v in load_state_dict(base).items()}
    expert_sd = {n: {k: v.float() if v.is_floating_point() else v for k, v in load_state_dict(p).items()}
                 for n, p in experts.items()}
    scorer = ValidationScorer(experts, validation, max_length=max_length, device=device, align=align, ridge=ridge)
    load_seconds = time.perf_counter() - start
    t0 = time.perf_counter()
    reference = scorer.accuracy()
    reference_seconds = time.perf_counter() - t0
    fast = space.param == "scaling" and method in AFFINE_IN_SCALING
    direction = None
    origin = base_sd
    if fast:
        origin, direction = affine_line(base_sd, expert_sd, method, fixed)
        expert_sd = {}  # the experts are no longer needed on the fast path
    candidates: list[Candidate] = []
    seen: dict[float, Candidate] = {}

    def score(value: float) -> float:
        if value in seen:
            return seen[value].score
        t = time.perf_counter()
        if direction is not None:
            merged = {k: (origin[k] + value * direction[k]) if k in direction else base_sd[k] for k in base_sd}
        else:
            get_method(method).parse_params({**fixed, space.param: value})  # a value out of range fails here
            merged = merge_in_memory(base_sd, expert_sd, method, {**fixed, space.param: value})
        t_merge = time.perf_counter() - t
        t = time.perf_counter()
        acc = scorer.accuracy(merged)
        t_eval = time.perf_counter() - t
        norm = {k: acc[k] / reference[k] if reference[k] > 0 else float("nan") for k in acc}
        c = Candidate(value, float(np.mean(list(norm.values()))), acc, norm, t_merge, t_eval)
        candidates.append(c)
        seen[value] = c
        if on_candidate is not None:
            on_candidate(c)
        return c.score

    if space.method == "golden":
        _golden_points(space.low, space.high, space.evaluations, score)
    else:
        for v in space.grid:
            score(v)
    best = max(candidates, key=lambda c: (c.score, -candidates.index(c)))
    return SearchResult(param=space.param, method=space.method, space=space.describe(), chosen=best.value,
                        best_score=best.score, candidates=candidates, expert_accuracy=reference,
                        validation_examples={t: len(s) for t, s in validation.items()}, load_seconds=load_seconds,
                        reference_seconds=reference_seconds, seconds=time.perf_counter() - start, fast_path=fast,
                        heads="aligned" if align is not None else "experts")


__all__ = ["AFFINE_IN_SCALING", "OFFSET_AT_ZERO", "Candidate", "SearchResult", "SearchSpace", "ValidationScorer", "merge_in_memory",
           "parse_search", "search_coefficient", "split_search"]
