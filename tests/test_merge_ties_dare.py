"""TIES and DARE against values worked out by hand, their invariants, and the exact streaming
whole-model top-k."""

from __future__ import annotations

import itertools

import pytest
import torch

from operators.merge import TensorContext, get_method
from operators.merge.engine import merge_checkpoints
from operators.merge.task_vectors import global_topk_thresholds, topk_threshold
from operators.tensor_io import load_state_dict

BASE = torch.tensor([1.0, 1.0, 1.0, 1.0])
TAUS = [torch.tensor([4.0, -1.0, 0.5, 2.0]), torch.tensor([-3.0, -2.0, 1.0, -0.2]), torch.tensor([1.0, 3.0, -0.1, 1.0])]
EXPERTS = [BASE + t for t in TAUS]


def run(name, experts=EXPERTS, weights=None, ctx=None, base=BASE, **params):
    m = get_method(name)
    return m.fn(base, experts, weights or [1.0] * len(experts), m.parse_params(params), ctx or TensorContext("w"))


def test_ties_by_hand():
    # density 0.5 of 4 entries → k = 2 per task vector:
    #   τ1 keeps 4, 2            → [ 4,  0, 0, 2]
    #   τ2 keeps -3, -2          → [-3, -2, 0, 0]
    #   τ3: 2nd largest |τ| is 1, tied twice; ties at the threshold are kept → [1, 3, 0, 1]
    # Σ = [2, 1, 0, 3] → elected signs [+, +, (0 → majority +), +]
    # dis-mean over agreeing entries: [(4+1)/2, 3/1, 0, (2+1)/2] = [2.5, 3, 0, 1.5]
    got = run("ties", density=0.5, scaling=1.0, scope="tensor")
    assert torch.allclose(got, BASE + torch.tensor([2.5, 3.0, 0.0, 1.5]))
    # dis-sum: [5, 3, 0, 3]; λ = 0.5 halves it
    got = run("ties", density=0.5, scaling=0.5, merge_func="sum", scope="tensor")
    assert torch.allclose(got, BASE + 0.5 * torch.tensor([5.0, 3.0, 0.0, 3.0]))


def test_ties_sign_election_by_total_mass():
    # one large negative beats two small positives: Σ = 1 + 1 − 5 = −3 → only −5 survives the election
    experts = [BASE + torch.tensor([1.0, 0, 0, 0]), BASE + torch.tensor([1.0, 0, 0, 0]), BASE + torch.tensor([-5.0, 0, 0, 0])]
    got = run("ties", experts, density=1.0, scaling=1.0)
    assert torch.allclose(got, BASE + torch.tensor([-5.0, 0, 0, 0]))


def test_ties_at_density_one_with_agreeing_signs_is_task_arithmetic():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(50, generator=g)
    experts = [base + torch.rand(50, generator=g) + 0.1 for _ in range(3)]  # all τ > 0: signs agree
    ta = run("task_arithmetic", experts, base=base, scaling=0.7)
    assert torch.allclose(run("ties", experts, base=base, density=1.0, scaling=0.7, merge_func="sum"), ta, atol=1e-6)
    # dis-mean divides by the 3 agreeing experts: TA with λ/3
    ta3 = run("task_arithmetic", experts, base=base, scaling=0.7 / 3)
    assert torch.allclose(run("ties", experts, base=base, density=1.0, scaling=0.7), ta3, atol=1e-6)


@pytest.mark.parametrize("name,params", [("ties", {"density": 0.5, "scope": "tensor"}), ("dare_ties", {"drop_rate": 0.0})])
def test_lambda_zero_and_single_expert(name, params):
    assert torch.equal(run(name, scaling=0.0, **params), BASE)
    # one expert at λ = 1, nothing dropped or trimmed → that expert
    full = {**params, "density": 1.0} if name == "ties" else params
    assert torch.allclose(run(name, [EXPERTS[0]], scaling=1.0, **full), EXPERTS[0])


@pytest.mark.parametrize("name,params", [("ties", {"density": 0.5, "scope": "tensor"}), ("dare_ties", {"drop_rate": 0.3}),
                                         ("dare_linear", {"drop_rate": 0.3})])
def test_expert_order_does_not_matter(name, params):
    names = ("a", "b", "c")
    ref = run(name, ctx=TensorContext("w", experts=names), **params)
    for perm in itertools.permutations(range(3)):
        got = run(name, [EXPERTS[i] for i in perm], ctx=TensorContext("w", experts=tuple(names[i] for i in perm)), **params)
        assert torch.allclose(got, ref, atol=1e-6)


def test_dare_at_p_zero_is_its_base_method():
    assert torch.allclose(run("dare_linear", drop_rate=0.0, scaling=0.4), run("task_arithmetic", scaling=0.4))
    assert torch.allclose(run("dare_ties", drop_rate=0.0, scaling=1.0), run("ties", density=1.0, scaling=1.0, scope="tensor"))


