"""``mergeflow compare --seeds``: the seeded workflows, the aggregation over seeds (numbers by hand on a
made-up comparison, nothing trained) and the option's bad-input errors. The end-to-end run with two
seeds is in tests/test_strategies.py (test_compare_writes_table_plot_and_mlflow_artifacts)."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from click.testing import CliRunner

from pipeline.compare import (
    Variant,
    aggregate_tables,
    interval,
    noise_marks,
    parse_seeds,
    seed_averaged_draws,
    seeded_workflow,
    summarize,
    variant_workflow,
    write_outputs,
)
from pipeline.driver import WorkflowResult
from pipeline.spec import parse_workflow
from pipeline.strategies.rounds import RoundResult
from tests.helpers import tiny_workflow_dict

N = 1000  # eval examples per task


def fake_result(rounds: list[tuple[float, dict[str, float]]], expert: dict[str, float],
                probe: dict[str, float]) -> WorkflowResult:
    """A finished workflow whose rounds merged to these accuracies (budget, task -> accuracy)."""
    out = []
    for k, (budget, accs) in enumerate(rounds):
        out.append(RoundResult(
            index=k, run_id=f"round-{k}", experts={}, merged=None,
            expert_evals={t: {t: {"accuracy": a, "n": N}} for t, a in expert.items()},
            merged_eval={t: {"accuracy": a, "n": N} for t, a in accs.items()},
            baseline={t: {"accuracy": a, "n": N} for t, a in probe.items()} if k == 0 else {},
            budget=budget))
    return WorkflowResult("tiny", f"run-{id(out)}", "0", "sqlite://", out, 1.0)


# seed -> (one-shot merged, ATM round 0, ATM round 1, expert, base probe), per task (a, b)
MADE_UP = {
    0: ({"a": 0.6, "b": 0.5}, {"a": 0.5, "b": 0.4}, {"a": 0.7, "b": 0.6}, {"a": 0.8, "b": 1.0}, {"a": 0.5, "b": 0.5}),
    1: ({"a": 0.7, "b": 0.5}, {"a": 0.4, "b": 0.4}, {"a": 0.8, "b": 0.6}, {"a": 0.8, "b": 0.5}, {"a": 0.6, "b": 0.5}),
    2: ({"a": 0.8, "b": 0.8}, {"a": 0.6, "b": 0.5}, {"a": 0.9, "b": 0.7}, {"a": 1.0, "b": 1.0}, {"a": 0.5, "b": 0.6}),
}


def flat(points) -> list[float]:
    return [x for p in points for x in p]


def made_up_variants() -> list[Variant]:
    variants = []
    for seed, (oneshot, atm0, atm1, expert, probe) in MADE_UP.items():
        variants.append(Variant("oneshot", "ties", fake_result([(1.0, oneshot)], expert, probe), seed=seed))
        variants.append(Variant("atm", "mean", fake_result([(0.5, atm0), (1.0, atm1)], expert, probe), seed=seed))
    return variants


def test_aggregation_over_seeds_by_hand(tmp_path):
    c = summarize("parent", made_up_variants(), [0, 1, 2])
    assert c.seeds == [0, 1, 2] and list(c.seed_tables) == [0, 1, 2]
    # task a, one-shot: 0.6, 0.7, 0.8 → mean 0.7, sample std sqrt((0.01 + 0 + 0.01) / 2) = 0.1
    assert c.table["a"]["oneshot+ties acc"] == pytest.approx(0.7)
    assert c.std["a"]["oneshot+ties acc"] == pytest.approx(0.1)
    # task b, one-shot: 0.5, 0.5, 0.8 → mean 0.6, std sqrt((0.01 + 0.01 + 0.04) / 2) = sqrt(0.03)
    assert c.table["b"]["oneshot+ties acc"] == pytest.approx(0.6)
    assert c.std["b"]["oneshot+ties acc"] == pytest.approx(math.sqrt(0.03))
    # the mean row: each seed's mean over tasks (0.55, 0.6, 0.8) → 0.65 ± sqrt((0.01 + 0.0025 + 0.0225) / 2)
    assert [c.seed_tables[s]["mean"]["oneshot+ties acc"] for s in (0, 1, 2)] == pytest.approx([0.55, 0.6, 0.8])
    assert c.table["mean"]["oneshot+ties acc"] == pytest.approx(0.65)
    assert c.std["mean"]["oneshot+ties acc"] == pytest.approx(math.sqrt(0.0175))
    # normalized within each seed (by that seed's expert), then averaged: b: 0.5/1, 0.5/0.5, 0.8/1 → 0.7666…
    assert c.table["b"]["oneshot+ties norm"] == pytest.approx((0.5 + 1.0 + 0.8) / 3)
    assert c.std["b"]["oneshot+ties norm"] == pytest.approx(math.sqrt(((0.5 - 2.3 / 3) ** 2 + (1 - 2.3 / 3) ** 2
                                                                        + (0.8 - 2.3 / 3) ** 2) / 2))
    # the base probe and the experts are averaged the same way: experts' mean over tasks 0.9, 0.65, 1.0
    assert c.table["mean"]["expert"] == pytest.approx(2.55 / 3)
    assert c.table["mean"]["base probe"] == pytest.approx((0.5 + 0.55 + 0.55) / 3)
    # base probe on a: 0.5, 0.6, 0.5 → deviations −1/30, 2/30, −1/30 → sqrt((1 + 4 + 1) / 900 / 2) = sqrt(1/300)
    assert c.std["a"]["base probe"] == pytest.approx(math.sqrt(1 / 300))
    # curves: round by round mean, with the lowest and highest seed
    # ATM round 0 means over tasks: 0.45, 0.4, 0.55; round 1: 0.65, 0.7, 0.8
    assert flat(c.curves["atm+mean"]) == pytest.approx([0.5, 1.4 / 3, 1.0, 2.15 / 3])
    assert flat(c.curve_range["atm+mean"]) == pytest.approx([0.4, 0.55, 0.65, 0.8])
    assert flat(c.curves["oneshot+ties"]) == pytest.approx([1.0, 0.65])
    # the 95% interval is that of the seed-averaged draws, around the mean over seeds
    lo, hi = c.intervals["atm+mean"]
    assert lo < 2.15 / 3 < hi and hi - lo < 0.1
    # both variants' mean accuracies: ATM 0.7167 vs one-shot 0.65, 2000 eval answers per seed → not within noise
    assert c.within_noise == {"atm+mean": True, "oneshot+ties": False}

    files = write_outputs(c, tmp_path)
    assert [f.name for f in files] == ["compare.md", "compare.json", "compare.png"]
    md = (tmp_path / "compare.md").read_text()
    assert "over 3 seeds (0, 1, 2)" in md
    assert "| a | 0.533 ± 0.058 | 0.867 ± 0.115 | 0.700 ± 0.100 |" in md  # probe, expert, one-shot acc
    assert "| oneshot+ties | 0.550 | 0.600 | 0.800 | 0.650 ± 0.132 |" in md  # the mean accuracy per seed
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["seeds"] == [0, 1, 2]
    assert data["table"]["mean"]["oneshot+ties acc"] == pytest.approx(0.65)
    assert data["std"]["mean"]["oneshot+ties acc"] == pytest.approx(math.sqrt(0.0175))
    assert data["per_seed"]["2"]["table"]["b"]["oneshot+ties acc"] == 0.8
    assert flat(data["per_seed"]["1"]["curves"]["atm+mean"]) == pytest.approx([0.5, 0.4, 1.0, 0.7])
    assert [v["seed"] for v in data["variants"]] == [0, 0, 1, 1, 2, 2]
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_aggregate_tables_sample_std():
    mean, std = aggregate_tables([{"t": {"x": 1.0, "y": 0.2}}, {"t": {"x": 3.0, "y": 0.2}}, {"t": {"x": 5.0, "y": 0.5}}])
    assert mean == {"t": {"x": pytest.approx(3.0), "y": pytest.approx(0.3)}}
    # x: deviations −2, 0, 2 → sqrt(8 / 2) = 2 (n − 1, not n: that would be 1.633); y: sqrt((0.01·2 + 0.04) / 2)
    assert std == {"t": {"x": pytest.approx(2.0), "y": pytest.approx(math.sqrt(0.03))}}


def test_one_seed_is_todays_comparison():
    """Without --seeds (or with one seed) the table and intervals are the single run's, as before."""
    variants = [v for v in made_up_variants() if v.seed == 1]
    for v in variants:
        v.seed = None
    c = summarize("parent", variants)
    assert not c.std and not c.seed_tables and not c.curve_range
    assert c.table["a"]["oneshot+ties acc"] == 0.7 and c.table["mean"]["atm+mean acc"] == pytest.approx(0.7)
    from pipeline.compare import bootstrap_means

    final = variants[0].result.final.merged_eval
    assert c.intervals["oneshot+ties"] == interval(bootstrap_means(final))
    # the seed-averaged draws of one seed are its draws; of two identical seeds, the same draws again
    assert (seed_averaged_draws([final]) == bootstrap_means(final)).all()
    assert seed_averaged_draws([final, final]) == pytest.approx(bootstrap_means(final))
    assert noise_marks({"x": final}) == noise_marks({"x": [final]}) == {"x": True}


