"""mergekit's remaining methods (DELLA, SCE, NuSLERP, Multi-SLERP, Karcher, Nearswap, Arcee Fusion), checked against
numbers worked out by hand from their definitions (mergekit 0.1.5's code: ``mergekit/merge_methods/`` and
``mergekit/sparsify.py``), and their mergekit configs read into the same merges.
"""

from __future__ import annotations

import math

import pytest
import torch

from operators.merge.arcee_fusion import ArceeFusionParams, arcee_fusion, fence, importance
from operators.merge.della import DellaParams, della, della_linear, keep_probabilities, magprune
from operators.merge.karcher import KarcherParams, karcher
from operators.merge.multislerp import MultislerpParams, multislerp
from operators.merge.nearswap import NearswapParams, nearswap
from operators.merge.nuslerp import NuslerpParams, nuslerp
from operators.merge.registry import TensorContext
from operators.merge.sce import SceParams, sce

T = torch.tensor


# --- DELLA -----------------------------------------------------------------------------------------

def test_della_keep_probabilities_rise_with_magnitude_rank_by_hand():
    # |τ| ranks 0.1 → 0, 0.2 → 1, 0.3 → 2, 0.4 → 3; p = (0.5 − 0.15) + 0.3 · rank / 3
    p = keep_probabilities(T([0.1, -0.4, 0.2, 0.3]), 0.5, 0.15)
    assert torch.allclose(p, T([0.35, 0.65, 0.45, 0.55]))
    # a matrix is ranked row by row; the mean keep rate of each row is the density
    p = keep_probabilities(T([[3.0, 1.0, 2.0], [-1.0, -3.0, 0.5]]), 0.5, 0.1)
    assert torch.allclose(p, T([[0.6, 0.4, 0.5], [0.5, 0.6, 0.4]]))
    assert torch.allclose(keep_probabilities(T([[2.0], [1.0]]), 0.7, 0.1), T([[0.7], [0.7]])), "one-entry rows"


def test_magprune_keeps_each_entry_rescaled_by_its_probability_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    tv = torch.randn(2, 300, 400, generator=g)
    out = magprune(tv, [0.4, 0.6], 0.2, [11, 12], "inverse_keep")
    for t, density in enumerate((0.4, 0.6)):
        kept = out[t] != 0
        assert abs(kept.float().mean().item() - density) < 0.01, "the keep rate is the density"
        p = keep_probabilities(tv[t], density, 0.2)
        assert torch.allclose(out[t][kept], tv[t][kept] / p[kept]), "survivors are τ / p"
        # the largest tenth of each row is kept at ~density + ε·0.9..1, the smallest tenth at ~density − ε
        order = tv[t].abs().argsort(dim=1)
        top, bottom = kept.gather(1, order[:, -40:]).float().mean(), kept.gather(1, order[:, :40]).float().mean()
        assert top > density + 0.15 and bottom < density - 0.15
    assert torch.equal(out, magprune(tv, [0.4, 0.6], 0.2, [11, 12], "inverse_keep")), "same seeds, same drops"
    assert not torch.equal(out, magprune(tv, [0.4, 0.6], 0.2, [11, 13], "inverse_keep"))
    l1 = magprune(tv, [0.4, 0.6], 0.2, [11, 12], "l1")  # mergekit's rescale: each τ's L1 norm kept
    assert torch.allclose(l1.abs().sum(dim=(1, 2)), tv.abs().sum(dim=(1, 2)), rtol=1e-4)
    assert torch.equal((l1 != 0), (out != 0)), "the same entries, rescaled otherwise"


