"""Heads aligned to the merged body: each task's output layer refit, without labels, to reproduce its expert.

A merged body computes other features than the body each task head was trained with, so a head
copied from its expert reads features it has never seen. On the quickstart tasks this costs more
than merging itself: task arithmetic at λ = 0.5 keeps 0.74 of the experts' accuracy with their own
heads and 0.96 once the heads are refit on the merged body with labels.

:func:`align_heads` makes that correction without labels. For task ``k`` with expert head
``(W, b)`` (its last linear layer), on ``N`` unlabeled inputs ``x`` of the task:

- ``y = W z_e(x) + b`` are the expert's logits (``z_e``: what that layer reads in the expert),
- ``z_m(x)``: what it reads in the merged model (merged body, the expert's head below that layer),

and the new head is the ridge solution that reproduces the expert's logits on the merged body,
shrunk towards the expert's own head (:func:`fit_head`):

    (W', b') = argmin  Σ_x ‖W' z_m(x) + b' − y(x)‖²  +  r ‖[W' b'] − [W b]‖²,
    r = ridge · tr(ZᵀZ) / (d + 1),   Z = [z_m, 1]  (N × (d + 1)).

It is least-squares distillation of each expert's outputs into a linear layer, the objective
RegMean solves for every linear layer of the body (Jin et al. 2023), applied here to the one
layer RegMean cannot merge, the task's own head, with the merged body's features as inputs. The
idea of correcting the merged representation per task on unlabeled data is Representation Surgery's
(Yang et al. 2024), which trains a small module for it; here the correction is folded into the head
in closed form, so the merged checkpoint keeps its architecture. With no data (``N = 0``) or an
infinite ridge the head is the expert's. ``ridge`` is relative to the mean eigenvalue of ZᵀZ, so it
does not depend on the feature scale or on ``N``.

Only inputs are read, never labels, and only rows the expert was trained on: no held-out data is
spent. Every call is an operator: plain tensors and checkpoint directories, no Ray, no MLflow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from operators.checkpoint import load_model, quiet_transformers
from operators.checkpoint_files import HEAD_WEIGHTS, HEADS_DIR, head_state_dict
from operators.evaluate import length_batches

DEFAULT_EXAMPLES = 256  # as many inputs as the statistics of Fisher merging and RegMean
DEFAULT_RIDGE = 0.1


class HeadAlignmentError(ValueError):
    """A head that cannot be aligned (no linear output layer, no inputs, a causal LM)."""


@dataclass
class HeadFit:
    """How one task's head was aligned: its inputs and how far the logits were from the expert's."""

    task: str
    examples: int
    module: str
    mse_before: float  # mean squared logit error of the expert's head on the merged body
    mse_after: float  # ... of the aligned head (on the same inputs it was fit on)
    seconds: float

    def as_dict(self) -> dict:
        return {"task": self.task, "examples": self.examples, "module": self.module, "mse_before": self.mse_before,
                "mse_after": self.mse_after, "seconds": self.seconds}


@dataclass
class HeadAlignment:
    """What :func:`align_heads` did, per task (also recorded in the merged checkpoint's provenance)."""

    ridge: float
    seed: int
    fits: dict[str, HeadFit] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"mode": "aligned", "ridge": self.ridge, "seed": self.seed, "seconds": self.seconds,
                "tasks": {t: f.as_dict() for t, f in sorted(self.fits.items())}}


def fit_head(z: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             ridge: float = DEFAULT_RIDGE) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The linear layer that maps features ``z`` (N × d) to targets ``y`` (N × C), shrunk to ``(weight, bias)``.

    Solves ``(ZᵀZ + r I) Θᵀ = Zᵀ y + r Θ0ᵀ`` in float64 with ``Z = [z, 1]`` (no ones column when the
    layer has no bias), ``Θ0 = [weight, bias]`` and ``r = ridge · tr(ZᵀZ) / (d + 1)``.

    Returns:
        ``(weight, bias)`` in the dtype of ``weight`` (``bias`` None when the layer has none).
    """
    if ridge <= 0:
        raise HeadAlignmentError(f"ridge must be > 0 (got {ridge}): with fewer inputs than features the fit has no "
                                 "unique solution")
    n, d = z.shape
    # solved on the CPU in float64 whatever device the layer is on (features come back from it on the CPU)
    theta0 = weight.detach().double().cpu()
    zz = z.detach().double().cpu()
    if bias is not None:
        zz = torch.cat([zz, torch.ones(n, 1, dtype=torch.float64)], 1)
        theta0 = torch.cat([theta0, bias.detach().double().cpu()[:, None]], 1)
    gram = zz.T @ zz
    r = ridge * float(torch.trace(gram)) / gram.shape[0]
    if r <= 0:  # no inputs, or all-zero features: nothing to fit on
        return weight.detach().clone(), None if bias is None else bias.detach().clone()
    rhs = zz.T @ y.detach().double().cpu() + r * theta0.T
    theta = torch.linalg.solve(gram + r * torch.eye(gram.shape[0], dtype=torch.float64), rhs).T
    w = theta[:, :d].to(weight.device, weight.dtype)
    return w, (theta[:, d].to(bias.device, bias.dtype) if bias is not None else None)


def output_layer(model: torch.nn.Module) -> tuple[str, torch.nn.Linear]:
    """The head's last linear layer (the one that produces the logits) of a task model."""
    prefix = model.base_model_prefix
    num_labels = int(model.config.num_labels)
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and name and name.split(".")[0] != prefix and m.out_features == num_labels]
    if not found:
        raise HeadAlignmentError(f"{type(model).__name__}: no linear output layer with {num_labels} outputs in its "
                                 "head; heads: aligned needs a linear classification head")
    return found[-1]


