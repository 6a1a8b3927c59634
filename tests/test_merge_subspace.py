"""Subspace merges, checked against numbers worked out by hand and against references written from the
papers' definitions by another route (eigendecompositions where the methods use SVDs):

- Iso-C (arXiv 2502.04959): θ = θ_0 + α σ̄ U Vᵀ of Σ_t w_t τ_t = U Σ Vᵀ (matrices); the mean task vector else.
- Iso-CTS (the same paper): the sum's top-k triplets (common) and each task's top (r − k)/T outside them,
  U and V decorrelated, every singular value their mean.
- TSV-M (arXiv 2412.00081): each task's top ⌊rank/T⌋ singular triplets, the tasks' U and V decorrelated
  (their polar factors), θ = θ_0 + α U⊥ Σ̂ V⊥ᵀ (matrices); the mean task vector else.
"""

from __future__ import annotations

import math

import pytest
import torch

from operators.merge.cart import CartParams, cart
from operators.merge.engine import merge_checkpoints
from operators.merge.iso_c import IsoCParams, iso_c
from operators.merge.iso_cts import IsoCtsParams, iso_cts, subspace_sizes
from operators.merge.tsv_m import TsvMParams, tsv_m
from operators.merge.wudi import WudiParams, wudi
from operators.tensor_io import load_state_dict


def _diag(*v: float) -> torch.Tensor:
    return torch.diag(torch.tensor(v, dtype=torch.float32))


# --- Iso-C ---------------------------------------------------------------------------------------

def test_iso_c_flattens_the_spectrum_of_the_summed_task_vectors_by_hand():
    base = torch.full((2, 2), 0.5)
    # Σ τ = diag(3, 1): σ = (3, 1), σ̄ = 2, U Vᵀ = I  →  θ = θ_0 + 2 I
    out = iso_c(base, [base + _diag(3, 0), base + _diag(0, 1)], [1, 1], IsoCParams())
    assert torch.allclose(out, base + _diag(2, 2), atol=1e-6)
    # α = 0.5 halves it; weights (2, 1) make Σ w τ = diag(6, 1): σ̄ = 3.5
    assert torch.allclose(iso_c(base, [base + _diag(3, 0), base + _diag(0, 1)], [1, 1], IsoCParams(scaling=0.5)),
                          base + _diag(1, 1), atol=1e-6)
    assert torch.allclose(iso_c(base, [base + _diag(3, 0), base + _diag(0, 1)], [2, 1], IsoCParams()),
                          base + _diag(3.5, 3.5), atol=1e-6)
    # Σ τ = [[0, -3], [1, 0]] = R · diag(1, 3), R = [[0, -1], [1, 0]] a rotation: U Vᵀ = R, σ̄ = 2
    out = iso_c(torch.zeros(2, 2), [torch.tensor([[0.0, -3.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 0.0]])],
                [1, 1], IsoCParams())
    assert torch.allclose(out, torch.tensor([[0.0, -2.0], [2.0, 0.0]]), atol=1e-6)


def test_iso_c_keeps_the_sums_directions_with_every_singular_value_their_mean():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(12, 7, generator=g)
    experts = [base + torch.randn(12, 7, generator=g) * s for s in (0.1, 0.5, 1.0)]
    out = iso_c(base, experts, [1, 1, 1], IsoCParams(scaling=1.3)).double()
    summed = sum(e.double() - base.double() for e in experts)
    # reference by another route: σ̄ · Δ (ΔᵀΔ)^(-1/2) (the polar factor through an eigendecomposition)
    evals, evecs = torch.linalg.eigh(summed.T @ summed)
    sigma_bar = evals.sqrt().mean()
    want = base.double() + 1.3 * sigma_bar * summed @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    assert torch.allclose(out, want, atol=1e-4)
    s = torch.linalg.svdvals(out - base.double())
    assert torch.allclose(s, torch.full_like(s, 1.3 * sigma_bar.item()), rtol=1e-4), "a flat spectrum"


