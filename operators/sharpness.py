"""Sharpness-aware training: SAM (Foret et al., ICLR 2021, arXiv 2010.01412) and ASAM (Kwon et al., ICML 2021,
arXiv 2102.11600), the second pass of each step that ``operators.finetune``'s loop takes when
``finetune.sharpness`` is set.

    ε = ρ g/‖g‖ (SAM)   or   ε = ρ w²g/‖|w| g‖ (ASAM);   g ← ∇L(w + ε);   w unchanged

The optimizer then steps from w along the gradient taken at the worst nearby weights, which leads to flat
regions of the loss (where experts interfere less when merged).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


@torch.no_grad()
def _perturb(params: list[torch.nn.Parameter], method: str, rho: float) -> list[torch.Tensor | None]:
    """Add SAM's ε (ρ g/‖g‖) or ASAM's (ρ w²g/‖|w| g‖) to the weights; returns their values before, to restore."""
    adaptive = method == "asam"
    scaled = [(p.abs() * p.grad if adaptive else p.grad) for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in scaled])) if scaled else 0.0
    scale = rho / (float(norm) + 1e-12)
    before: list[torch.Tensor | None] = []
    for p in params:
        if p.grad is None:
            before.append(None)
            continue
        before.append(p.detach().clone())
        p.add_((p * p * p.grad if adaptive else p.grad) * scale)
    return before


def sharpness_aware_(params: list[torch.nn.Parameter], forward: Callable[[], torch.Tensor], method: str,
                     rho: float) -> None:
    """SAM's (or ASAM's) second pass, given the first pass's gradients in ``params``: step to the worst weights
    within ρ (to first order), take the gradient there in place of the first, and restore the weights exactly.
    The optimizer then moves the original weights along it."""
    before = _perturb(params, method, rho)
    for p in params:
        p.grad = None
    forward().backward()
    with torch.no_grad():
        for p, b in zip(params, before, strict=True):
            if b is not None:
                p.copy_(b)
