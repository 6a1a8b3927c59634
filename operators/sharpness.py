"""Sharpness-aware training: SAM (Foret et al., ICLR 2021, arXiv 2010.01412) and ASAM (Kwon et al., ICML 2021,
arXiv 2102.11600), the second pass of each step that ``operators.finetune``'s loop takes when
``finetune.sharpness`` is set.

    ε = ρ g/‖g‖ (SAM)   or   ε = ρ T²g/‖T g‖, T = |w| + η (ASAM, on weights);   g ← ∇L(w + ε);   w unchanged

The optimizer then steps from w along the gradient taken at the worst nearby weights, which leads to flat
regions of the loss (where experts interfere less when merged).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


@torch.no_grad()
def _perturb(params: list[torch.nn.Parameter], method: str, rho: float, eta: float,
             scaled: list[bool]) -> list[torch.Tensor | None]:
    """Add SAM's ε = ρ g/‖g‖, or ASAM's ε = ρ T²g/‖T g‖ with T = |w| + η on the weights ``scaled`` marks (1
    elsewhere: biases, norms), to the weights; returns their values before, to restore them exactly."""
    adaptive = method == "asam"
    t = [(p.abs() + eta if adaptive and s else None) for p, s in zip(params, scaled, strict=True)]
    tg = [(g if tw is None else tw * g) for g, tw in zip((p.grad for p in params), t, strict=True) if g is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in tg])) if tg else 0.0
    scale = rho / (float(norm) + 1e-12)
    before: list[torch.Tensor | None] = []
    for p, tw in zip(params, t, strict=True):
        if p.grad is None:
            before.append(None)
            continue
        before.append(p.detach().clone())
        p.add_((p.grad if tw is None else tw * tw * p.grad) * scale)
    return before


def sharpness_aware_(params: list[torch.nn.Parameter], forward: Callable[[], torch.Tensor], method: str, rho: float,
                     eta: float = 0.01, scaled: list[bool] | None = None) -> float:
    """SAM's (or ASAM's) second pass, given the first pass's gradients in ``params``: step to the worst weights
    within ρ (to first order), take the gradient there in place of the first, and restore the weights exactly.
    The optimizer then moves the original weights along it. ``scaled``: which parameters ASAM scales by their
    size (its authors': those named ``weight``; default all). Returns the loss at the perturbed weights."""
    before = _perturb(params, method, rho, eta, scaled if scaled is not None else [True] * len(params))
    for p in params:
        p.grad = None
    loss = forward()
    loss.backward()
    with torch.no_grad():
        for p, b in zip(params, before, strict=True):
            if b is not None:
                p.copy_(b)
    return float(loss.detach())