def test_iso_c_off_matrices_is_the_mean_task_vector_and_untouched_tensors_stay():
    base = torch.tensor([1.0, 1.0])
    assert torch.allclose(iso_c(base, [torch.tensor([2.0, 4.0]), torch.tensor([4.0, 2.0])], [1, 1], IsoCParams()),
                          torch.tensor([3.0, 3.0]))
    w = torch.randn(3, 3)
    assert torch.equal(iso_c(w, [w.clone(), w.clone()], [1, 1], IsoCParams()), w)


# --- Iso-CTS -------------------------------------------------------------------------------------

def test_iso_cts_gives_each_task_a_subspace_of_its_own_by_hand():
    # 4×4, T = 2, common_fraction 0.5: k = 2 common directions, 1 of each task's own.
    # Σ τ = diag(4, 3, 1, 0.9): common e1 (4), e2 (3). τ_1 outside them: diag(0, 0, 1, 0.5) → e3 (1);
    # τ_2 outside them: diag(0, 0, 0, 0.4) → e4 (0.4). σ̄ = (4 + 3 + 1 + 0.4)/4 = 2.1  →  θ = θ_0 + 2.1 I,
    # where Iso-C flattens the sum's own spectrum: (4 + 3 + 1 + 0.9)/4 = 2.225
    experts = [_diag(4, 0, 1, 0.5), _diag(0, 3, 0, 0.4)]
    out = iso_cts(torch.zeros(4, 4), experts, [1, 1], IsoCtsParams(common_fraction=0.5))
    assert torch.allclose(out, _diag(2.1, 2.1, 2.1, 2.1), atol=1e-6)
    assert torch.allclose(iso_c(torch.zeros(4, 4), experts, [1, 1], IsoCParams()), _diag(2.225, 2.225, 2.225, 2.225))
    # the sizes: k ≈ fraction · rank, the rest equal per task (ViT-B's 768 with 8 tasks at 0.8: 616 + 8 × 19)
    assert subspace_sizes(4, 2, 0.5) == (2, 1) and subspace_sizes(768, 8, 0.8) == (616, 19)
    assert subspace_sizes(3, 5, 0.8) == (3, 0), "fewer directions than tasks: the common subspace only"