def test_dare_drops_and_rescales_unbiasedly_and_reproducibly():
    base = torch.zeros(200_000)
    tau = torch.full((200_000,), 2.0)
    ctx = TensorContext("layer.0.weight", experts=("a",))
    got = run("dare_linear", [base + tau], base=base, ctx=ctx, drop_rate=0.9, scaling=1.0, seed=7)
    kept = got != 0
    assert torch.allclose(got[kept], torch.tensor(20.0)), "survivors are rescaled by 1/(1 − p)"
    assert abs(float(kept.float().mean()) - 0.1) < 0.005, "about 1 − p survive"
    assert abs(float(got.mean()) - 2.0) < 0.1, "unbiased: E[δ̃] = δ"
    again = run("dare_linear", [base + tau], base=base, ctx=ctx, drop_rate=0.9, scaling=1.0, seed=7)
    other = run("dare_linear", [base + tau], base=base, ctx=ctx, drop_rate=0.9, scaling=1.0, seed=8)
    other_tensor = run("dare_linear", [base + tau], base=base, ctx=TensorContext("layer.1.weight", experts=("a",)),
                       drop_rate=0.9, scaling=1.0, seed=7)
    assert torch.equal(got, again)
    assert not torch.equal(got, other) and not torch.equal(got, other_tensor)


def test_topk_threshold_and_radix_select_are_exact():
    g = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(n, generator=g) for i, n in enumerate((1000, 37, 4096, 5))}
    tensors["t1"][:10] = 0.25  # ties
    bases = {k: torch.randn(v.shape, generator=g) for k, v in tensors.items()}

    def stream():
        for k in tensors:
            yield k, bases[k], [bases[k] + tensors[k], bases[k] - 2 * tensors[k]]

    for density in (0.2, 0.5, 0.013, 1.0):
        got = global_topk_thresholds(stream, density, 2)
        # the same thresholds as sorting the whole flattened task vector (what TIES' reference does)
        want = [topk_threshold(torch.cat([((bases[k] + tensors[k]) - bases[k]).flatten() for k in tensors]), density),
                topk_threshold(torch.cat([((bases[k] - 2 * tensors[k]) - bases[k]).flatten() for k in tensors]), density)]
        assert got == want, density
    # hand case: |values| 4, 3, 2, 1 at density 0.5 → k = 2 → threshold 3
    assert topk_threshold(torch.tensor([1.0, -4.0, 2.0, 3.0]), 0.5) == 3.0


def test_ties_whole_model_scope_through_the_engine_equals_in_memory(tiny_base, tiny_experts, tmp_path):
    out = tmp_path / "ties"
    merge_checkpoints(tiny_base, tiny_experts, "ties", {"density": 0.2, "scaling": 1.0}, out, max_shard_bytes=20_000)
    base = load_state_dict(tiny_base)
    experts = {n: load_state_dict(p) for n, p in sorted(tiny_experts.items())}
    keys = [k for k in base if base[k].is_floating_point()]
    thresholds = [topk_threshold(torch.cat([(e[k].float() - base[k].float()).flatten() for k in keys]), 0.2)
                  for e in experts.values()]
    method = get_method("ties")
    p = method.parse_params({"density": 0.2, "scaling": 1.0})
    merged = load_state_dict(out)
    changed = 0
    for k in keys:
        want = method.fn(base[k], [e[k] for e in experts.values()], [1.0, 1.0], p,
                         TensorContext(k, stats=thresholds, experts=tuple(experts)))
        assert torch.allclose(merged[k], want, atol=1e-6), k
        changed += int(not torch.equal(merged[k], base[k]))
    # whole-model top-20%: some tensors keep nothing of either task vector, so differ from per-tensor trimming
    per_tensor = merge_checkpoints(tiny_base, tiny_experts, "ties", {"density": 0.2, "scope": "tensor"}, tmp_path / "pt")
    assert per_tensor.tensors == len(base)
    assert any(not torch.equal(merged[k], load_state_dict(tmp_path / "pt")[k]) for k in keys)
    assert changed > 0


def test_kth_largest_is_exact_on_large_tensors():
    """The sampled bracket is only a shortcut: every k gives torch.kthvalue's answer, even when the
    sample is unrepresentative (a strided sample of a periodic tensor) or values repeat."""
    from operators.merge.task_vectors import kth_largest

    g = torch.Generator().manual_seed(0)
    cases = {
        "gaussian": torch.randn(1_000_000, generator=g).abs(),
        "few distinct values": torch.randint(0, 50, (600_000,), generator=g).float(),
        # non-zero only where the strided sample looks (stride 600000 // 16384 = 36): the sample sees
        # no zeros, though 35 of 36 values are zero, so its bracket misses most k
        "sample-blind": torch.arange(600_000 * 1.0) * (torch.arange(600_000) % 36 == 0),
    }
    for name, a in cases.items():
        n = a.numel()
        for k in (1, 7, n // 5, n // 2, n - 1, n):
            want = float(torch.kthvalue(a, n - k + 1).values) if k < n else float(a.min())
            assert kth_largest(a, k) == want, (name, k)
