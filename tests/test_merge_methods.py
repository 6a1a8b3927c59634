"""Merge methods against values worked out by hand, and the invariants every method must keep."""

from __future__ import annotations

import itertools

import pytest
import torch

from operators.merge import MERGE_METHODS, TensorContext, get_method, validate_merge_params

# θ0 and two experts, small enough to do on paper:
#   τ1 = e1 − base = [ 1, 0,  1]
#   τ2 = e2 − base = [ 0, 2, -2]
BASE = torch.tensor([1.0, 2.0, -1.0])
E1 = torch.tensor([2.0, 2.0, 0.0])
E2 = torch.tensor([1.0, 4.0, -3.0])


def merge(name, experts, weights=None, base=BASE, **params):
    m = get_method(name)
    p = m.parse_params(params)
    return m.fn(base if m.needs_base else None, experts, weights or [1.0] * len(experts), p, TensorContext("t"))


def test_task_arithmetic_by_hand():
    # θ0 + 0.5·(τ1 + τ2) = [1,2,-1] + 0.5·[1,2,-1] = [1.5, 3, -1.5]
    assert torch.allclose(merge("task_arithmetic", [E1, E2], scaling=0.5), torch.tensor([1.5, 3.0, -1.5]))
    # weights 2 and 1: θ0 + 0.5·(2τ1 + τ2) = [1,2,-1] + 0.5·[2,2,0] = [2, 3, -1]
    assert torch.allclose(merge("task_arithmetic", [E1, E2], [2.0, 1.0], scaling=0.5), torch.tensor([2.0, 3.0, -1.0]))
    # negation forgets a task: θ0 − 1·τ1 = [0, 2, -2]
    assert torch.allclose(merge("task_arithmetic", [E1], [-1.0], scaling=1.0), torch.tensor([0.0, 2.0, -2.0]))


def test_linear_by_hand():
    # uniform soup: ([2,2,0] + [1,4,-3]) / 2
    assert torch.allclose(merge("linear", [E1, E2]), torch.tensor([1.5, 3.0, -1.5]))
    # weights 3:1 → (3·[2,2,0] + [1,4,-3]) / 4 = [7/4, 10/4, -3/4]
    assert torch.allclose(merge("linear", [E1, E2], [3.0, 1.0]), torch.tensor([1.75, 2.5, -0.75]))
    # normalize=False is the plain weighted sum
    assert torch.allclose(merge("linear", [E1, E2], normalize=False), torch.tensor([3.0, 6.0, -3.0]))


def test_weight_averaging_is_task_arithmetic_with_one_over_t():
    # θ0 + (1/T) Σ τ_t equals the mean of the experts
    ta = merge("task_arithmetic", [E1, E2], scaling=0.5)
    assert torch.allclose(ta, merge("linear", [E1, E2]))


@pytest.mark.parametrize("name", ["task_arithmetic"])
def test_lambda_zero_gives_base(name):
    assert torch.equal(merge(name, [E1, E2], scaling=0.0), BASE)


@pytest.mark.parametrize("name,params", [("task_arithmetic", {"scaling": 1.0}), ("linear", {})])
def test_one_expert_at_full_weight_gives_that_expert(name, params):
    assert torch.allclose(merge(name, [E1], **params), E1)


@pytest.mark.parametrize("name,params", [("task_arithmetic", {"scaling": 0.7}), ("linear", {})])
def test_expert_order_does_not_matter(name, params):
    experts = [E1, E2, torch.tensor([0.5, -1.0, 3.0])]
    weights = [1.0, 2.0, 0.5]
    ref = merge(name, experts, weights, **params)
    for perm in itertools.permutations(range(3)):
        got = merge(name, [experts[i] for i in perm], [weights[i] for i in perm], **params)
        assert torch.allclose(got, ref, atol=1e-6)


def test_low_precision_inputs_are_merged_in_float32():
    base16, e16 = BASE.to(torch.bfloat16), E1.to(torch.bfloat16)
    out = merge("task_arithmetic", [e16], base=base16, scaling=1.0)
    assert out.dtype == torch.float32 and torch.equal(out, E1)


def test_every_method_is_documented():
    for m in MERGE_METHODS.values():
        assert m.paper.startswith("https://")
        assert "θ" in m.formula
        assert m.fn.__doc__ and "Returns:" in m.fn.__doc__


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown merge method 'tie'\. Known: adamerging, arcee_fusion, breadcrumbs, cart, consensus, dare_linear, dare_ties, della, della_linear, fisher, iso_c, iso_cts, karcher, knots, linear, "
                       r"lines, model_stock, multislerp, nearswap, nuslerp, regmean, sce, slerp, task_arithmetic, ties, tsv_m, wudi"):
        get_method("tie")


def test_param_errors_name_parameter_and_value():
    with pytest.raises(ValueError, match=r"params.scaling: Input should be greater than or equal to 0 \(got -0.1\)"):
        validate_merge_params("task_arithmetic", {"scaling": -0.1})
    with pytest.raises(ValueError, match=r"negative weights are not allowed for 'linear'"):
        validate_merge_params("linear", {"weights": {"a": -1.0}})
