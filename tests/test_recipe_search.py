"""Recipe search (CMA-ES over mergekit recipes): candidates as mergekit configs, merged as ``mergeflow merge``
merges them, scored as the coefficient search scores, and the search loop itself on a function whose optimum
is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from operators.learn.recipe import RecipeScorer, RecipeSpace, cma_search, merge_recipe, recipe_plan
from operators.merge.engine import merge_checkpoints
from operators.tensor_io import load_state_dict


def test_a_point_becomes_a_mergekit_config_with_its_values_in_their_bounds(tmp_path):
    space = RecipeSpace("ties", ("weight", "density", "lambda"), layers=2, bounds={"lambda": (0.5, 2.5)})
    models = {"a": tmp_path / "a", "b": tmp_path / "b"}
    # coordinates: weight a (2 knots), weight b (2), density a (2), density b (2), lambda (2)
    assert space.dimension(list(models)) == 10
    x = [0.0, 1.0, 0.5, 0.5, 0.0, 1.0, 1 / 3, 1 / 3, 0.25, 0.75]
    cfg = space.config(x, tmp_path / "base", models)
    assert cfg["merge_method"] == "ties" and cfg["base_model"] == str(tmp_path / "base")
    assert cfg["models"][0] == {"model": str(tmp_path / "a"), "parameters": {"weight": [0.0, 1.0], "density": [0.1, 1.0]}}
    assert cfg["models"][1]["parameters"] == {"weight": [0.5, 0.5], "density": [0.4, 0.4]}
    assert cfg["parameters"] == {"lambda": [1.0, 2.0]}  # 0.5 + 2·0.25, 0.5 + 2·0.75
    # the start point is each parameter's usual value: weight 1, density 0.5, λ 1
    start = RecipeSpace("ties", ("weight", "density", "lambda")).start(["a"])
    assert np.allclose(start, [1.0, 0.4 / 0.9, 0.9 / 2.9])
    yaml.safe_dump(cfg)  # plain YAML: mergekit reads it
    with pytest.raises(ValueError, match="recipe.search: 'density' is not a parameter of mergekit's task_arithmetic"):
        RecipeSpace("task_arithmetic", ("weight", "density"))
    with pytest.raises(ValueError, match="'slerp' is not a method whose recipe can be searched"):
        RecipeSpace("slerp", ("weight",))


def test_cma_search_finds_a_known_optimum_and_starts_from_the_usual_values(tmp_path):
    # the score peaks at weight a = 0.3, weight b = 0.8, λ = 1.5 (one value each): CMA-ES should get close
    space = RecipeSpace("task_arithmetic", ("weight", "lambda"))
    models = {"a": tmp_path / "a", "b": tmp_path / "b"}
    target = {"a": 0.3, "b": 0.8}

    def evaluate(configs):
        out = []
        for cfg in configs:
            w = {m["model"][-1]: m["parameters"]["weight"] for m in cfg["models"]}
            err = sum((w[n] - target[n]) ** 2 for n in w) + (cfg["parameters"]["lambda"] - 1.5) ** 2 / 9
            out.append({"score": -err})
        return out

    gens = []
    res = cma_search(space, tmp_path / "base", models, evaluate, evaluations=120, population=8, seed=3,
                     on_generation=gens.append)
    # generation 0 is the start point alone, then 14 generations of 8 and one of the 7 evaluations left
    assert len(res.candidates) == 120 and res.population == 8 and res.generations == 16 and len(gens) == 16
    assert [len(g) for g in gens] == [1] + [8] * 14 + [7]
    first = res.candidates[0].config
    assert [m["parameters"]["weight"] for m in first["models"]] == [1.0, 1.0] and first["parameters"]["lambda"] == 1.0
    w = {m["model"][-1]: m["parameters"]["weight"] for m in res.best.config["models"]}
    assert w["a"] == pytest.approx(0.3, abs=0.05) and w["b"] == pytest.approx(0.8, abs=0.05)
    assert res.best.config["parameters"]["lambda"] == pytest.approx(1.5, abs=0.15)
    assert res.best.score == max(c.score for c in res.candidates)
    # seeded: the same search gives the same candidates
    again = cma_search(space, tmp_path / "base", models, evaluate, evaluations=16, population=8, seed=3)
    assert [c.x for c in again.candidates] == [c.x for c in res.candidates[:16]]


def test_a_recipe_merges_in_memory_as_mergeflow_merge_writes_it(tiny_base, tiny_experts, tmp_path):
    space = RecipeSpace("ties", ("weight", "density", "lambda"), layers=2)
    cfg = space.config([0.2, 0.9, 0.7, 0.4, 0.3, 0.8, 0.6, 0.1, 0.5, 0.2], tiny_base, tiny_experts)
    base = load_state_dict(tiny_base)
    experts = {n: load_state_dict(p) for n, p in tiny_experts.items()}
    got = merge_recipe(base, experts, tiny_experts, cfg)
    # the same YAML through mergeflow merge's reading and engine, with the experts named by task
    plan = recipe_plan(cfg, tiny_experts)
    assert sorted(plan.experts) == sorted(tiny_experts) and plan.tensor_params is not None
    merge_checkpoints(plan.base, plan.experts, plan.method, plan.params, tmp_path / "m",
                      tensor_params=plan.tensor_params)
    want = load_state_dict(tmp_path / "m")
    floats = [k for k in want if want[k].is_floating_point()]
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in floats)
    # the gradients act: layer 0 and layer 1 merged with different densities differ from a one-value merge
    flat = space.config([0.2, 0.2, 0.7, 0.7, 0.3, 0.3, 0.6, 0.6, 0.5, 0.5], tiny_base, tiny_experts)
    other = merge_recipe(base, experts, tiny_experts, flat)
    assert any(not torch.equal(got[k], other[k]) for k in floats if ".layer.1." in k)


def test_the_scorer_scores_a_recipe_as_the_coefficient_search_scores_its_merge(tiny_base, tiny_experts, tmp_path):
    from operators.data import load_task_data
    from operators.learn.search import search_coefficient
    from pipeline.spec import DatasetSpec
    from tests.helpers import write_task_file

    val = {}
    for rule, labels in (("vowel", ["consonant", "vowel"]), ("length", ["short", "long"])):
        src = write_task_file(tmp_path / f"{rule}.parquet", rule, n=60, seed=9)
        val[rule] = load_task_data(rule, DatasetSpec(source=str(src), eval_fraction=0.5), labels).eval
    scorer = RecipeScorer(tiny_base, tiny_experts, val, max_length=12)
    # mergekit's task_arithmetic at weight 1, λ 0.5 is mergeflow's task arithmetic at scaling 0.5
    cfg = RecipeSpace("task_arithmetic", ("weight", "lambda")).config([1.0, 1.0, 0.4 / 2.9], tiny_base, tiny_experts)
    assert cfg["parameters"]["lambda"] == pytest.approx(0.5)
    got = scorer.score(cfg)
    ref = search_coefficient(tiny_base, tiny_experts, "task_arithmetic", {"scaling": {"search": [0.5]}}, val,
                             max_length=12)
    assert got["score"] == pytest.approx(ref.best_score) and got["accuracy"] == pytest.approx(ref.candidates[0].accuracy)


def test_one_searched_number_is_searched_on_an_even_grid(tmp_path):
    space = RecipeSpace("linear", ("weight",))
    res = cma_search(space, tmp_path / "base", {"a": tmp_path / "a"},
                     lambda cfgs: [{"score": -abs(c["models"][0]["parameters"]["weight"] - 0.6)} for c in cfgs],
                     evaluations=6)
    weights = [c.config["models"][0]["parameters"]["weight"] for c in res.candidates]
    assert weights == [1.0, 0.0, 0.25, 0.5, 0.75, 1.0]  # the start point, then 5 even steps over [0, 1]
    assert res.best.config["models"][0]["parameters"]["weight"] == 0.5