def test_seeded_workflow_moves_training_seeds_not_split_seeds(tmp_path):
    spec = tiny_workflow_dict(tmp_path, tmp_path / "base", strategy="cold_fusion",
                              rounds={"count": 2, "contributors": 1, "contributor_seed": 5})
    spec["finetune"]["seed"] = 2
    spec["tasks"][0]["finetune"] = {"seed": 7}
    spec["tasks"][1]["dataset"]["split_seed"] = 3
    wf = parse_workflow(spec)
    assert seeded_workflow(wf, 2) == wf  # the spec's own seed gives the spec back
    s4 = seeded_workflow(wf, 4)
    assert s4.finetune.seed == 4 and s4.rounds.contributor_seed == 7
    assert s4.finetune_for(s4.tasks[0]).seed == 9 and s4.finetune_for(s4.tasks[1]).seed == 4
    assert [t.dataset for t in s4.tasks] == [t.dataset for t in wf.tasks]  # split seeds (and data) unchanged
    assert s4.spec_hash() != wf.spec_hash()
    assert s4.round_finetune_for(s4.tasks[1], 1).seed == 5  # rounds still move on from the seed
    # a moved seed below 0: named, with the smallest seed that works
    with pytest.raises(ValueError, match=r"tasks\[0\]\.finetune\.seed from 7 to -1 .* at least 1") as e:
        seeded_workflow(parse_workflow(dict(spec, finetune=dict(spec["finetune"], seed=8))), 0)
    assert "seed 0" in str(e.value)
    # each seed's variants get their own registered model
    assert variant_workflow(s4, "atm", "mean", seed=4).registered_model_name == "tiny-merged-atm-mean-seed4"
    assert variant_workflow(s4, "atm", "mean").registered_model_name == "tiny-merged-atm-mean"


