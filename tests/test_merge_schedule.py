"""Parameters that vary by tensor (mergekit's gradients and filters): values worked out by hand, and the
record a merge with them leaves."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from click.testing import CliRunner

from operators.merge.schedule import evaluate, layer_position, resolve
from pipeline.cli import main

DATA = Path(__file__).parent / "data" / "mergekit"


@pytest.mark.parametrize("setting,name,t,want", [
    (0.5, "any", 0.7, 0.5),
    ([1, 0.7, 0.1], "x", 0.0, 1.0),
    ([1, 0.7, 0.1], "x", 0.25, 0.85),  # t·(len−1) = 0.5: halfway between 1 and 0.7
    ([1, 0.7, 0.1], "x", 0.75, 0.4),  # 1.5: halfway between 0.7 and 0.1
    ([1, 0.7, 0.1], "x", 1.0, 0.1),
    ([0, 0.3, 0.7, 1], "x", 0.5, 0.5),  # 1.5: halfway between 0.3 and 0.7
    ([True, False], "x", 0.4, True),  # non-numbers pick the entry at int(t·(len−1))
    ([True, False], "x", 1.0, False),
    ([{"filter": "mlp", "value": 0.5}, {"value": 0}], "model.layers.0.mlp.up_proj.weight", 0.0, 0.5),
    ([{"filter": "mlp", "value": 0.5}, {"value": 0}], "model.layers.0.self_attn.q_proj.weight", 0.0, 0),
    ([{"filter": "mlp", "value": [0.0, 1.0]}], "model.layers.3.mlp.up_proj.weight", 0.75, 0.75),
    ([{"filter": "mlp", "value": 0.5}], "model.norm.weight", 0.0, None),  # no match: the next scope is asked
    ({"filter": "*", "value": 2}, "lm_head.weight", 0.0, 2),
])
def test_a_setting_gives_the_value_mergekit_gives(setting, name, t, want):
    got = evaluate(setting, name, t)
    assert got == pytest.approx(want) if want is not None else got is None


def test_layer_positions_spread_over_the_layers_and_other_tensors_sit_at_zero():
    assert [layer_position(f"model.layers.{i}.mlp.up_proj.weight", 5) for i in range(5)] == [0, 0.25, 0.5, 0.75, 1]
    assert layer_position("transformer.h.2.attn.c_attn.weight", 3) == 1.0
    assert layer_position("model.layers.0.mlp.up_proj.weight", 1) == 1.0  # one layer: t = 1, as mergekit has it
    assert layer_position("model.embed_tokens.weight", 5) == 0.0
    assert resolve({"a": [0.0, 1.0], "b": [{"filter": "mlp", "value": 1}]}, "model.layers.1.self_attn.o_proj.weight",
                   0.5) == {"a": 0.5}


def test_a_merge_with_gradients_records_each_tensors_parameters(tmp_path):
    cfg = tmp_path / "ties.yaml"
    cfg.write_text(string.Template((DATA / "configs" / "ties_gradients.yaml").read_text()).substitute(
        {m: str(DATA / "models" / m) for m in ("d_base", "d0", "d1", "d2")}))
    out = tmp_path / "merged"
    result = CliRunner().invoke(main, ["merge", str(cfg), str(out), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "mergeflow.json").read_text())["tensor_params"]
    by_tensor = {k: g["params"] for g in record for k in g["tensors"]}
    assert len(by_tensor) == 5 * 9 + 3  # every tensor of the five-layer Llama, each once
    # layer 1 of 5 sits at t = 0.25: d0's density [1, 0.7, 0.1] gives 0.85, d1's weight [0, 0.3, 0.7, 1] gives
    # 0.225; d2's weight is 0.5 on the MLPs and 0 elsewhere
    mlp, attn = by_tensor["model.layers.1.mlp.up_proj.weight"], by_tensor["model.layers.1.self_attn.q_proj.weight"]
    assert mlp["densities"] == pytest.approx({"d0": 0.85, "d1": 0.5, "d2": 0.33})
    assert mlp["weights"] == pytest.approx({"d0": 1.0, "d1": 0.225, "d2": 0.5})
    assert attn["weights"] == pytest.approx({"d0": 1.0, "d1": 0.225, "d2": 0.0})
    assert by_tensor["model.embed_tokens.weight"]["weights"] == pytest.approx({"d0": 1.0, "d1": 0.0, "d2": 0.0})