def test_della_at_density_one_is_the_sign_elected_disjoint_mean_by_hand():
    base = T([1.0, 1.0, 1.0])
    experts = [base + T([1.0, -2.0, 3.0]), base + T([2.0, 1.0, -1.0])]
    p = DellaParams(density=1.0)
    # Σ τ = (3, −1, 2): signs +, −, +; agreeing entries' mean: (1 + 2)/2, −2, 3
    assert torch.allclose(della(base, experts, [1, 1], p), base + T([1.5, -2.0, 3.0]))
    # weights (2, 1): w τ = (2, −4, 6), (2, 1, −1); (2 + 2)/(2 + 1), −4/2, 6/2
    assert torch.allclose(della(base, experts, [2, 1], p), base + T([4 / 3, -2.0, 3.0]))
    assert torch.allclose(della(base, experts, [2, 1], DellaParams(density=1.0, normalize=False, scaling=0.5)),
                          base + 0.5 * T([4.0, -4.0, 6.0]))
    # della_linear: the weighted sum, divided by Σ w with normalize
    assert torch.allclose(della_linear(base, experts, [2, 1], DellaParams(density=1.0)),
                          base + T([4.0, -3.0, 5.0]) / 3)
    assert torch.allclose(della_linear(base, experts, [2, 1], DellaParams(density=1.0, normalize=False)),
                          base + T([4.0, -3.0, 5.0]))


def test_della_drops_by_tensor_and_expert_not_by_stream_order():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(40, 30, generator=g)
    experts = [base + torch.randn(40, 30, generator=g) for _ in range(3)]
    ctx = TensorContext(key="layers.0.w", experts=("a", "b", "c"))
    p = DellaParams(density=0.5, epsilon=0.2, seed=3)
    first = della(base, experts, [1, 1, 1], p, ctx)
    assert torch.equal(first, della(base, experts, [1, 1, 1], p, ctx))
    assert not torch.equal(first, della(base, experts, [1, 1, 1], p, TensorContext(key="layers.1.w", experts=ctx.experts)))
    # the merged update is a TIES merge of the pruned vectors: where it moved, it moved with the elected sign of
    # the pruned task vectors (the same draws: magprune with the same seeds)
    from operators.merge.della import magprune
    from operators.merge.task_vectors import elect_sign, stack_task_vectors, tensor_seed

    pruned = magprune(stack_task_vectors(base, experts), [0.5] * 3, 0.2, [tensor_seed(3, ctx.key, n) for n in ctx.experts],
                      "inverse_keep")
    moved = (first - base) != 0
    assert moved.float().mean() > 0.5
    assert torch.equal(torch.sign(first - base)[moved], elect_sign(pruned, "positive")[moved])
    # a density for an expert that is not merged, or outside (0, 1], is refused by name
    with pytest.raises(ValueError, match=r"params.densities names \['z'\]"):
        della(base, experts, [1, 1, 1], DellaParams(densities={"z": 0.5}), ctx)
    with pytest.raises(ValueError, match=r"densities.a: 1.7 must be in \(0, 1\]"):
        DellaParams(densities={"a": 1.7})


def test_della_refuses_probabilities_outside_zero_one():
    with pytest.raises(ValueError, match=r"density: 0.1 ± epsilon 0.15 must stay inside \(0, 1\)"):
        DellaParams(density=0.1)
    with pytest.raises(ValueError, match=r"densities.a: 0.9 ± epsilon 0.15"):
        DellaParams(densities={"a": 0.9})


# --- SCE -------------------------------------------------------------------------------------------

