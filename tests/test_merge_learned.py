"""Merges that learn from data: RegMean and Fisher merging against values worked out by hand, the
statistics beside each expert (checked against an independent computation, refused when stale or
corrupt), and the coefficient search (its grammar, its in-memory merges, its scores)."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction

import numpy as np
import pytest
import torch

from operators.learn.search import (
    AFFINE_IN_SCALING,
    OFFSET_AT_ZERO,
    merge_in_memory,
    parse_search,
    search_coefficient,
    split_search,
)
from operators.learn.statistics import compute_statistics
from operators.merge import TensorContext, get_method
from operators.merge.engine import merge_checkpoints
from operators.merge.fisher import fisher_weighted
from operators.merge.regmean import regmean_linear
from operators.merge.statistics import StatisticsError, open_statistics
from operators.tensor_io import load_state_dict

# --- RegMean by hand -------------------------------------------------------------------------------

def test_regmean_closed_form_by_hand():
    # W1 = [1, 0], W2 = [0, 1] (one output, two inputs); diagonal Grams G1 = diag(2, 1), G2 = diag(1, 3)
    # W*ᵀ = (G1 + G2)⁻¹ (G1 W1ᵀ + G2 W2ᵀ) = diag(3, 4)⁻¹ [2, 3] = [2/3, 3/4]
    w1, w2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    g1, g2 = torch.diag(torch.tensor([2.0, 1.0])), torch.diag(torch.tensor([1.0, 3.0]))
    assert torch.allclose(regmean_linear([w1, w2], [g1, g2], [1.0, 1.0], 1.0), torch.tensor([[2 / 3, 3 / 4]]))
    # off-diagonal shrinkage α = 1/2: G̃1 = [[2, ½], [½, 1]], G̃2 = I; Σ G̃ = [[3, ½], [½, 2]] (det 23/4),
    # Σ G̃ Wᵀ = [2, ½] + [0, 1] = [2, 3/2] → W* = [(4 − 3/4), (9/2 − 1)] / (23/4) = [13/23, 14/23]
    g1 = torch.tensor([[2.0, 1.0], [1.0, 1.0]])
    got = regmean_linear([w1, w2], [g1, torch.eye(2)], [1.0, 1.0], 0.5)
    assert torch.allclose(got, torch.tensor([[13 / 23, 14 / 23]]))
    assert Fraction(13, 23) == (Fraction(4) - Fraction(3, 4)) / Fraction(23, 4)  # the arithmetic above


def test_regmean_invariants():
    torch.manual_seed(0)
    ws = [torch.randn(3, 4) for _ in range(2)]
    x = torch.randn(10, 4)
    g = x.T @ x
    # equal Grams: the mean; one expert: itself; weights act like repeating an expert
    assert torch.allclose(regmean_linear(ws, [g, g], [1.0, 1.0], 1.0), (ws[0] + ws[1]) / 2, atol=1e-5)
    assert torch.allclose(regmean_linear(ws[:1], [g], [1.0], 0.9), ws[0], atol=1e-5)
    g2 = (torch.randn(10, 4).T @ torch.randn(10, 4)).abs() + torch.eye(4) * 10
    twice = regmean_linear([ws[0], ws[0], ws[1]], [g, g, g2], [1.0, 1.0, 1.0], 1.0)
    assert torch.allclose(regmean_linear([ws[0], ws[1]], [g, g2], [2.0, 1.0], 1.0), twice, atol=1e-5)
    # RegMean minimises Σ_i ‖X_i W*ᵀ − X_i W_iᵀ‖²: the gradient Σ_i G_i (W* − W_i)ᵀ is zero at W*
    xs = [torch.randn(12, 4), torch.randn(12, 4)]
    grams = [xi.T @ xi for xi in xs]
    w = regmean_linear(ws, grams, [1.0, 1.0], 1.0)
    grad = sum(gi @ (w - wi).T for gi, wi in zip(grams, ws, strict=True))
    assert grad.abs().max() < 1e-4


class _Stats:
    def __init__(self, tensors, l2=1.0):
        self.tensors, self.l2_norm = tensors, l2

    def get(self, key):
        return self.tensors.get(key)


def _fn(name, experts, stats, key="layer.weight", weights=None, **params):
    m = get_method(name)
    ctx = TensorContext(key=key, stats=stats, experts=tuple(stats))
    return m.fn(None, experts, weights or [1.0] * len(experts), m.parse_params(params), ctx)


def test_regmean_method_uses_grams_for_linear_weights_and_means_elsewhere():
    w1, w2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    stats = {"a": _Stats({"layer.weight": torch.diag(torch.tensor([2.0, 1.0]))}),
             "b": _Stats({"layer.weight": torch.diag(torch.tensor([1.0, 3.0]))})}
    assert torch.allclose(_fn("regmean", [w1, w2], stats, alpha=1.0), torch.tensor([[2 / 3, 3 / 4]]))
    # a bias (no Gram) is the weighted mean: (3·[1, 2] + [3, 6]) / 4
    got = _fn("regmean", [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])], stats, key="layer.bias",
              weights=[3.0, 1.0])
    assert torch.allclose(got, torch.tensor([1.5, 3.0]))
    bad = {"a": _Stats({"layer.weight": torch.eye(3)}), "b": _Stats({"layer.weight": torch.eye(3)})}
    with pytest.raises(ValueError, match="computed on another base"):
        _fn("regmean", [w1, w2], bad)


# --- Fisher by hand --------------------------------------------------------------------------------

def test_fisher_by_hand_and_invariants():
    # θ1 = [1, 2], θ2 = [3, 4], F1 = [1, 0], F2 = [3, 1] (no floor):
    # [(1·1 + 3·3) / (1 + 3), (0·2 + 1·4) / (0 + 1)] = [2.5, 4]
    t1, t2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    got = fisher_weighted([t1, t2], [torch.tensor([1.0, 0.0]), torch.tensor([3.0, 1.0])], [1.0, 1.0], floor=0.0)
    assert torch.allclose(got, torch.tensor([2.5, 4.0]))
    # equal Fishers: the mean; one expert: itself; no Fisher mass anywhere: the floor gives the mean
    f = torch.tensor([0.3, 2.0])
    assert torch.allclose(fisher_weighted([t1, t2], [f, f], [1.0, 1.0]), (t1 + t2) / 2)
    assert torch.allclose(fisher_weighted([t1], [f], [1.0]), t1)
    assert torch.allclose(fisher_weighted([t1, t2], [torch.zeros(2)] * 2, [1.0, 1.0]), (t1 + t2) / 2)


def test_fisher_method_normalises_by_each_models_l2_norm():
    # normalised: F1/‖F1‖ = [1, 0] (‖F1‖ = 2), F2/‖F2‖ = [1, 1]·(1/1) → θ = [(1 + 3)/2, (0 + 4)/1]
    stats = {"a": _Stats({"layer.weight": torch.tensor([2.0, 0.0])}, l2=2.0),
             "b": _Stats({"layer.weight": torch.tensor([1.0, 1.0])}, l2=1.0)}
    t1, t2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    assert torch.allclose(_fn("fisher", [t1, t2], stats, floor=0.0), torch.tensor([2.0, 4.0]))
    # without normalising, F1 = [2, 0] outweighs F2 = [1, 1] on the first entry: (2 + 3) / 3
    assert torch.allclose(_fn("fisher", [t1, t2], stats, floor=0.0, normalize=False), torch.tensor([5 / 3, 4.0]))
    with pytest.raises(ValueError, match="another base"):
        _fn("fisher", [torch.ones(3), torch.ones(3)], stats)


def test_data_driven_methods_refuse_missing_statistics(tiny_base, tiny_experts, tmp_path):
    with pytest.raises(ValueError, match=r"params.statistics: regmean needs the gram statistics of every expert"):
        merge_checkpoints(tiny_base, tiny_experts, "regmean", {}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- statistics beside each expert -----------------------------------------------------------------

@pytest.fixture(scope="module")
def vowel_data(tmp_path_factory):
    from operators.data import load_task_data
    from pipeline.spec import DatasetSpec
    from tests.helpers import write_task_file

    src = write_task_file(tmp_path_factory.mktemp("d") / "vowel.parquet", "vowel")
    return load_task_data("vowel", DatasetSpec(source=str(src)), ["consonant", "vowel"])


@pytest.fixture(scope="module")
def expert_stats(tiny_experts, vowel_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stats")
    grams = compute_statistics(tiny_experts["vowel"], vowel_data, "gram", out / "gram", examples=12, seed=3,
                               max_length=12)
    fisher = compute_statistics(tiny_experts["vowel"], vowel_data, "fisher", out / "fisher", examples=3, seed=3,
                                max_length=12)
    return out, grams, fisher


def test_gram_matrices_match_an_independent_computation(tiny_experts, vowel_data, expert_stats):
    from transformers import AutoTokenizer

    from operators.checkpoint import load_task_model
    from operators.learn.statistics import sample_rows

    out, rec, _ = expert_stats
    assert rec.examples == 12
    model = load_task_model(tiny_experts["vowel"], "vowel")
    tok = AutoTokenizer.from_pretrained(str(tiny_experts["vowel"]))
    texts = [vowel_data.train.texts[i] for i in sample_rows(len(vowel_data.train), 12, 3)]
    enc = tok(texts, padding=True, truncation=True, max_length=12, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states[0]  # layer 0's input
    x = hidden[enc["attention_mask"].bool()]
    want = x.T @ x / 12
    st = open_statistics(out / "gram", "gram", expert=tiny_experts["vowel"])
    got = st.get("encoder.layer.0.attention.self.query.weight")
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    assert st.get("encoder.layer.0.attention.self.query.bias") is None  # biases have no Gram
    assert set(st.record["shapes"]) >= {"encoder.layer.1.output.dense.weight", "pooler.dense.weight"}


def test_fisher_diagonal_is_the_mean_squared_gradient_of_the_sampled_log_likelihood(tiny_experts, vowel_data,
                                                                                   expert_stats):
    from transformers import AutoTokenizer

    from operators.checkpoint import load_task_model
    from operators.learn.statistics import sample_rows

    out, _, rec = expert_stats
    st = open_statistics(out / "fisher", "fisher", expert=tiny_experts["vowel"])
    model = load_task_model(tiny_experts["vowel"], "vowel")
    tok = AutoTokenizer.from_pretrained(str(tiny_experts["vowel"]))
    g = torch.Generator().manual_seed(3)
    key, word = "encoder.layer.1.output.dense.weight", "embeddings.word_embeddings.weight"
    named = dict(model.base_model.named_parameters())
    want = {k: torch.zeros_like(named[k]) for k in (key, word)}
    for i in sample_rows(len(vowel_data.train), 3, 3):
        logp = torch.log_softmax(model(**tok([vowel_data.train.texts[i]], return_tensors="pt")).logits[0], -1)
        y = int(torch.multinomial(logp.detach().exp(), 1, generator=g))
        grads = torch.autograd.grad(logp[y], [named[key], named[word]])
        for k, grad in zip((key, word), grads, strict=True):
            want[k] += grad ** 2
    for k in (key, word):  # the word embeddings' rows come from the embedding output's gradient: same values
        assert torch.allclose(st.get(k), want[k] / 3, rtol=1e-4, atol=1e-10), k
    assert (st.get(word) > 0).any()
    assert rec.l2_norm > 0 and all((st.get(k) >= 0).all() for k in list(st.record["shapes"])[:5])


# 4: short inputs (the token-pair product), "a" padded; 12: per-example gradient products (pooler: pairs)
@pytest.mark.parametrize("max_length", [4, 12])
def test_batched_fisher_equals_one_backward_pass_per_example(tiny_experts, vowel_data, max_length):
    from transformers import AutoTokenizer

    from operators.checkpoint import load_task_model
    from operators.learn.statistics import _fisher_batched, _fisher_per_example

    model = load_task_model(tiny_experts["vowel"], "vowel")
    tok = AutoTokenizer.from_pretrained(str(tiny_experts["vowel"]))
    texts = vowel_data.train.texts[:10] + ["a", "abcdefghijklmnopqrstuvwxyz"]  # unequal lengths: padding in a batch
    got = _fisher_batched(model, model.base_model, tok, texts, max_length, 5, "cpu", batch_size=4)
    want = _fisher_per_example(model, model.base_model, tok, texts, max_length, 5, "cpu")
    assert set(got) == set(want) == {n for n, p in model.base_model.named_parameters()}
    for k in want:  # (a key projection's bias has a zero gradient: softmax ignores a shift of every score)
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6 * float(want[k].abs().max()) + 1e-12), k
    assert float(want["encoder.layer.0.intermediate.dense.weight"].abs().max()) > 0


def test_fisher_of_a_body_with_other_parameters_takes_one_backward_pass_per_example(tiny_experts, vowel_data):
    from transformers import AutoTokenizer

    from operators.checkpoint import load_task_model
    from operators.learn.statistics import _fisher, _fisher_batched, _fisher_per_example, _NotBatchable

    model = load_task_model(tiny_experts["vowel"], "vowel")
    model.base_model.encoder.register_parameter("scale", torch.nn.Parameter(torch.ones(1)))  # not in a known layer
    tok = AutoTokenizer.from_pretrained(str(tiny_experts["vowel"]))
    texts = vowel_data.train.texts[:4]
    with pytest.raises(_NotBatchable):
        _fisher_batched(model, model.base_model, tok, texts, 12, 0, "cpu", 4)
    got, want = _fisher(model, model.base_model, tok, texts, 12, 0, "cpu"), _fisher_per_example(
        model, model.base_model, tok, texts, 12, 0, "cpu")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    # a known layer whose weight is read without calling the layer: its gradient is invisible to the hooks
    model = load_task_model(tiny_experts["vowel"], "vowel")
    pooler = model.base_model.pooler
    pooler.forward = lambda hidden: torch.tanh(torch.nn.functional.linear(hidden[:, 0], pooler.dense.weight,
                                                                          pooler.dense.bias))
    with pytest.raises(_NotBatchable, match="outside its layer"):
        _fisher_batched(model, model.base_model, tok, texts, 12, 0, "cpu", 4)
    got = _fisher(model, model.base_model, tok, texts, 12, 0, "cpu")
    assert float(got["pooler.dense.weight"].abs().max()) > 0


def test_statistics_refused_when_corrupt_stale_or_missing(tiny_experts, expert_stats, tmp_path):
    out, _, _ = expert_stats
    with pytest.raises(StatisticsError, match="computed on other weights"):
        open_statistics(out / "gram", "gram", expert=tiny_experts["length"], who="length")
    with pytest.raises(StatisticsError, match="no fisher statistics"):
        open_statistics(out / "gram", "fisher")
    bad = tmp_path / "bad"
    shutil.copytree(out / "gram", bad)
    meta = json.loads((bad / "gram.json").read_text())
    (bad / "gram.json").write_text(json.dumps({**meta, "file_sha256": "0" * 64}))
    with pytest.raises(StatisticsError, match="checksum"):
        open_statistics(bad, "gram")


def test_regmean_through_the_engine_equals_the_closed_form(tiny_base, tiny_experts, tmp_path, vowel_data):
    from operators.data import load_task_data
    from pipeline.spec import DatasetSpec
    from tests.helpers import write_task_file

    length = load_task_data("length", DatasetSpec(source=str(write_task_file(tmp_path / "l.parquet", "length"))),
                            ["short", "long"])
    dirs = {}
    for name, data in (("vowel", vowel_data), ("length", length)):
        compute_statistics(tiny_experts[name], data, "gram", tmp_path / f"g-{name}", examples=8, max_length=12)
        dirs[name] = str(tmp_path / f"g-{name}")
    merge_checkpoints(tiny_base, tiny_experts, "regmean", {"alpha": 0.9, "statistics": dirs}, tmp_path / "m")
    merged = load_state_dict(tmp_path / "m")
    ex = {n: load_state_dict(p) for n, p in tiny_experts.items()}
    key = "encoder.layer.0.attention.output.dense.weight"
    grams = [open_statistics(dirs[n], "gram").get(key) for n in ("length", "vowel")]
    want = regmean_linear([ex["length"][key], ex["vowel"][key]], grams, [1.0, 1.0], 0.9)
    assert torch.allclose(merged[key], want, atol=1e-5)
    ln = "encoder.layer.0.output.LayerNorm.weight"
    assert torch.allclose(merged[ln], (ex["length"][ln] + ex["vowel"][ln]) / 2)
    # Fisher of one expert is that expert
    compute_statistics(tiny_experts["vowel"], vowel_data, "fisher", tmp_path / "f", examples=2, max_length=12)
    merge_checkpoints(tiny_base, {"vowel": tiny_experts["vowel"]}, "fisher", {"statistics": {"vowel": str(tmp_path / "f")}},
                      tmp_path / "f1")
    one = load_state_dict(tmp_path / "f1")
    assert all(torch.allclose(one[k], ex["vowel"][k], atol=1e-6) for k in one if one[k].is_floating_point())


# --- coefficient search ----------------------------------------------------------------------------

def test_search_grammar_and_refusals():
    assert parse_search("scaling", 0.3) is None
    assert parse_search("scaling", {"search": [0.1, 1]}).grid == (0.1, 1.0)
    assert parse_search("scaling", {"search": {"from": 0.1, "to": 0.5, "step": 0.1}}).grid == (0.1, 0.2, 0.3, 0.4, 0.5)
    golden = parse_search("scaling", {"search": {"from": 0.0, "to": 2.0, "method": "golden", "evaluations": 6}})
    assert (golden.method, golden.low, golden.high, golden.evaluations) == ("golden", 0.0, 2.0, 6)
    for bad, msg in (([], "grid is empty"), (["a"], "'a' is not a number"), ([True], "True is not a number"),
                     ({"from": 1, "to": 0, "step": 0.1}, "from < to"), ({"from": 0, "to": 1}, "positive step"),
                     ({"from": 0, "to": 1, "by": 2}, "unknown key 'by'"), ("0.1", "expected a list")):
        with pytest.raises(ValueError, match=r"params\.scaling\.search.*" + msg):
            parse_search("scaling", {"search": bad})
    with pytest.raises(ValueError, match="one parameter is searched at a time"):
        split_search({"scaling": {"search": [1]}, "density": {"search": [0.2]}})


def test_golden_section_search_finds_the_peak_of_a_unimodal_score():
    from operators.learn.search import _golden_points

    seen = []

    def score(v):
        seen.append(v)
        return -(v - 0.7) ** 2

    _golden_points(0.0, 2.0, 12, score)
    assert len(seen) == 12  # exactly the evaluations asked for
    # after 12 evaluations the bracket is 2·0.618^10 ≈ 0.016 wide around the peak
    assert abs(max(seen, key=lambda v: -(v - 0.7) ** 2) - 0.7) < 0.02


@pytest.mark.parametrize("method", sorted(AFFINE_IN_SCALING))
def test_methods_on_the_fast_path_are_affine_in_scaling(method):
    """The search merges once at λ = 1 for these methods: θ(λ) must equal θ_0 + λ (θ(1) − θ_0), with θ_0 the
    method's result at λ = 0 for CART (the experts' average there), the base's for every other."""
    torch.manual_seed(1)
    base = {"w": torch.randn(6, 5), "b": torch.randn(5)}
    experts = {n: {k: v + torch.randn_like(v) for k, v in base.items()} for n in ("a", "b", "c")}
    params = {"density": 0.5} if method in ("ties", "breadcrumbs") else {}
    at_one = merge_in_memory(base, experts, method, {**params, "scaling": 1.0})
    at = merge_in_memory(base, experts, method, {**params, "scaling": 0.37})
    origin = merge_in_memory(base, experts, method, {**params, "scaling": 0.0}) if method in OFFSET_AT_ZERO else base
    for k in base:
        assert torch.allclose(at[k], origin[k] + 0.37 * (at_one[k] - origin[k]), atol=1e-5), (method, k)
    if method not in OFFSET_AT_ZERO:
        at_zero = merge_in_memory(base, experts, method, {**params, "scaling": 0.0})
        assert all(torch.allclose(at_zero[k], base[k], atol=1e-6) for k in base), method


