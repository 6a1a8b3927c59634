"""Learn AdaMerging's coefficients: entropy minimisation on unlabeled inputs of every task.

The merged body θ(λ) = θ_0 + Σ_k λ_k^l τ̂_k^l (``operators.merge.adamerging``) is differentiable in
λ. Each step draws ``batch_size`` unlabeled inputs of every task, runs them through θ(λ) and that
task's own head, and takes an Adam step on Σ_task mean_x H(softmax(f(x))), the prediction entropy
(Yang et al., ICLR 2024; the official loop: λ init 0.3, Adam lr 1e-3, 500 steps, clamp to [0, 1]).
Labels are never read. Tensors no task vector touches (e.g. frozen embeddings) stay θ_0 and get no
coefficient to learn.

Cost: all T task vectors and one model per task (body + head) are held in memory, and each step is
one forward and one backward pass per task's batch plus the λ-weighted sum over the task vectors,
so it suits the classification experts mergeflow fine-tunes, not multi-billion-parameter LMs.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from operators.merge.adamerging import AdaMergingParams, task_vectors
from operators.merge.registry import ModelStream, TensorContext, get_method


@dataclass
class AdaMergingResult:
    """The learned coefficients and how they were learned."""

    coefficients: dict[str, float | dict[str, float]]  # what AdaMergingParams.coefficients takes
    granularity: str
    steps: int
    seconds: float
    inputs: dict[str, int]  # task → unlabeled inputs drawn from
    entropy: list[tuple[int, float]] = field(default_factory=list)  # (step, Σ_task mean entropy), every few steps
    learned_tensors: int = 0
    fixed_tensors: int = 0
    mean_coefficient: dict[str, float] = field(default_factory=dict)  # task → mean λ over its tensors

    @property
    def initial_entropy(self) -> float:
        return self.entropy[0][1] if self.entropy else float("nan")

    @property
    def final_entropy(self) -> float:
        return self.entropy[-1][1] if self.entropy else float("nan")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["initial_entropy"], d["final_entropy"] = self.initial_entropy, self.final_entropy
        return d

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(json.dumps(self.as_dict(), indent=1, sort_keys=True) + "\n")
        return p


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of softmax(logits) over the batch."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def learn_coefficients(base: str | Path, experts: Mapping[str, str | Path], inputs: Mapping[str, Sequence[str]],
                       params: AdaMergingParams | Mapping[str, Any] | None = None, *, max_length: int = 64,
                       device: str = "cpu", log_every: int = 10,
                       on_log: Callable[[int, float], None] | None = None) -> AdaMergingResult:
    """Learn AdaMerging's λ for ``experts`` (task name → full classification checkpoint with that task's head).

    Args:
        base: θ_0's checkpoint (the body the task vectors are taken against).
        experts: Task name → expert checkpoint.
        inputs: Task name → unlabeled input texts of that task (at least one each).
        params: :class:`AdaMergingParams` (granularity, ties_density, init, steps, learning_rate, ...).
        log_every: Record the entropy every this many steps (and at the first and last).
        on_log: Called with (step, entropy) when it is recorded (the pipeline logs it to MLflow).

    Returns:
        An :class:`AdaMergingResult`; its ``coefficients`` go into the merge's params.
    """
    from operators.checkpoint import quiet_transformers

    p = params if isinstance(params, AdaMergingParams) else AdaMergingParams.model_validate(dict(params or {}))
    names = sorted(experts)
    empty = [n for n in names if not inputs.get(n)]
    if empty:
        raise ValueError(f"adamerging: no unlabeled inputs for task(s) {empty}; it learns its coefficients from "
                         "each task's inputs (the pipeline uses the validation slice: set merge.validation_fraction)")
    quiet_transformers()
    start = time.perf_counter()
    base_sd, keys, tvs, fixed = _task_vectors(base, experts, names, p, device)
    learned = list(tvs)
    base_dev = {k: v.to(device) for k, v in base_sd.items()}
    width = len(learned) if p.granularity == "layer" else 1
    lam = torch.full((len(names), width), float(p.init), device=device, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=p.learning_rate, betas=(0.9, 0.999))
    heads = _Heads(experts, names, device)
    batches = _Batches(inputs, p.batch_size, p.seed)
    history: list[tuple[int, float]] = []
    for step in range(p.steps + 1):  # step 0 .. steps-1 train; the last pass only measures
        merged = dict(base_dev)
        for i, k in enumerate(learned):
            col = lam[:, i if width > 1 else 0]
            merged[k] = base_dev[k] + torch.tensordot(col, tvs[k], dims=1)
        total = sum((entropy(heads.logits(n, merged, batches.next(n), max_length)) for n in names),
                    torch.zeros((), device=device))
        value = float(total.detach())
        if step % log_every == 0 or step == p.steps:
            history.append((step, value))
            if on_log is not None:
                on_log(step, value)
        if step == p.steps:
            break
        if not math.isfinite(value):
            raise FloatingPointError(f"adamerging: the entropy became {value} at step {step}; lower learning_rate")
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if p.clamp:
            with torch.no_grad():
                lam.clamp_(0.0, 1.0)
    values = lam.detach().cpu()
    if p.granularity == "layer":
        coefficients: dict[str, Any] = {n: {k: (float(values[t, learned.index(k)]) if k in tvs else float(p.init))
                                            for k in keys} for t, n in enumerate(names)}
    else:
        coefficients = {n: float(values[t, 0]) for t, n in enumerate(names)}
    return AdaMergingResult(coefficients=coefficients, granularity=p.granularity, steps=p.steps,
                            seconds=time.perf_counter() - start, inputs={n: len(inputs[n]) for n in names},
                            entropy=history, learned_tensors=len(learned), fixed_tensors=fixed,
                            mean_coefficient={n: float(values[t].mean()) for t, n in enumerate(names)})


def _task_vectors(base: str | Path, experts: Mapping[str, str | Path], names: list[str], p: AdaMergingParams,
                  device: str) -> tuple[dict[str, torch.Tensor], list[str], dict[str, torch.Tensor], int]:
    """The base's floating-point tensors, their names, the experts' task vectors as the merge prepares them
    (on ``device``; a tensor no expert changes is left out) and how many were left out."""
    from operators.tensor_io import load_state_dict

    base_sd = {k: v.float() for k, v in load_state_dict(base).items() if v.is_floating_point()}
    expert_sd = {n: {k: v.float() for k, v in load_state_dict(experts[n]).items() if v.is_floating_point()}
                 for n in names}
    keys = sorted(base_sd)
    missing = {n: sorted(set(keys) - set(sd))[:3] for n, sd in expert_sd.items() if set(keys) - set(sd)}
    if missing:
        raise ValueError(f"adamerging: experts lack tensors of the base ({missing}); they were not fine-tuned from it")
    spec = get_method("adamerging")
    stats = spec.prepare(ModelStream(keys, lambda k: (base_sd[k], [expert_sd[n][k] for n in names])), p, names) \
        if spec.prepare is not None else None
    tvs: dict[str, torch.Tensor] = {}
    fixed = 0
    for k in keys:
        tv = task_vectors(base_sd[k], [expert_sd[n][k] for n in names], p, TensorContext(k, stats, tuple(names)))
        if bool(tv.any()):
            tvs[k] = tv.to(device)
        else:
            fixed += 1
    return base_sd, keys, tvs, fixed


class _Heads:
    """Each expert's model, frozen: its head reads a merged body (``functional_call``) and gives logits."""

    def __init__(self, experts: Mapping[str, str | Path], names: list[str], device: str):
        from transformers import AutoTokenizer

        from operators.checkpoint import load_task_model

        self.device = device
        self.models, self.prefixes, self.tokenizers = {}, {}, {}
        for n in names:
            m = load_task_model(experts[n], n).to(device).eval()
            for q in m.parameters():
                q.requires_grad_(False)
            self.models[n], self.prefixes[n] = m, m.base_model_prefix
            self.tokenizers[n] = AutoTokenizer.from_pretrained(str(experts[n]))

    def logits(self, n: str, body: dict[str, torch.Tensor], texts: list[str], max_length: int) -> torch.Tensor:
        enc = self.tokenizers[n](texts, padding=True, truncation=True, max_length=max_length,
                                 return_tensors="pt").to(self.device)
        state = {f"{self.prefixes[n]}.{k}": v for k, v in body.items()}
        return torch.func.functional_call(self.models[n], state, args=(), kwargs=dict(enc), strict=False).logits


class _Batches:
    """Seeded batches of each task's inputs: every input once per pass, in a fresh order each pass."""

    def __init__(self, inputs: Mapping[str, Sequence[str]], batch_size: int, seed: int):
        self.inputs, self.batch_size = inputs, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.orders: dict[str, list[int]] = {n: [] for n in inputs}

    def next(self, n: str) -> list[str]:
        texts = self.inputs[n]
        out = []
        while len(out) < min(self.batch_size, len(texts)):
            if not self.orders[n]:
                self.orders[n] = torch.randperm(len(texts), generator=self.gen).tolist()
            out.append(texts[self.orders[n].pop()])
        return out

__all__ = ["AdaMergingResult", "entropy", "learn_coefficients"]
