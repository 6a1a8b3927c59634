"""Few-shot composition: weigh existing causal-LM experts for a task none of them was trained on (LoraHub,
arXiv 2307.13269), gradient-free.

Given N labelled examples of the new task, the weights w of the composed model θ0 + Σ_i w_i ΔW_i (each
expert's update: a LoRA adapter's B·A·scaling, or a full fine-tune's θ_i − θ0) minimise

    L(w) = loss on the N examples + α Σ_i |w_i|          (LoraHub: α = 0.05, w ∈ [−1.5, 1.5], start w = 0)

searched by CMA-ES (the recipe search's loop, ``operators.learn.recipe``) over mergekit's task arithmetic
with per-model ``weight`` (λ = 1), so the composed model is a mergekit config. The loss is the
token-weighted mean negative log-likelihood of the responses (``operators.evaluate.lm_metrics``' loss).
Where LoraHub averages the adapters' A and B factors separately, mergeflow sums the exact updates
ΔW = B·A·scaling (the result is the same function of w for one adapter, and an exact linear combination
of the experts' updates for several).

One candidate costs one write of the touched weights (θ0 + Σ w_i ΔW_i, in place) and one forward pass over
the N examples; the base and the updates are held in memory.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from operators.data import Split
from operators.learn.recipe import RecipeSpace, cma_search

LORAHUB_L1 = 0.05
LORAHUB_BOUNDS = (-1.5, 1.5)


class ComposedLM:
    """The base causal LM with each expert's update held beside it; :meth:`set` writes θ0 + Σ w_i ΔW_i in place."""

    def __init__(self, base: str | Path, experts: Mapping[str, str | Path], *, device: str = "cpu"):
        from transformers import AutoTokenizer

        from operators.checkpoint import load_causal_lm
        from operators.lora import LoraDeltaReader, is_adapter_dir, read_adapter
        from operators.tensor_io import TensorReader

        self.names = sorted(experts)
        self.model = load_causal_lm(base).float().to(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(base))
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = device
        params = dict(self.model.named_parameters())
        base_reader = TensorReader(base)
        self.deltas: dict[str, dict[str, torch.Tensor]] = {}
        try:
            for n in self.names:
                path = Path(experts[n])
                reader = LoraDeltaReader(read_adapter(path), base_reader) if is_adapter_dir(path) else TensorReader(path)
                keys = sorted(reader.targets) if is_adapter_dir(path) else [
                    k for k in reader.keys() if k in params and reader.dtype(k).is_floating_point]
                out = {}
                for k in keys:
                    if k not in params:
                        raise ValueError(f"expert {n!r}: tensor {k!r} is not a parameter of the base model {base}")
                    d = reader.get(k).float() - base_reader.get(k).float()
                    if bool(d.any()):
                        out[k] = d.to(device)
                self.deltas[n] = out
                if not is_adapter_dir(path):
                    reader.close()
        finally:
            base_reader.close()
        self.touched = sorted({k for d in self.deltas.values() for k in d})
        self._params = {k: params[k] for k in self.touched}
        self._base = {k: params[k].detach().clone() for k in self.touched}

    @torch.no_grad()
    def set(self, weights: Mapping[str, float]) -> None:
        for k in self.touched:
            w = self._base[k].clone()
            for n in self.names:
                if k in self.deltas[n] and weights.get(n, 0.0) != 0.0:
                    w.add_(self.deltas[n][k], alpha=float(weights[n]))
            self._params[k].copy_(w)

    def loss(self, split: Split, max_length: int) -> float:
        from operators.evaluate import lm_metrics

        return float(lm_metrics(self.model, self.tokenizer, Split(split.texts, [], split.prompts), max_length=max_length,
                                device=self.device)["loss"])


@dataclass
class ComposeResult:
    """The weights found, their few-shot loss and objective, and every candidate's."""

    weights: dict[str, float]
    loss: float
    objective: float
    config: dict[str, Any]
    base_loss: float  # w = 0
    uniform_loss: float  # w = 1/K each
    candidates: list[dict[str, Any]]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compose(base: str | Path, experts: Mapping[str, str | Path], examples: Split, *, evaluations: int = 40,
            population: int | None = None, seed: int = 0, l1: float = LORAHUB_L1,
            bounds: tuple[float, float] = LORAHUB_BOUNDS, max_length: int = 64, device: str = "cpu",
            model: ComposedLM | None = None) -> ComposeResult:
    """Find the experts' weights for a new task from ``examples`` (see the module docstring).

    ``model``: a :class:`ComposedLM` already holding ``base`` and ``experts`` (reused across searches).
    """
    start = time.perf_counter()
    lm = model or ComposedLM(base, experts, device=device)
    names = lm.names
    space = RecipeSpace("task_arithmetic", ("weight",), bounds={"weight": bounds}, initial={"weight": 0.0})
    seen: list[dict[str, Any]] = []

    def weights_of(cfg: dict[str, Any]) -> dict[str, float]:
        by_path = {str(Path(experts[n])): n for n in names}
        return {by_path[m["model"]]: float(m["parameters"]["weight"]) for m in cfg["models"]}

    def evaluate(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for cfg in configs:
            w = weights_of(cfg)
            lm.set(w)
            loss = lm.loss(examples, max_length)
            objective = loss + l1 * sum(abs(v) for v in w.values())
            seen.append({"weights": w, "loss": loss, "objective": objective})
            out.append({"score": -objective})
        return out

    res = cma_search(space, base, {n: str(Path(experts[n])) for n in names}, evaluate, evaluations=evaluations,
                     population=population, seed=seed)
    best = seen[res.best.index]
    lm.set({n: 0.0 for n in names})
    base_loss = lm.loss(examples, max_length)
    lm.set({n: 1.0 / len(names) for n in names})
    uniform_loss = lm.loss(examples, max_length)
    lm.set(best["weights"])
    config = {**res.best.config, "parameters": {"lambda": 1.0}}
    return ComposeResult(best["weights"], best["loss"], best["objective"], config, base_loss, uniform_loss, seen,
                         time.perf_counter() - start)


__all__ = ["LORAHUB_BOUNDS", "LORAHUB_L1", "ComposeResult", "ComposedLM", "compose"]