def test_in_memory_merge_equals_the_engine(tiny_base, tiny_experts, tmp_path):
    merge_checkpoints(tiny_base, tiny_experts, "ties", {"scaling": 0.7, "density": 0.3}, tmp_path / "m")
    base = load_state_dict(tiny_base)
    experts = {n: load_state_dict(p) for n, p in tiny_experts.items()}
    got = merge_in_memory(base, experts, "ties", {"scaling": 0.7, "density": 0.3})
    want = load_state_dict(tmp_path / "m")
    assert all(torch.allclose(got[k], want[k]) for k in want if want[k].is_floating_point())


def test_search_scores_each_candidate_as_the_written_merge_evaluates(tiny_base, tiny_experts, tmp_path):
    from operators.data import TaskData, load_task_data
    from operators.evaluate import evaluate
    from pipeline.spec import DatasetSpec
    from tests.helpers import write_task_file

    val = {}
    for rule, labels in (("vowel", ["consonant", "vowel"]), ("length", ["short", "long"])):
        src = write_task_file(tmp_path / f"{rule}.parquet", rule, n=60, seed=9)
        val[rule] = load_task_data(rule, DatasetSpec(source=str(src), eval_fraction=0.5), labels)
    seen = []
    res = search_coefficient(tiny_base, tiny_experts, "task_arithmetic", {"scaling": {"search": [0.0, 0.5, 1.0]}},
                             {t: d.eval for t, d in val.items()}, max_length=12, on_candidate=seen.append)
    assert [c.value for c in res.candidates] == [0.0, 0.5, 1.0] and len(seen) == 3 and res.fast_path
    best = max(res.candidates, key=lambda c: c.score)
    assert res.chosen == best.value and res.best_score == best.score
    for c in res.candidates:
        assert c.score == pytest.approx(np.mean([c.accuracy[t] / res.expert_accuracy[t] for t in val]))
    # the candidate's accuracy is what the engine's merge at that value scores, evaluated from disk
    merge_checkpoints(tiny_base, tiny_experts, "task_arithmetic", {"scaling": 0.5}, tmp_path / "m")
    for t, d in val.items():
        as_eval = TaskData(t, d.label_names, d.train, d.eval, d.source, d.digest)
        assert evaluate(tmp_path / "m", as_eval, max_length=12)["accuracy"] == pytest.approx(res.candidates[1].accuracy[t])
        assert evaluate(tiny_experts[t], as_eval, max_length=12)["accuracy"] == pytest.approx(res.expert_accuracy[t])
    # off the fast path (another parameter than scaling) each candidate is its own merge
    dens = search_coefficient(tiny_base, tiny_experts, "ties", {"scaling": 0.5, "density": {"search": [0.3, 1.0]}},
                              {t: d.eval for t, d in val.items()}, max_length=12)
    assert not dens.fast_path and [c.value for c in dens.candidates] == [0.3, 1.0]


