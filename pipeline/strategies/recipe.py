"""A recipe search, driven from the strategy: CMA-ES proposes a generation of mergekit recipes, every
candidate is merged and scored as its own Ray task (``pipeline.learned.recipe_candidate_step``, a nested run
of the merge's), the scores go back to CMA-ES, and the best recipe is handed to the merge step.

    for each generation:   candidates ──▶ [score recipe_1 … recipe_P] (parallel) ──▶ CMA-ES update
    best recipe ──▶ recipe.yaml (a mergekit config of store URIs) ──▶ merge step
"""

from __future__ import annotations

from typing import Any

from pipeline.context import ModelRef
from pipeline.learned import recipe_candidate_step, recipe_refs
from pipeline.spec import MergeSpec


def search_recipe(rounds: Any, base: ModelRef, experts: dict[str, ModelRef], merge: MergeSpec, index: int,
                  run_id: str) -> dict[str, Any]:
    """Search ``merge.recipe`` on the validation slices; returns ``{"config": best mergekit config, "search":
    summary}`` (also logged on the merge run ``run_id``: ``recipe.yaml``, ``recipe_search.json``, metrics)."""
    from operators.learn.recipe import RecipeCandidate, cma_search

    spec = merge.recipe
    assert spec is not None
    space = spec.space(merge.method)
    base_ref, refs = recipe_refs(rounds.ctx, base, experts)
    number = [0]

    def evaluate(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        futures = []
        for cfg in configs:
            futures.append(rounds.runtime.submit(
                recipe_candidate_step, rounds.ctx, base, experts, cfg, number[0], generation[0], run_id, index,
                name=f"recipe-{number[0]}-r{index}", resources=rounds.eval_resources()))
            number[0] += 1
        return [rounds.runtime.result(f) for f in futures]

    generation = [0]

    def on_generation(batch: list[RecipeCandidate]) -> None:
        best = max(batch, key=lambda c: c.score)
        rounds.report(f"round {index}: recipe generation {generation[0]}: {len(batch)} candidates, best validation "
                      f"{best.score:.4f}")
        rounds.lineage.log_metrics(run_id, {"recipe/generation_best": best.score}, step=generation[0])
        generation[0] += 1

    rounds.report(f"round {index}: recipe search of {merge.method} ({', '.join(space.params)}"
                  f"{f', {space.layers} knots over the layers' if space.layers > 1 else ''}): "
                  f"{spec.evaluations} candidates, CMA-ES")
    res = cma_search(space, base_ref, refs, evaluate, evaluations=spec.evaluations, population=spec.population,
                     seed=spec.seed, on_generation=on_generation)
    summary = {k: v for k, v in res.as_dict().items() if k != "best"}
    summary |= {"best_index": res.best.index, "best_score": res.best.score, "start_score": res.candidates[0].score,
                "selection": "mean normalized validation accuracy", "best_run_id": res.best.run_id}
    lineage = rounds.lineage
    lineage.log_dict(run_id, res.best.config, "recipe.yaml")
    lineage.log_dict(run_id, summary, "recipe_search.json")
    lineage.log_metrics(run_id, {"recipe_search_seconds": res.seconds, "recipe_candidates": float(len(res.candidates)),
                                 "recipe_best_validation_normalized_accuracy": res.best.score,
                                 "recipe_start_validation_normalized_accuracy": res.candidates[0].score},
                        step=index)
    rounds.report(f"round {index}: recipe search chose candidate {res.best.index} (validation {res.best.score:.4f}, "
                  f"the usual values {res.candidates[0].score:.4f}) in {res.seconds:.1f}s")
    return {"config": res.best.config, "search": summary}