def _svd_by_eigh(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    evals, evecs = torch.linalg.eigh(m @ m.T)
    order = evals.argsort(descending=True)[:k]
    u, s = evecs[:, order], evals[order].clamp_min(0).sqrt()
    return u, s, (m.T @ u) / s


def _polar_by_eigh(a: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(a.T @ a)
    return a @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T


def test_iso_cts_matches_its_definition_computed_by_eigendecompositions():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(10, 8, generator=g)
    experts = [base + torch.randn(10, 8, generator=g) * s for s in (0.3, 0.6, 1.0)]
    out = iso_cts(base, experts, [1, 1, 1], IsoCtsParams(scaling=1.2, common_fraction=0.5)).double()
    taus = [e.double() - base.double() for e in experts]
    k, n = subspace_sizes(8, 3, 0.5)
    assert (k, n) == (5, 1)
    uc, sc, vc = _svd_by_eigh(sum(taus), k)
    us, ss, vs = [uc], [sc], [vc]
    for tau in taus:
        u, s, v = _svd_by_eigh(tau - uc @ (uc.T @ tau), n)
        us, ss, vs = us + [u], ss + [s], vs + [v]
    want = base.double() + 1.2 * torch.cat(ss).mean() * _polar_by_eigh(torch.cat(us, 1)) @ _polar_by_eigh(torch.cat(vs, 1)).T
    assert torch.allclose(out, want, atol=1e-4)


# --- TSV-M ---------------------------------------------------------------------------------------

def test_tsv_m_keeps_each_tasks_top_singular_directions_by_hand():
    # T = 2 on 2×2: k = 1 each. τ_1 = diag(3, 1) keeps 3 on e1; τ_2 = diag(0.5, 2) keeps 2 on e2; they are
    # already orthogonal, so θ = θ_0 + diag(3, 2): the small directions (1 and 0.5) are dropped
    out = tsv_m(torch.zeros(2, 2), [_diag(3, 1), _diag(0.5, 2)], [1, 1], TsvMParams())
    assert torch.allclose(out, _diag(3, 2), atol=1e-6)
    # 4×4, k = 2: τ_1 = diag(4, 3, 2, 1) keeps e1, e2; τ_2 = diag(0.1, 0.5, 5, 1) keeps e3 (5) and e4 (1)
    out = tsv_m(torch.zeros(4, 4), [_diag(4, 3, 2, 1), _diag(0.1, 0.5, 5, 1)], [1, 1], TsvMParams(scaling=0.5))
    assert torch.allclose(out, 0.5 * _diag(4, 3, 5, 1), atol=1e-6)
    # per-expert weights scale each task's singular values
    out = tsv_m(torch.zeros(2, 2), [_diag(3, 1), _diag(0.5, 2)], [2, 0.5], TsvMParams())
    assert torch.allclose(out, _diag(6, 1), atol=1e-6)


def test_tsv_m_decorrelates_overlapping_task_directions_as_the_polar_factor():
    # τ_1 = 3 e1 e1ᵀ, τ_2 = 2 u uᵀ with u = (e1 + e2)/√2: Û = V̂ = [e1, u] are not orthogonal.
    # U⊥ = Û (ÛᵀÛ)^(-1/2), with ÛᵀÛ = [[1, c], [c, 1]], c = 1/√2 (its inverse square root by eigh)
    c = 1 / math.sqrt(2)
    e1, u = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([c, c], dtype=torch.float64)
    hat = torch.stack([e1, u], dim=1)
    evals, evecs = torch.linalg.eigh(hat.T @ hat)
    orth = hat @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    want = orth @ torch.diag(torch.tensor([3.0, 2.0], dtype=torch.float64)) @ orth.T
    out = tsv_m(torch.zeros(2, 2), [3 * torch.outer(e1, e1).float(), 2 * torch.outer(u, u).float()], [1, 1],
                TsvMParams()).double()
    assert torch.allclose(out, want, atol=1e-5)
    assert torch.allclose(orth.T @ orth, torch.eye(2, dtype=torch.float64), atol=1e-12)
    assert not torch.allclose(out, want.new_tensor([[3 + 1.0, 1.0], [1.0, 1.0]]), atol=1e-3), \
        "not the plain sum of the kept triplets (3 e1e1ᵀ + 2 uuᵀ)"


def test_tsv_m_off_matrices_is_the_mean_task_vector():
    base = torch.zeros(3)
    out = tsv_m(base, [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])], [1, 1], TsvMParams(scaling=2.0))
    assert torch.allclose(out, torch.tensor([4.0, 4.0, 4.0]))


# --- through the engine ----------------------------------------------------------------------------

@pytest.mark.parametrize("method,fn,params", [("iso_c", iso_c, IsoCParams()), ("iso_cts", iso_cts, IsoCtsParams()),
                                              ("tsv_m", tsv_m, TsvMParams()), ("cart", cart, CartParams()),
                                              ("wudi", wudi, WudiParams())])
def test_the_engine_merges_a_checkpoint_tensor_by_tensor_as_the_method_defines(tiny_base, tiny_experts, tmp_path,
                                                                               method, fn, params):
    report = merge_checkpoints(tiny_base, tiny_experts, method, {}, tmp_path / "m")
    assert report.method == method
    merged, base = load_state_dict(tmp_path / "m"), load_state_dict(tiny_base)
    experts = {n: load_state_dict(p) for n, p in tiny_experts.items()}
    names = sorted(experts)
    matrices = 0
    for key, b in base.items():
        if not b.is_floating_point():
            continue
        want = fn(b, [experts[n][key] for n in names], [1.0] * len(names), params)
        assert torch.allclose(merged[key], want, atol=1e-5), key
        matrices += b.dim() == 2
    assert matrices > 5
    ta = merge_checkpoints(tiny_base, tiny_experts, "task_arithmetic", {"scaling": 1.0}, tmp_path / "ta")
    assert ta.tensors == report.tensors
    key = "encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(load_state_dict(tmp_path / "ta")[key], merged[key], atol=1e-4), "not task arithmetic"