# --- comparisons users can trust --------------------------------------------------------------------

def test_bootstrap_interval_of_the_mean_accuracy():
    from pipeline.compare import bootstrap_means, interval, noise_marks

    # one task, 400 examples, half right: the bootstrap interval is p ± 1.96·sqrt(p(1 − p)/n) = 0.5 ± 0.049
    lo, hi = interval(bootstrap_means({"a": {"accuracy": 0.5, "n": 400}}))
    assert lo == pytest.approx(0.451, abs=0.01) and hi == pytest.approx(0.549, abs=0.01)
    # the mean of two tasks: its variance is the average of theirs over 2 → half-width 0.049 / sqrt(2)
    lo2, hi2 = interval(bootstrap_means({"a": {"accuracy": 0.5, "n": 400}, "b": {"accuracy": 0.5, "n": 400}}))
    assert (hi2 - lo2) == pytest.approx((hi - lo) / 2 ** 0.5, rel=0.1)
    assert interval(bootstrap_means({"a": {"accuracy": 1.0, "n": 50}})) == (1.0, 1.0)
    same = {"a": {"accuracy": 0.7, "n": 100}}
    assert (bootstrap_means(same) == bootstrap_means(same)).all()  # seeded
    marks = noise_marks({"best": {"a": {"accuracy": 0.90, "n": 1000}}, "close": {"a": {"accuracy": 0.89, "n": 1000}},
                         "far": {"a": {"accuracy": 0.50, "n": 1000}}})
    assert marks == {"best": True, "close": True, "far": False}
