"""KnOTS (operators/merge/knots.py): checked on matrices worked out by hand, against a reference written
from the paper's definition (numpy, float64), on its invariants, and through the engine on LoRA adapters.

The reference (arXiv 2410.19735, §3 and the authors' ``SVDMerger``): for each matrix,
[τ_1 … τ_T] = U Σ [V_1ᵀ … V_Tᵀ] (singular values > eps kept); each task's Σ V_tᵀ is TIES-merged (top-k per
task, sign of the sum, mean of the agreeing entries); the update is U · merged.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from operators.merge import TensorContext, get_method

KNOTS = get_method("knots")


def merge(base, experts, weights=None, names=None, **params):
    p = KNOTS.parse_params(params)
    names = names or [f"e{i}" for i in range(len(experts))]
    return KNOTS.fn(base, experts, weights or [1.0] * len(experts), p, TensorContext("w", None, tuple(names)))


def reference(base: np.ndarray, tvs: list[np.ndarray], density: float = 1.0, scaling: float = 1.0) -> np.ndarray:
    """KnOTS-TIES from the definition, independently of the method's code."""
    d_out, d_in = base.shape
    u, s, vh = np.linalg.svd(np.concatenate(tvs, axis=1), full_matrices=False)
    keep = s > 1e-5
    u, s, vh = u[:, keep], s[keep], vh[keep]
    coords = [np.diag(s) @ vh[:, t * d_in:(t + 1) * d_in] for t in range(len(tvs))]
    trimmed = []
    for c in coords:
        k = max(1, int(density * c.size))
        thr = np.sort(np.abs(c).ravel())[::-1][k - 1] if density < 1 else 0.0
        trimmed.append(np.where(np.abs(c) >= thr, c, 0.0))
    stacked = np.stack(trimmed)
    sign = np.sign(stacked.sum(0))
    majority = np.sign(sign.sum()) or 1.0
    sign = np.where(sign == 0, majority, sign)
    agree = stacked * sign > 0
    merged = (stacked * agree).sum(0) / np.maximum(agree.sum(0), 1)
    return base + scaling * (u @ merged)


def test_by_hand_orthogonal_updates_add_up():
    # [τ1 τ2] = [[1,0,0,0],[0,0,0,2]]: U = [e2 e1], Σ = (2, 1); Σ V_1ᵀ = [[0,0],[1,0]], Σ V_2ᵀ = [[0,2],[0,0]];
    # no entry is shared, so the merge keeps both: U [[0,2],[1,0]] = [[1,0],[0,2]]
    zero = torch.zeros(2, 2)
    got = merge(zero, [torch.tensor([[1.0, 0], [0, 0]]), torch.tensor([[0.0, 0], [0, 2]])])
    torch.testing.assert_close(got, torch.tensor([[1.0, 0], [0, 2]]), rtol=0, atol=1e-6)


def test_by_hand_a_sign_conflict_keeps_the_elected_sign():
    # [τ1 τ2] = [[2,0,-1,0],[0,0,0,0]]: rank 1, Σ Vᵀ = [2,0,-1,0] up to a sign shared with U; the elected sign
    # is that of 2 + (-1): the entry keeps 2 alone (mean of the agreeing entries), U · [2, 0] = [[2,0],[0,0]]
    base = torch.tensor([[0.5, 0.0], [0.0, -0.5]])
    got = merge(base, [base + torch.tensor([[2.0, 0], [0, 0]]), base + torch.tensor([[-1.0, 0], [0, 0]])], scaling=0.5)
    torch.testing.assert_close(got, base + 0.5 * torch.tensor([[2.0, 0], [0, 0]]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2])
def test_matches_the_papers_definition_on_low_rank_updates(density):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(12, 9, generator=g)
    tvs = [torch.randn(12, 2, generator=g) @ torch.randn(2, 9, generator=g) for _ in range(3)]  # rank 2 each
    got = merge(base, [base + tv for tv in tvs], density=density, scaling=0.8)
    want = reference(base.double().numpy(), [tv.double().numpy() for tv in tvs], density=density, scaling=0.8)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=1e-5)
    assert got.dtype == torch.float32


def test_invariants():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(8, 6, generator=g)
    tvs = [torch.randn(8, 3, generator=g) @ torch.randn(3, 6, generator=g) for _ in range(3)]
    experts = [base + tv for tv in tvs]
    # one expert is itself, at λ; identical experts are that expert; λ = 0 is the base
    torch.testing.assert_close(merge(base, experts[:1], scaling=0.7), base + 0.7 * tvs[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(merge(base, [experts[0]] * 3), experts[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(merge(base, experts, scaling=0.0), base, rtol=0, atol=0)
    # expert order does not change the merge (names move with the experts)
    a = merge(base, experts, names=["a", "b", "c"])
    b = merge(base, experts[::-1], names=["c", "b", "a"])
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # the update stays in the span of the experts' updates: rank ≤ Σ ranks
    assert torch.linalg.matrix_rank(merge(base, experts) - base).item() <= 9
    # a tensor no expert changed is the base's, bit for bit; a vector (bias) is TIES without the SVD
    torch.testing.assert_close(merge(base, [base, base]), base, rtol=0, atol=0)
    bias = torch.zeros(4)
    got = merge(bias, [torch.tensor([1.0, -2, 0, 3]), torch.tensor([3.0, 2, 0, -1])])
    torch.testing.assert_close(got, torch.tensor([2.0, 2, 0, 3]), rtol=0, atol=0)  # by hand: sign, then mean


def test_through_the_engine_on_lora_adapters(tmp_path):
    """Two LoRA adapters of a pico Llama merged by the engine with knots: every targeted matrix equals KnOTS of
    the folded ΔW = B·A·scaling, and the untargeted ones stay the base's."""
    from transformers import LlamaForCausalLM

    from operators.merge.engine import merge_checkpoints
    from operators.tensor_io import load_state_dict
    from tests.test_lora_merge import (
        QKO_SCALING,
        QV_SCALING,
        _llama_config,
        _save_model,
        hand_full_weights,
        make_adapter,
    )

    torch.manual_seed(0)
    base_dir = _save_model(LlamaForCausalLM(_llama_config()), tmp_path / "base")
    qv = make_adapter(base_dir, tmp_path / "qv", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    qko = make_adapter(base_dir, tmp_path / "qko", 2, r=8, lora_alpha=16, use_rslora=True,
                       target_modules=["q_proj", "k_proj", "o_proj"])
    out = tmp_path / "merged"
    merge_checkpoints(base_dir, {"qv": qv, "qko": qko}, "knots", {"scaling": 0.6}, out)
    got, base = load_state_dict(out), load_state_dict(base_dir)
    full = {"qko": hand_full_weights(base_dir, qko, QKO_SCALING), "qv": hand_full_weights(base_dir, qv, QV_SCALING)}
    for key in base:
        want = merge(base[key], [full["qko"][key], full["qv"][key]], names=["qko", "qv"], scaling=0.6)
        torch.testing.assert_close(got[key], want.to(got[key].dtype), rtol=0, atol=1e-6)
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
