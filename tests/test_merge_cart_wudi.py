"""CART and WUDI, checked against numbers worked out by hand and against the authors' definitions
written out another way (an eigendecomposition for CART's truncated SVD; autograd through the paper's
loss, stepped by torch's Adam, for WUDI).

- CART (arXiv 2412.12153): θ̄ = θ_0 + mean_t τ_t, θ = θ̄ + λ Σ_t SVD_k(θ_t − θ̄) on matrices, θ̄ elsewhere.
- WUDI (arXiv 2503.08099): τ_m minimises Σ_t ‖(τ_m − τ_t) τ_tᵀ‖² / ‖τ_t‖², from Σ_t τ_t by Adam (or
  exactly); θ = θ_0 + α τ_m on matrices, θ_0 + α mean_t τ_t elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from operators.merge.cart import CartParams, cart
from operators.merge.wudi import WudiParams, interference_terms, wudi, wudi_loss


def _diag(*v: float) -> torch.Tensor:
    return torch.diag(torch.tensor(v, dtype=torch.float32))


# --- CART ------------------------------------------------------------------------------------------

def test_cart_adds_each_centred_task_vectors_top_direction_to_the_average_by_hand():
    base = torch.full((3, 3), 0.25)
    experts = [base + _diag(9, 0, 0), base + _diag(0, 6, 0), base + _diag(0, 0, 3)]
    # θ̄ − θ_0 = diag(3, 2, 1); C_1 = diag(6, −2, −1) → rank 1: diag(6, 0, 0); C_2 = diag(−3, 4, −1) → diag(0, 4, 0);
    # C_3 = diag(−3, −2, 2) → diag(−3, 0, 0); Σ = diag(3, 4, 0)   (rank_ratio 0.34 of rank 3: k = 1)
    out = cart(base, experts, [1, 1, 1], CartParams(rank_ratio=0.34, scaling=1.0))
    assert torch.allclose(out, base + _diag(6, 6, 1), atol=1e-5)
    out = cart(base, experts, [1, 1, 1], CartParams(rank_ratio=0.34))  # the paper's λ = 2
    assert torch.allclose(out, base + _diag(9, 10, 1), atol=1e-5)
    # full rank: the centred vectors sum to zero, so CART is the average whatever λ
    out = cart(base, experts, [1, 1, 1], CartParams(rank_ratio=1.0, scaling=3.0))
    assert torch.allclose(out, base + _diag(3, 2, 1), atol=1e-5)
    # equal weights of any size are the paper's plain mean
    assert torch.allclose(cart(base, experts, [2, 2, 2], CartParams(rank_ratio=0.34)), base + _diag(9, 10, 1), atol=1e-5)


def test_cart_with_two_tasks_is_the_average():
    # C_2 = −C_1: their truncations cancel, whatever the rank
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=g)
    experts = [base + torch.randn(6, 5, generator=g) for _ in range(2)]
    out = cart(base, experts, [1, 1], CartParams(rank_ratio=0.2, scaling=2.0))
    assert torch.allclose(out, (experts[0] + experts[1]) / 2, atol=1e-5)


def _low_rank_by_eigh(m: torch.Tensor, k: int) -> torch.Tensor:
    """The best rank-k approximation by another route: project onto the top-k eigenvectors of m mᵀ."""
    evals, evecs = torch.linalg.eigh(m @ m.T)
    u = evecs[:, evals.argsort(descending=True)[:k]]
    return u @ (u.T @ m)


def test_cart_matches_its_definition_on_random_matrices_and_is_the_average_off_matrices():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(10, 8, generator=g, dtype=torch.float64)
    experts = [base + torch.randn(10, 8, generator=g, dtype=torch.float64) * s for s in (0.2, 0.5, 1.0, 0.7)]
    out = cart(base.float(), [e.float() for e in experts], [1, 1, 1, 1], CartParams()).double()
    mean = sum(experts) / 4
    k = max(1, int(0.12 * 8))
    want = mean + 2.0 * sum(_low_rank_by_eigh(e - mean, k) for e in experts)
    assert k == 1 and torch.allclose(out, want, atol=1e-4)
    # weighted: θ̄ by the normalized weights, each centred vector's share T p_t
    w = [3.0, 1.0, 1.0, 1.0]
    p = [x / sum(w) for x in w]
    wmean = sum(pi * e for pi, e in zip(p, experts, strict=True))
    want = wmean + 2.0 * sum(4 * pi * _low_rank_by_eigh(e - wmean, k) for pi, e in zip(p, experts, strict=True))
    out = cart(base.float(), [e.float() for e in experts], w, CartParams()).double()
    assert torch.allclose(out, want, atol=1e-4)
    bias = torch.tensor([1.0, 2.0])
    out = cart(bias, [bias + torch.tensor([3.0, 0.0]), bias + torch.tensor([0.0, 3.0]), bias], [1, 1, 1], CartParams())
    assert torch.allclose(out, torch.tensor([2.0, 3.0]))
    assert torch.equal(cart(bias, [bias.clone(), bias.clone()], [1, 1], CartParams()), bias), "untouched: the base"


# --- WUDI ------------------------------------------------------------------------------------------

def test_wudi_exact_minimum_by_hand():
    # τ_1 = [[1, 0], [0, 0]], τ_2 = [[1, 1], [0, 0]]; ‖τ_1‖² = 1, ‖τ_2‖² = 2
    # S = G_1 + G_2 / 2 = [[1.5, .5], [.5, .5]], C = τ_1 G_1 + τ_2 G_2 / 2 = [[2, 1], [0, 0]]
    # τ_m = C S⁻¹ = [[2, 1], [0, 0]] · [[1, −1], [−1, 3]] = [[1, 1], [0, 0]]: it acts on τ_1's row (1, 0) as τ_1
    # does and on τ_2's row (1, 1) as τ_2 does, where the sum [[2, 1], [0, 0]] interferes with both
    base = torch.full((2, 2), 0.5)
    t1, t2 = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    s, c = interference_terms(torch.stack([t1, t2]))
    assert torch.allclose(s, torch.tensor([[1.5, 0.5], [0.5, 0.5]])) and torch.allclose(c, torch.tensor([[2.0, 1.0], [0.0, 0.0]]))
    out = wudi(base, [base + t1, base + t2], [1, 1], WudiParams(solver="exact"))
    assert torch.allclose(out, base + torch.tensor([[1.0, 1.0], [0.0, 0.0]]), atol=1e-5)
    assert float(wudi_loss(out - base, torch.stack([t1, t2]))) < 1e-9
    assert float(wudi_loss(t1 + t2, torch.stack([t1, t2]))) == pytest.approx(1.0 + 1.0 / 2)  # the sum interferes: 1 + 1/2
    # Adam walks there from the sum (a large learning rate, many steps)
    out = wudi(base, [base + t1, base + t2], [1, 1], WudiParams(learning_rate=0.01, iterations=3000))
    assert torch.allclose(out, base + torch.tensor([[1.0, 1.0], [0.0, 0.0]]), atol=2e-3)
    # α scales the merged task vector; weights scale each task's vector first
    out = wudi(base, [base + t1, base + t2], [1, 1], WudiParams(solver="exact", scaling=0.5))
    assert torch.allclose(out, base + torch.tensor([[0.5, 0.5], [0.0, 0.0]]), atol=1e-5)
    out = wudi(base, [base + t1, base + t2], [2, 2], WudiParams(solver="exact"))
    assert torch.allclose(out, base + torch.tensor([[2.0, 2.0], [0.0, 0.0]]), atol=1e-5)


def test_wudi_gradient_is_the_papers_loss_gradient():
    g = torch.Generator().manual_seed(1)
    tv = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    m = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    wudi_loss(m, tv).backward()
    s, c = interference_terms(tv.float())
    assert torch.allclose(2 * (m.detach().float() @ s - c), m.grad.float(), rtol=1e-4, atol=1e-5)


def _authors_wudi(vectors: torch.Tensor, iter_num: int, lr: float) -> torch.Tensor:
    """The authors' get_redundant_task_vector (nathanielyvo/WUDI-Merging, vit/wudi_main.py), on the CPU."""
    merging_vector = torch.nn.Parameter(torch.sum(vectors, dim=0))
    optimizer = torch.optim.Adam([merging_vector], lr=lr, weight_decay=0)
    l2_norms = torch.square(torch.norm(vectors.reshape(vectors.shape[0], -1), p=2, dim=-1))
    for _ in range(iter_num):
        disturbing_vectors = merging_vector.unsqueeze(0) - vectors
        inner_product = torch.matmul(disturbing_vectors, vectors.transpose(1, 2))
        loss = torch.sum(torch.square(inner_product) / l2_norms.unsqueeze(-1).unsqueeze(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return merging_vector.data.detach()


@pytest.mark.parametrize("iterations,lr", [(300, 1e-5), (200, 1e-3)])
def test_wudi_takes_the_authors_adam_steps(iterations, lr):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(12, 9, generator=g)
    tv = torch.randn(4, 12, 9, generator=g) * 0.01  # fine-tune-sized updates: lr 1e-5 moves them visibly
    want = base + _authors_wudi(tv.clone(), iterations, lr)
    out = wudi(base, [base + t for t in tv], [1] * 4, WudiParams(iterations=iterations, learning_rate=lr))
    assert torch.allclose(out, want, atol=1e-6, rtol=1e-4)
    assert not torch.allclose(out, base + tv.sum(0), atol=1e-4), "the steps moved it from the sum"
    # the loss went down from the sum's
    assert wudi_loss(out - base, tv) < wudi_loss(tv.sum(0), tv)


def test_wudi_off_matrices_is_the_mean_task_vector():
    bias = torch.tensor([1.0, 2.0])
    out = wudi(bias, [bias + torch.tensor([2.0, 0.0]), bias + torch.tensor([0.0, 4.0])], [1, 1], WudiParams(scaling=0.5))
    assert torch.allclose(out, torch.tensor([1.5, 3.0]))
    assert torch.equal(wudi(bias, [bias.clone()], [1], WudiParams()), bias)
