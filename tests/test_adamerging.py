"""AdaMerging: the merge against values worked out by hand (task-wise, layer-wise, AdaMerging++), and
the learner on tiny experts: it lowers the entropy, never reads labels, is reproducible, and the
model it optimises is exactly the checkpoint the streaming engine writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from operators.merge import TensorContext, get_method


def _merge(base, experts, names=("a", "b"), key="w", weights=None, stats=None, **params):
    m = get_method("adamerging")
    return m.fn(base, experts, weights or [1.0] * len(experts), m.parse_params(params),
                TensorContext(key=key, stats=stats, experts=tuple(names)))


def test_task_wise_merge_by_hand():
    base = torch.tensor([1.0, -1.0])
    a, b = base + torch.tensor([1.0, 2.0]), base + torch.tensor([3.0, -1.0])
    # θ = θ0 + 0.5·[1, 2] + 0.25·[3, −1] = [1, −1] + [1.25, 0.75]
    got = _merge(base, [a, b], coefficients={"a": 0.5, "b": 0.25}, granularity="task")
    assert torch.allclose(got, torch.tensor([2.25, -0.25]))
    # weights multiply λ: w = (2, 1) → [1, −1] + [1, 2] + [0.75, −0.25]
    got = _merge(base, [a, b], coefficients={"a": 0.5, "b": 0.25}, weights=[2.0, 1.0])
    assert torch.allclose(got, torch.tensor([2.75, 0.75]))


def test_layer_wise_merge_uses_each_tensors_own_coefficient():
    base = torch.zeros(2)
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    coeffs = {"a": {"w": 1.0, "v": 0.0}, "b": {"w": 0.0, "v": 1.0}}
    assert torch.allclose(_merge(base, [a, b], key="w", coefficients=coeffs), a)
    assert torch.allclose(_merge(base, [a, b], key="v", coefficients=coeffs), b)
    with pytest.raises(ValueError, match="no λ for tensor 'u'.*learn them again"):
        _merge(base, [a, b], key="u", coefficients=coeffs)
    with pytest.raises(ValueError, match=r"no λ for expert\(s\) \['b'\]"):
        _merge(base, [a, b], coefficients={"a": 0.3})
    with pytest.raises(ValueError, match="none were given"):
        _merge(base, [a, b])


def test_adamerging_plus_plus_by_hand():
    # τ1 = [4, −1, 0.5, 2], τ2 = [−3, 2, 1, 0.1]; density 0.5 (a lone tensor: top-2 per task vector)
    # trimmed: τ1 → [4, 0, 0, 2], τ2 → [−3, 2, 0, 0]; Σ = [1, 2, 0, 2] → γ = [+, +, (majority +), +]
    # elected: τ̂1 = [4, 0, 0, 2], τ̂2 = [0, 2, 0, 0] (−3 disagrees with γ); λ = (0.5, 1) → [2, 2, 0, 1]
    base = torch.zeros(4)
    t1, t2 = torch.tensor([4.0, -1.0, 0.5, 2.0]), torch.tensor([-3.0, 2.0, 1.0, 0.1])
    got = _merge(base, [t1, t2], coefficients={"a": 0.5, "b": 1.0}, ties_density=0.5)
    assert torch.allclose(got, torch.tensor([2.0, 2.0, 0.0, 1.0]))
    # whole-model thresholds from the engine's prepare pass take precedence (here: keep everything ≥ 0.5)
    got = _merge(base, [t1, t2], coefficients={"a": 1.0, "b": 1.0}, ties_density=0.5, stats=[0.5, 0.5])
    # trimmed: τ1 → [4, −1, 0.5, 2], τ2 → [−3, 2, 1, 0]; Σ = [1, 1, 1.5, 2] → γ all +; kept: [4, 0, .5, 2] + [0, 2, 1, 0]
    assert torch.allclose(got, torch.tensor([4.0, 2.0, 1.5, 2.0]))


def test_params_are_validated():
    m = get_method("adamerging")
    for bad, field in (({"granularity": "neuron"}, "granularity"), ({"ties_density": 0.0}, "ties_density"),
                       ({"coefficients": {"a": float("nan")}}, "coefficients"), ({"steps": 0}, "steps")):
        with pytest.raises(ValueError, match=f"params.{field}"):
            m.parse_params(bad)


# --- the learner on tiny experts ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(tiny_experts):
    from tests.helpers import word_rows

    return {"vowel": word_rows("vowel", n=24, seed=5)[0], "length": word_rows("length", n=24, seed=6)[0]}


def _entropy_of_checkpoint(ckpt, inputs, max_length=12):
    from transformers import AutoTokenizer

    from operators.checkpoint import load_task_model
    from operators.learn.coefficients import entropy

    total = 0.0
    for task, texts in inputs.items():
        model = load_task_model(ckpt, task)
        enc = AutoTokenizer.from_pretrained(str(ckpt))(texts, padding=True, truncation=True, max_length=max_length,
                                                       return_tensors="pt")
        with torch.no_grad():
            total += float(entropy(model(**enc).logits))
    return total


@pytest.mark.parametrize("granularity,ties", [("layer", None), ("task", 0.5)])
def test_learning_lowers_the_entropy_of_the_checkpoint_the_engine_writes(tiny_base, tiny_experts, inputs,
                                                                         tmp_path, granularity, ties):
    from operators.learn.coefficients import learn_coefficients
    from operators.merge.engine import merge_checkpoints

    params = {"granularity": granularity, "ties_density": ties, "steps": 15, "learning_rate": 0.05,
              "batch_size": 64, "clamp": True}  # batch ≥ inputs: every step sees all of them
    res = learn_coefficients(tiny_base, tiny_experts, inputs, params, max_length=12, log_every=5)
    assert [s for s, _ in res.entropy] == [0, 5, 10, 15]
    assert res.final_entropy < res.initial_entropy  # (the 4-step tiny experts are near-uniform: small drops)
    flat = [v for c in res.coefficients.values() for v in (c.values() if isinstance(c, dict) else [c])]
    assert all(0.0 <= v <= 1.0 for v in flat) and any(abs(v - 0.3) > 1e-3 for v in flat)
    assert res.inputs == {"vowel": 24, "length": 24}
    # the differentiable merge the learner optimised is the one the engine writes: the learner's last
    # entropy (all inputs, final λ) equals the entropy of the merged checkpoint on disk
    out = tmp_path / "merged"
    merge_checkpoints(tiny_base, tiny_experts, "adamerging", {**params, "coefficients": res.coefficients}, out)
    assert _entropy_of_checkpoint(out, inputs) == pytest.approx(res.final_entropy, rel=1e-4, abs=1e-5)
    # at the initial λ (0.3 everywhere) the same holds for the first entropy
    init = {n: 0.3 for n in tiny_experts}
    out0 = tmp_path / "merged0"
    merge_checkpoints(tiny_base, tiny_experts, "adamerging", {"ties_density": ties, "coefficients": init}, out0)
    assert _entropy_of_checkpoint(out0, inputs) == pytest.approx(res.initial_entropy, rel=1e-4, abs=1e-5)


def test_learning_is_seeded_and_reads_no_labels(tiny_base, tiny_experts, inputs):
    from operators.learn.coefficients import learn_coefficients

    params = {"granularity": "task", "steps": 6, "learning_rate": 0.05, "batch_size": 4, "seed": 1}
    a = learn_coefficients(tiny_base, tiny_experts, inputs, params, max_length=12)
    b = learn_coefficients(tiny_base, tiny_experts, inputs, params, max_length=12)
    assert a.coefficients == b.coefficients  # same seed, same draws, same λ
    c = learn_coefficients(tiny_base, tiny_experts, inputs, {**params, "seed": 2}, max_length=12)
    assert c.coefficients != a.coefficients  # other draws of 4 inputs: another path
    assert np.isfinite(a.final_entropy)
    with pytest.raises(ValueError, match=r"no unlabeled inputs for task\(s\) \['length'\]"):
        learn_coefficients(tiny_base, tiny_experts, {"vowel": inputs["vowel"], "length": []}, params)
