"""Breadcrumbs, consensus (TALL masks), LiNeS, SLERP, Model Stock and the mergekit-semantics options,
each against values worked out by hand, plus their invariants."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from operators.merge import TensorContext, get_method
from operators.merge.engine import merge_checkpoints
from operators.merge.lines import layer_indices, lines_scale
from operators.tensor_io import load_state_dict


def run(name, experts, weights=None, base=None, names=None, **params):
    m = get_method(name)
    ctx = TensorContext("w", experts=tuple(names) if names else ())
    return m.fn(base, experts, weights or [1.0] * len(experts), m.parse_params(params), ctx)


# --- breadcrumbs ----------------------------------------------------------------------------------

ROW1 = torch.tensor([10.0, -9.0, 8.0, 7.0, -6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
ROW2 = torch.tensor([0.95, 0.85, -0.75, 0.65, 0.55, 0.45, 0.35, 0.25, 0.15, 0.05])
TAU = torch.stack([ROW1, ROW2])  # one 2 × 10 task vector
ZERO = torch.zeros(2, 10)


def test_breadcrumbs_per_row_by_hand():
    # per row of 10: drop ⌊0.1·10⌋ = 1 outlier, keep the next ⌊0.3·10⌋ = 3
    #   row 1: drop 10, keep -9, 8, 7;   row 2: drop 0.95, keep 0.85, -0.75, 0.65
    want = torch.zeros(2, 10)
    want[0, 1:4] = torch.tensor([-9.0, 8.0, 7.0])
    want[1, 1:4] = torch.tensor([0.85, -0.75, 0.65])
    got = run("breadcrumbs", [ZERO + TAU], base=ZERO, density=0.3, gamma=0.1, scaling=1.0)
    assert torch.allclose(got, want)


def test_breadcrumbs_per_tensor_by_hand_and_weighted_sum():
    # whole tensor of 20: drop ⌊0.1·20⌋ = 2 outliers (10, -9), keep the next ⌊0.3·20⌋ = 6 (8, 7, -6, 5, 4, 3)
    want = torch.zeros(2, 10)
    want[0, 2:8] = torch.tensor([8.0, 7.0, -6.0, 5.0, 4.0, 3.0])
    got = run("breadcrumbs", [ZERO + TAU], base=ZERO, density=0.3, gamma=0.1, scaling=1.0, scope="tensor")
    assert torch.allclose(got, want)
    # two experts with weights 2 and 1 and λ = 0.5: 0.5 · (2 τ̃ + τ̃) = 1.5 τ̃
    got = run("breadcrumbs", [ZERO + TAU, ZERO + TAU], [2.0, 1.0], base=ZERO, density=0.3, gamma=0.1,
              scaling=0.5, scope="tensor")
    assert torch.allclose(got, 1.5 * want)


def test_breadcrumbs_keeps_density_when_outliers_and_kept_overlap():
    # density 0.9 and gamma 0.2 of 10 entries: 9 kept, so only 1 outlier can go (mergekit's rule)
    got = run("breadcrumbs", [ROW1], base=torch.zeros(10), density=0.9, gamma=0.2, scaling=1.0)
    assert torch.equal(got, torch.cat([torch.zeros(1), ROW1[1:]]))


def test_breadcrumbs_with_sign_election_by_hand():
    # density 1, gamma 0 keep everything; τ1 = [1,-2,3,0], τ2 = [-3,1,1,2] → Σ = [-2,-1,4,2] → signs [-,-,+,+]
    t1, t2, z = torch.tensor([1.0, -2.0, 3.0, 0.0]), torch.tensor([-3.0, 1.0, 1.0, 2.0]), torch.zeros(4)
    got = run("breadcrumbs", [t1, t2], base=z, density=1.0, gamma=0.0, scaling=1.0, sign_election=True)
    assert torch.allclose(got, torch.tensor([-3.0, -2.0, 4.0, 2.0]))  # dis-sum
    got = run("breadcrumbs", [t1, t2], base=z, density=1.0, gamma=0.0, scaling=1.0, sign_election=True, normalize=True)
    assert torch.allclose(got, torch.tensor([-3.0, -2.0, 2.0, 2.0]))  # divided by the agreeing count


# --- consensus / TALL masks -----------------------------------------------------------------------

T1, T2, T3 = torch.tensor([1.0, 0.1, 2.0, 0.0]), torch.tensor([1.0, 2.0, -2.0, 0.0]), torch.tensor([0.0, 0.1, 0.0, 3.0])


def test_consensus_by_hand():
    # τ_MTL = [2, 2.2, 0, 3]; λ = 0.5:
    #   m1 = |τ1| ≥ 0.5|MTL−τ1| = [1,.1,2,0] ≥ [.5,1.05,1,1.5] → [1,0,1,0]
    #   m2 = [1,2,2,0] ≥ [.5,.1,1,1.5]                        → [1,1,1,0]
    #   m3 = [0,.1,0,3] ≥ [1,1.05,0,0]                        → [0,0,1,1]
    # votes [2,1,3,1]
    z = torch.zeros(4)
    got = run("consensus", [T1, T2, T3], base=z, lam=0.5, k=2, scaling=1.0)
    assert torch.allclose(got, torch.tensor([2.0, 0.0, 0.0, 0.0]))
    got = run("consensus", [T1, T2, T3], base=z, lam=0.5, k=1, scaling=0.5)
    assert torch.allclose(got, 0.5 * torch.tensor([2.0, 2.2, 0.0, 3.0]))
    assert torch.equal(run("consensus", [T1, T2, T3], base=z, lam=0.5, k=3, scaling=1.0), z)


def test_consensus_per_task_lambdas_and_k_too_large():
    z = torch.zeros(4)
    # λ_3 = 0.01 makes m3 = [0, 1 (0.1 ≥ 0.021), 1, 1] → votes [2,2,3,1] → keep [1,1,1,0]
    got = run("consensus", [T1, T2, T3], base=z, names=["a", "b", "c"], lam=0.5, lambdas={"c": 0.01}, k=2, scaling=1.0)
    assert torch.allclose(got, torch.tensor([2.0, 2.2, 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"params.k: 4 is more than the 3 experts"):
        run("consensus", [T1, T2, T3], base=z, k=4)


# --- SLERP ----------------------------------------------------------------------------------------

def test_slerp_by_hand():
    s = math.sqrt(0.5)
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    # Ω = π/2: sin(π/4) · v0 + sin(π/4) · v1
    assert torch.allclose(run("slerp", [v0, v1], t=0.5), torch.tensor([s, 2 * s]))
    assert torch.allclose(run("slerp", [v0, v1], t=0.0), v0) and torch.allclose(run("slerp", [v0, v1], t=1.0), v1)
    # order swaps which is t = 0
    assert torch.allclose(run("slerp", [v0, v1], names=["a", "b"], t=0.0, order=("b", "a")), v1)
    # colinear → lerp: 0.25 · [1,0] + 0.75 · [2,0]
    assert torch.allclose(run("slerp", [v0, 2 * v0], t=0.75), torch.tensor([1.75, 0.0]))
    with pytest.raises(ValueError, match="exactly two models; got 3"):
        run("slerp", [v0, v1, v0])


# --- Model Stock ----------------------------------------------------------------------------------

def test_model_stock_by_hand():
    z = torch.zeros(2)
    # orthogonal offsets: cos = 0 → t = 0 → the base
    assert torch.equal(run("model_stock", [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])], base=z), z)
    # offsets [1,0] and [1,1]: cos = 1/√2, t = 2c/(1+c) = 0.8284; average [1, 0.5]
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    got = run("model_stock", [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])], base=z)
    assert torch.allclose(got, torch.tensor([t, 0.5 * t]))
    # identical runs: cos = 1 → t = 1 → that model
    e = torch.tensor([0.3, -0.2])
    assert torch.allclose(run("model_stock", [e, e.clone()], base=z), e)
    # filter-wise: per row. Row 1 as above; row 2 orthogonal → base
    got = run("model_stock", [torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]])],
              base=torch.zeros(2, 2), filter_wise=True)
    assert torch.allclose(got, torch.tensor([[t, 0.5 * t], [0.0, 0.0]]))


# --- mergekit-semantics options -------------------------------------------------------------------

def test_ties_divisor_by_weights_and_l1_rescale_by_hand():
    z = torch.zeros(2)
    # density 1; τ1 = [2,-1] (w 3), τ2 = [1,1] (w 1): weighted [6,-3], [1,1]; Σ = [7,-2] → signs [+,-]
    #   count divisor:   [7/2, -3/1] = [3.5, -3];   weights divisor: [7/(3+1), -3/3] = [1.75, -1]
    args = ([torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])], [3.0, 1.0])
    assert torch.allclose(run("ties", *args, base=z, density=1.0, scope="tensor"), torch.tensor([3.5, -3.0]))
    assert torch.allclose(run("ties", *args, base=z, density=1.0, scope="tensor", divisor="weights"),
                          torch.tensor([1.75, -1.0]))
    # rescale l1: τ = [4, 1, -2, 0.5] at density 0.5 keeps [4, 0, -2, 0] (L1 6 of 7.5) → × 1.25
    got = run("ties", [torch.tensor([4.0, 1.0, -2.0, 0.5])], base=torch.zeros(4), density=0.5, scope="tensor", rescale="l1")
    assert torch.allclose(got, torch.tensor([5.0, 0.0, -2.5, 0.0]))


def test_ties_per_expert_densities():
    # a keeps ⌊0.5·4⌋ = 2, b keeps ⌊0.25·4⌋ = 1 → [4,0,-2,0] + [0,0,0,3] (no sign conflicts) = [4,0,-2,3]
    a, b, z = torch.tensor([4.0, 1.0, -2.0, 0.5]), torch.tensor([0.1, 0.2, -0.3, 3.0]), torch.zeros(4)
    got = run("ties", [a, b], base=z, names=["a", "b"], density=0.5, densities={"b": 0.25}, scope="tensor")
    assert torch.allclose(got, torch.tensor([4.0, 0.0, -2.0, 3.0]))


def test_dare_l1_rescale_keeps_each_task_vectors_l1_norm():
    base = torch.zeros(1000)
    e = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    got = run("dare_linear", [e], base=base, drop_rate=0.7, scaling=1.0, rescale="l1")
    assert (got == 0).float().mean().item() == pytest.approx(0.7, abs=0.05)
    assert got.abs().sum().item() == pytest.approx(e.abs().sum().item(), rel=1e-5)
    plain = run("dare_linear", [e], base=base, drop_rate=0.7, scaling=1.0, rescale="none")
    assert torch.equal(plain != 0, got != 0) and torch.equal(plain[plain != 0], e[plain != 0])


def test_task_arithmetic_normalize():
    z = torch.zeros(2)
    # (3·[2,0] + 1·[0,4]) / 4 = [1.5, 1]
    got = run("task_arithmetic", [torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])], [3.0, 1.0], base=z,
              scaling=1.0, normalize=True)
    assert torch.allclose(got, torch.tensor([1.5, 1.0]))


# --- invariants -----------------------------------------------------------------------------------

EXPERTS = [torch.randn(3, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
BASE = torch.randn(3, 8, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("name,params", [
    ("breadcrumbs", {"scaling": 0.0}), ("consensus", {"scaling": 0.0}), ("ties", {"scaling": 0.0, "scope": "tensor"}),
])
def test_lambda_zero_gives_base(name, params):
    assert torch.allclose(run(name, EXPERTS, base=BASE, **params), BASE)


@pytest.mark.parametrize("name,params", [
    ("breadcrumbs", {"scaling": 1.0, "density": 1.0, "gamma": 0.0}),
    ("consensus", {"scaling": 1.0, "k": 1}),
    ("model_stock", {}),
])
def test_one_expert_at_full_weight_gives_that_expert(name, params):
    experts = [EXPERTS[0]] * (2 if name == "model_stock" else 1)  # model stock needs two runs
    assert torch.allclose(run(name, experts, base=BASE, **params), EXPERTS[0], atol=1e-6)


@pytest.mark.parametrize("name,params", [
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1}), ("breadcrumbs", {"sign_election": True, "normalize": True}),
    ("consensus", {"lam": 0.3}), ("model_stock", {}), ("model_stock", {"filter_wise": True}),
])
def test_expert_order_does_not_matter(name, params):
    weights = [1.0, 2.0, 0.5]
    ref = run(name, EXPERTS, weights, base=BASE, **params)
    for perm in itertools.permutations(range(3)):
        got = run(name, [EXPERTS[i] for i in perm], [weights[i] for i in perm], base=BASE, **params)
        assert torch.allclose(got, ref, atol=1e-5)


# --- LiNeS ----------------------------------------------------------------------------------------

def test_lines_scale_and_layer_indices():
    # λ(ℓ) = α + β (ℓ−1)/(L−1): L = 4, α = 0.2, β = 0.6 → 0.2, 0.4, 0.6, 0.8; outside blocks α
    assert [lines_scale(layer, 4, 0.2, 0.6) for layer in (1, 2, 3, 4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lines_scale(None, 4, 0.2, 0.6) == 0.2
    keys = ["model.embed_tokens.weight", "model.layers.0.mlp.w", "model.layers.11.attn.q.weight", "lm_head.weight"]
    pattern = get_method("lines").params().layer_pattern
    assert layer_indices(keys, pattern) == {"model.layers.0.mlp.w": 1, "model.layers.11.attn.q.weight": 12}
    with pytest.raises(ValueError, match=r"LiNeS: no parameter name has a block index \(e.g. 'fc1.weight'\).*layer_pattern"):
        layer_indices(["fc1.weight", "fc2.weight"], pattern)


def test_lines_through_the_engine_by_hand(tiny_base, tiny_experts, tmp_path):
    """The pico BERT has 2 blocks: block 1 gets α, block 2 gets α + β, embeddings and heads α."""
    base = load_state_dict(tiny_base)
    experts = [load_state_dict(p) for _, p in sorted(tiny_experts.items())]
    out = tmp_path / "lines"
    merge_checkpoints(tiny_base, tiny_experts, "lines", {"alpha": 0.3, "beta": 0.5}, out)
    merged = load_state_dict(out)
    scale = {"encoder.layer.0.": 0.3, "encoder.layer.1.": 0.8}
    checked = set()
    for k, b in base.items():
        if not b.is_floating_point():
            continue
        lam = next((v for p, v in scale.items() if p in k), 0.3)
        checked.add(lam)
        want = b + lam * sum(e[k] - b for e in experts)
        assert torch.allclose(merged[k], want, atol=1e-6), k
    assert checked == {0.3, 0.8}
    # α by default: (1/T)‖Σ τ_t‖₁ / ‖τ_TA‖₁ = 1/T for task arithmetic at λ = 1, so outside blocks θ_0 + ½ Σ τ
    merge_checkpoints(tiny_base, tiny_experts, "lines", {"beta": 0.0}, tmp_path / "auto")
    auto = load_state_dict(tmp_path / "auto")
    k = "embeddings.word_embeddings.weight"
    assert torch.allclose(auto[k], base[k] + 0.5 * sum(e[k] - base[k] for e in experts), atol=1e-6)


def test_lines_refuses_bad_inner_method():
    with pytest.raises(ValueError, match="does not produce a task vector"):
        get_method("lines").parse_params({"method": "linear"})
    with pytest.raises(ValueError, match=r"method_params \(ties\): params.density"):
        get_method("lines").parse_params({"method": "ties", "method_params": {"density": 2.0}})


def test_zero_sum_sign_election_rule():
    # kept values +1 and −1 cancel in entry 0; the tensor's other entries elect − twice, + once
    z = torch.zeros(4)
    t1, t2 = torch.tensor([1.0, -2.0, -3.0, 1.0]), torch.tensor([-1.0, -1.0, -1.0, 1.0])
    # paper (majority of the tensor's elected signs: −,−,+ → −): entry 0 keeps the −1 → −1
    assert run("ties", [t1, t2], base=z, density=1.0, scope="tensor")[0] == -1.0
    # mergekit (sum ≥ 0 → +): entry 0 keeps the +1 → +1
    assert run("ties", [t1, t2], base=z, density=1.0, scope="tensor", zero_sign="positive")[0] == 1.0