def test_sce_selects_calculates_and_erases_by_hand():
    base = T([0.5, 0.5, 0.5, 0.5])
    t1, t2 = T([1.0, 2.0, 0.0, -1.0]), T([3.0, -2.0, 0.0, 1.0])
    # η = mean(τ²) normalized: 1.5, 3.5 → 0.3, 0.7. Signs of Σ τ = (4, 0, 0, 0): +, + (a zero sum), +, +.
    # entry 0: (0.3·1 + 0.7·3) / 1; entry 1: only τ_1 agrees → 2; entry 2: nobody → 0; entry 3: only τ_2 → 1
    out = sce(base, [base + t1, base + t2], [1, 1], SceParams())
    assert torch.allclose(out, base + T([2.4, 2.0, 0.0, 1.0]))
    # select_topk 0.5: variances (1, 4, 0, 1); 3 non-zero → k = 1: entry 1 only; η = (0.5, 0.5); + elected → 2
    out = sce(base, [base + t1, base + t2], [1, 1], SceParams(select_topk=0.5))
    assert torch.allclose(out, base + T([0.0, 2.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="weights: sce weighs each task"):
        sce(base, [base + t1, base + t2], [1, 2], SceParams())


# --- Nearswap --------------------------------------------------------------------------------------

def test_nearswap_takes_the_other_model_where_it_is_near_by_hand():
    base, other = T([0.0, 0.0, 0.0]), T([0.5, 2.0, -0.1])
    # |Δ| = (0.5, 2, 0.1), t = 0.5: w = (1, 0.25, 1 (5 clamped))
    assert torch.allclose(nearswap(base, [other], [1], NearswapParams(t=0.5)), T([0.5, 0.5, -0.1]))
    assert torch.equal(nearswap(base, [base.clone()], [1], NearswapParams(t=0.1)), base), "equal: either"
    with pytest.raises(ValueError, match="exactly one other model"):
        nearswap(base, [other, other], [1, 1], NearswapParams(t=0.5))


# --- NuSLERP, Multi-SLERP, Karcher ------------------------------------------------------------------

def test_nuslerp_interpolates_task_vectors_on_the_sphere_by_hand():
    base = T([1.0, 1.0])
    a, b = base + T([1.0, 0.0]), base + T([0.0, 1.0])  # orthogonal task vectors: Ω = π/2
    h = math.sin(math.pi / 4)
    assert torch.allclose(nuslerp(base, [a, b], [1, 1], NuslerpParams()), base + T([h, h]))
    # t = w_1 / (w_0 + w_1) = 0.75: (sin(π/8), sin(3π/8))
    assert torch.allclose(nuslerp(base, [a, b], [1, 3], NuslerpParams()),
                          base + T([math.sin(math.pi / 8), math.sin(3 * math.pi / 8)]))
    # colinear task vectors: the straight line
    assert torch.allclose(nuslerp(base, [base + T([1.0, 0.0]), base + T([3.0, 0.0])], [1, 1], NuslerpParams()),
                          base + T([2.0, 0.0]))
    # the models themselves (no base): θ_a = (2, 1), θ_b = (1, 2)
    want = (math.sin(0.5 * math.acos(0.8)) / math.sin(math.acos(0.8))) * T([3.0, 3.0])
    assert torch.allclose(nuslerp(base, [a, b], [1, 1], NuslerpParams(relative_to_base=False)), want, atol=1e-6)


def test_nuslerp_row_by_row_and_column_by_column():
    base = torch.zeros(2, 2)
    v0, v1 = T([[1.0, 0.0], [1.0, 0.0]]), T([[0.0, 1.0], [2.0, 0.0]])
    h = math.sin(math.pi / 4)
    # rows: row 0 orthogonal → (h, h); row 1 colinear → the mean (1.5, 0)
    assert torch.allclose(nuslerp(base, [v0, v1], [1, 1], NuslerpParams(flatten=False)), T([[h, h], [1.5, 0.0]]))
    # columns (row_wise, mergekit's naming): column 0 = (1, 1) and (0, 2), column 1 = (0, 0) and (1, 0)
    c0 = math.acos(2 / (math.sqrt(2) * 2))
    s = math.sin(0.5 * c0) / math.sin(c0)
    # column 1: a zero vector counts as orthogonal to anything (its unit vector is 0, cos Ω = 0): sin(π/4) · (1, 0)
    want = T([[s * 1.0, math.sin(math.pi / 4)], [s * 3.0, 0.0]])
    assert torch.allclose(nuslerp(base, [v0, v1], [1, 1], NuslerpParams(flatten=False, row_wise=True)), want, atol=1e-6)


def test_multislerp_is_the_normalized_mean_direction_times_the_mean_norm_by_hand():
    base = T([0.5, -0.5])
    # unit directions (1, 0) and (0, 1), norms 2 and 4, equal weights: m = (h, h), scale (2 + 4)/2
    h = math.sqrt(0.5)
    out = multislerp(base, [base + T([2.0, 0.0]), base + T([0.0, 4.0])], [1, 1], MultislerpParams())
    assert torch.allclose(out, base + 3.0 * T([h, h]), atol=1e-6)
    # weights (1, 3) → (0.25, 0.75): the tangent of the normalized mean vanishes, so m = (1, 3)/√10, scale 3.5
    out = multislerp(base, [base + T([2.0, 0.0]), base + T([0.0, 4.0])], [1, 3], MultislerpParams())
    assert torch.allclose(out, base + 3.5 * T([1.0, 3.0]) / math.sqrt(10), atol=1e-6)
    with pytest.raises(ValueError, match="cancel out"):
        multislerp(base, [base + T([1.0, 0.0]), base + T([-1.0, 0.0]), base + T([0.0, 0.0])], [1, 1, 1], MultislerpParams())


def test_karcher_mean_is_the_mean_angle_on_the_circle_by_hand():
    # directions at 0°, 90°, 0°: the Karcher mean is at 30° (the normalized Euclidean mean would be at 26.6°)
    xs = [T([2.0, 0.0]), T([0.0, 1.0]), T([1.0, 0.0])]
    out = karcher(None, xs, [1, 1, 1], KarcherParams())
    want = (4 / 3) * T([math.cos(math.pi / 6), math.sin(math.pi / 6)])  # × the mean norm (2 + 1 + 1)/3
    assert torch.allclose(out, want, atol=1e-5)
    h = math.sqrt(0.5)
    assert torch.allclose(karcher(None, [T([1.0, 0.0]), T([0.0, 3.0])], [1, 1], KarcherParams()), 2 * T([h, h]), atol=1e-6)
    assert torch.equal(karcher(None, [torch.zeros(2), torch.zeros(2)], [1, 1], KarcherParams()), torch.zeros(2))


# --- through the engine ----------------------------------------------------------------------------

@pytest.mark.parametrize("method,params", [("della", {"density": 0.5}), ("della_linear", {"density": 0.6}),
                                           ("sce", {"select_topk": 0.5}), ("nuslerp", {"flatten": False}),
                                           ("multislerp", {}), ("karcher", {})])
def test_the_engine_merges_each_tensor_as_the_method_defines(tiny_base, tiny_experts, tmp_path, method, params):
    from operators.merge import get_method
    from operators.merge.engine import merge_checkpoints
    from operators.tensor_io import load_state_dict

    merge_checkpoints(tiny_base, tiny_experts, method, params, tmp_path / "m")
    merged, base = load_state_dict(tmp_path / "m"), load_state_dict(tiny_base)
    experts = {n: load_state_dict(p) for n, p in tiny_experts.items()}
    names = sorted(experts)
    spec = get_method(method)
    p = spec.parse_params(params)
    changed = 0
    for key, b in base.items():
        if not b.is_floating_point() or key not in merged:
            continue
        want = spec.fn(b if spec.needs_base else None, [experts[n][key] for n in names], [1.0] * len(names), p,
                       TensorContext(key=key, experts=tuple(names)))
        assert torch.allclose(merged[key], want, atol=1e-6), key
        changed += not torch.equal(merged[key], b)
    assert changed > 5


def test_a_method_for_a_set_number_of_experts_is_refused_before_anything_is_written(tiny_base, tiny_experts, tmp_path):
    from operators.merge.engine import MergeError, merge_checkpoints

    assert len(tiny_experts) == 2
    with pytest.raises(MergeError, match=r"nearswap merges exactly 1 expert \(the base aside\), not 2"):
        merge_checkpoints(tiny_base, tiny_experts, "nearswap", {"t": 0.1}, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_weights_that_sum_to_zero_are_refused_by_name():
    x = [T([1.0, 0.0]), T([0.0, 1.0])]
    with pytest.raises(ValueError, match=r"weights: \[0, 0\] sum to 0"):
        karcher(None, x, [0, 0], KarcherParams())
    with pytest.raises(ValueError, match=r"weights: \[1, -1\] sum to 0, so normalize_weights cannot divide"):
        multislerp(torch.zeros(2), x, [1, -1], MultislerpParams())
    with pytest.raises(ValueError, match="weights: sce weighs each task"):
        SceParams(weights={"a": 2.0})


def test_the_engine_passes_the_weights_to_nuslerp(tiny_base, tiny_experts, tmp_path):
    from operators.merge.engine import merge_checkpoints
    from operators.tensor_io import load_state_dict

    names = sorted(tiny_experts)
    merge_checkpoints(tiny_base, tiny_experts, "nuslerp", {"weights": {names[0]: 1.0, names[1]: 3.0}}, tmp_path / "m")
    merged, base = load_state_dict(tmp_path / "m"), load_state_dict(tiny_base)
    experts = {n: load_state_dict(p) for n, p in tiny_experts.items()}
    key = next(k for k, v in base.items() if v.dim() == 2 and not torch.equal(experts[names[0]][k], v))
    v0, v1 = (experts[n][key].double() - base[key].double() for n in names)
    omega = math.acos(float((v0 * v1).sum() / (v0.norm() * v1.norm())))
    want = base[key].double() + (math.sin(0.25 * omega) * v0 + math.sin(0.75 * omega) * v1) / math.sin(omega)  # t = 3/4
    assert torch.allclose(merged[key].double(), want, atol=1e-5)


@pytest.mark.parametrize("method,params", [("della", {"density": 0.5}), ("della_linear", {"density": 0.4, "rescale": "l1"}),
                                           ("della", {"density": 0.6, "rescale": "l1", "epsilon": 0.3})])
def test_della_in_row_blocks_draws_and_merges_what_it_does_whole(tiny_base, tiny_experts, tmp_path, method, params):
    """Each element's draw hashes its index, and the L1 factors come from a pass over the whole tensor: a merge in
    blocks of 64 elements is bit for bit the whole-tensor merge."""
    from operators.merge.della import uniforms
    from operators.merge.engine import merge_checkpoints
    from operators.tensor_io import load_state_dict

    merge_checkpoints(tiny_base, tiny_experts, method, params, tmp_path / "whole")
    merge_checkpoints(tiny_base, tiny_experts, method, params, tmp_path / "blocks", chunk_elements=64)
    whole, blocks = load_state_dict(tmp_path / "whole"), load_state_dict(tmp_path / "blocks")
    assert all(torch.equal(whole[k], blocks[k]) for k in whole)
    u = uniforms(7, 0, 100_000)
    assert torch.equal(u[500:900], uniforms(7, 500, 400)) and 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float((u < 0.3).float().mean()) - 0.3) < 0.005
    assert not torch.equal(u, uniforms(8, 0, 100_000))


# --- Arcee Fusion ------------------------------------------------------------------------------------

def test_arcee_fusion_fence_is_median_plus_one_and_a_half_iqr_of_order_statistics_by_hand():
    # ten scores 0..9: indices ⌊q·9⌋ = 2, 4, 6 → q25 2, median 4, q75 6 → fence 4 + 1.5·4 = 10
    assert float(fence(torch.arange(10.0).flip(0))) == 10.0
    # eleven, with an outlier: ⌊q·10⌋ = 2, 5, 7 → 2, 5, 7 → fence 5 + 7.5 = 12.5
    assert float(fence(torch.cat([torch.arange(10.0), T([100.0])]))) == 12.5


def test_arcee_fusion_keeps_only_the_changes_past_the_fence():
    # importance of a row that did not move is 0; KL of softmax([2, 0]) from softmax([0, 0]) worked out:
    p = torch.softmax(T([2.0, 0.0]), 0)
    kl = float((p * torch.log(p / 0.5)).sum())
    base = torch.zeros(6, 2)
    other = base.clone()
    other[0] = T([2.0, 0.0])  # the one row that moves: |Δ| = [2, 0] times its KL
    scores = importance(base, other)
    assert torch.allclose(scores[0], T([2.0 * kl, 0.0]), atol=1e-6) and float(scores[1:].abs().max()) == 0.0
    # 12 scores, 11 of them 0: every quantile 0, fence 0 → every entry "reaches" it and is kept (mergekit's ≥)
    assert torch.equal(arcee_fusion(base, [other], [1.0], ArceeFusionParams()), other)
    # spread scores (12 moving rows; the second column never moves, so 12 of the 24 scores are 0): the order
    # statistics at ⌊q·23⌋ = 5, 11, 17 are 0, 0 and the 6th moving row's score, so the fence is 1.5 times that
    other = torch.tensor([[0.1 * i, 0.0] for i in range(1, 12)] + [[5.0, 0.0]])
    base = torch.zeros_like(other)
    got = arcee_fusion(base, [other], [1.0], ArceeFusionParams())
    s = importance(base, other)
    assert torch.equal(torch.sort(s.reshape(-1)).values[17], s[5, 0])
    kept = got[:, 0] != 0
    assert kept.tolist() == (s[:, 0] >= 1.5 * s[5, 0]).tolist()
    assert not kept[:6].any() and kept[-1] and torch.equal(got[kept], other[kept])