@torch.no_grad()
def layer_io(model: torch.nn.Module, layer: torch.nn.Module, encodings) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``layer`` reads and writes while ``model`` runs each of ``encodings`` (tokenized batches), concatenated
    in batch order, as float32 on the CPU."""
    ins: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []

    def hook(_m, args, out):
        ins.append(args[0].detach().float().cpu())
        outs.append(out.detach().float().cpu())

    handle = layer.register_forward_hook(hook)
    try:
        for enc in encodings:
            model(**enc)
    finally:
        handle.remove()
    return torch.cat(ins), torch.cat(outs)


def _layer_io(model: torch.nn.Module, layer: torch.nn.Module, tokenizer, texts: list[str], max_length: int,
              device: str, batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`layer_io` over ``texts`` in batches of similar length, returned in the texts' order."""
    batches = length_batches(tokenizer, texts, batch_size, max_length)
    model.eval().to(device)
    z, y = layer_io(model, layer, (tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                             max_length=max_length, return_tensors="pt").to(device) for idx in batches))
    if z.dim() != 2:
        raise HeadAlignmentError(f"the output layer reads {tuple(z.shape)}-shaped features; heads: aligned handles a "
                                 "head that reads one feature vector per input (sequence classification)")
    order = [i for idx in batches for i in idx]
    z_sorted, y_sorted = torch.empty_like(z), torch.empty_like(y)
    z_sorted[order], y_sorted[order] = z, y
    return z_sorted, y_sorted


def align_head(merged: str | Path, expert: str | Path, task: str, texts: list[str], *, ridge: float = DEFAULT_RIDGE,
               max_length: int = 64, device: str = "cpu", merged_adapter_base: str | Path | None = None,
               expert_adapter_base: str | Path | None = None) -> HeadFit:
    """Refit ``task``'s head in the (staged, not yet published) ``merged`` checkpoint to reproduce ``expert``.

    The head under ``merged/heads/<task>/`` is rewritten in place; its config is kept.
    """
    from transformers import AutoTokenizer

    start = time.perf_counter()
    if not texts:
        raise HeadAlignmentError(f"tasks.{task}: no inputs to align its head on")
    quiet_transformers()
    tok_dir = merged if (Path(merged) / "tokenizer_config.json").is_file() else merged_adapter_base
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    teacher = load_model(expert, task, causal_lm=False, adapter_base=expert_adapter_base)
    _, layer = output_layer(teacher)
    _, y = _layer_io(teacher, layer, tokenizer, texts, max_length, device)
    del teacher
    student = load_model(merged, task, causal_lm=False, adapter_base=merged_adapter_base)
    s_name, s_layer = output_layer(student)
    z, y_before = _layer_io(student, s_layer, tokenizer, texts, max_length, device)
    w, b = fit_head(z, y, s_layer.weight, s_layer.bias, ridge)
    with torch.no_grad():
        s_layer.weight.copy_(w)
        if b is not None:
            s_layer.bias.copy_(b)
    after = z @ w.float().cpu().T + (b.float().cpu() if b is not None else 0.0)
    head_file = Path(merged) / HEADS_DIR / task / HEAD_WEIGHTS
    tmp = head_file.with_suffix(".tmp")
    save_file(head_state_dict(student), str(tmp), metadata={"format": "pt", "task": task, "aligned": "true"})
    tmp.replace(head_file)
    return HeadFit(task=task, examples=len(texts), module=s_name, mse_before=float(((y_before - y) ** 2).mean()),
                   mse_after=float(((after - y) ** 2).mean()), seconds=time.perf_counter() - start)


def align_heads(merged: str | Path, experts: dict[str, str | Path], inputs: dict[str, list[str]], *,
                ridge: float = DEFAULT_RIDGE, seed: int = 0, max_length: int = 64, device: str = "cpu",
                merged_adapter_base: str | Path | None = None,
                expert_adapter_bases: dict[str, str | Path] | None = None) -> HeadAlignment:
    """Align the head of every task in ``experts`` (task → expert checkpoint) on its ``inputs`` (unlabeled texts)."""
    start = time.perf_counter()
    report = HeadAlignment(ridge=ridge, seed=seed)
    for task in sorted(experts):
        report.fits[task] = align_head(merged, experts[task], task, inputs.get(task) or [], ridge=ridge,
                                       max_length=max_length, device=device, merged_adapter_base=merged_adapter_base,
                                       expert_adapter_base=(expert_adapter_bases or {}).get(task))
    report.seconds = time.perf_counter() - start
    return report