def test_parse_seeds():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds(" 3 , 10,") == [3, 10]
    for text, msg in (("", "no seeds given"), (" , ", "no seeds given"), ("0,x", "'x' is not an integer"),
                      ("1.5", "'1.5' is not an integer"), ("0,-1", "seed -1 is negative"),
                      ("0,1,1", "seed 1 is given twice")):
        with pytest.raises(ValueError, match=msg):
            parse_seeds(text)


@pytest.mark.parametrize(("value", "expected"), [
    ("0,a", "error: --seeds: 'a' is not an integer (got '0,a'); give non-negative integers separated by commas, "
            "e.g. --seeds 0,1,2"),
    ("", "error: --seeds: no seeds given (got ''); give non-negative integers separated by commas"),
    ("1,2,1", "error: --seeds: seed 1 is given twice (got '1,2,1'); give each seed once, e.g. --seeds 0,1,2"),
    ("-3", "error: --seeds: seed -3 is negative (got '-3')"),
])
def test_compare_rejects_bad_seeds(tmp_path, value, expected):
    """Bad --seeds stop before anything runs: exit 2, one line naming the option, the value and the fix."""
    from pipeline.cli import EXIT_BAD_INPUT, main

    spec = tmp_path / "wf.yaml"
    spec.write_text(yaml.safe_dump(tiny_workflow_dict(tmp_path, tmp_path / "no-base-needed", seed_mlflow=False)))
    result = CliRunner().invoke(main, ["compare", str(spec), "--seeds", value, "--out", str(tmp_path / "cmp")])
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    assert expected in result.output
    assert not (tmp_path / "cmp").exists() and not (tmp_path / "mlflow.db").exists()


def test_compare_refuses_a_variant_the_spec_cannot_run_before_anything_trains(tmp_path):
    """A merge that needs held-out inputs the spec does not give (adamerging without merge.validation_fraction)
    is refused with validate's one-line message before the first variant trains: no run, no store, no table."""
    from pipeline.cli import EXIT_BAD_INPUT, main

    spec = tmp_path / "wf.yaml"
    spec.write_text(yaml.safe_dump(tiny_workflow_dict(tmp_path, tmp_path / "no-base-needed", seed_mlflow=False)))
    result = CliRunner().invoke(main, ["compare", str(spec), "--merges", "task_arithmetic,adamerging",
                                       "--strategies", "oneshot", "--out", str(tmp_path / "cmp")])
    assert result.exit_code == EXIT_BAD_INPUT, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("error: "))
    assert "as oneshot with adamerging" in line and "merge" in line and "validation_fraction" in line, line
    assert "ValidationError" not in result.output and "input_value" not in result.output
    assert not (tmp_path / "cmp").exists() and not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "store").exists()
