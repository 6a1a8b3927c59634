"""Vocabularies merged (``tokenizer: {source: union | base | model:NAME}``): each output token's rows taken by
mergekit's rule, worked out by hand on three small vocabularies; and a merge of models with other tokenizers
that loads with ``from_pretrained`` and reads its new tokens."""

from __future__ import annotations

import json

import torch

from operators.merge.vocab import BASE, VocabPlan, align


class _Vocab:
    def __init__(self, tokens):
        self._v = {t: i for i, t in enumerate(tokens)}

    def get_vocab(self):
        return dict(self._v)


def test_missing_rows_come_from_the_donor_the_base_or_the_mean_of_those_that_have_them():
    # output vocabulary a b c d e; the base has a b; e1 has a b c; e2 has a b c d (d at its row 3); nobody has e
    rows = {BASE: torch.tensor([0, 1, -1, -1, -1, -1]), "e1": torch.tensor([0, 1, 2, -1, -1, -1]),
            "e2": torch.tensor([1, 0, 2, 3, -1, -1])}  # e2 keeps its a and b in the other order
    plan = VocabPlan("union", _Vocab("abcde"), 6, rows, {BASE: 2, "e1": 3, "e2": 4})
    base = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    e1 = torch.tensor([[1.5, 1.0], [2.0, 2.5], [10.0, 0.0]])
    e2 = torch.tensor([[2.0, 3.0], [1.0, 0.0], [20.0, 4.0], [7.0, 7.0]])
    out = align(plan, "lm_head.weight", {BASE: base, "e1": e1, "e2": e2})
    # c: e1 and e2 have it, the base does not → the base's row is their mean (15, 2)
    # d: only e2 has it → every model missing it takes e2's row (7, 7); e: nobody → zeros; row 6: padding, the mean
    assert torch.equal(out[BASE][:5], torch.tensor([[1.0, 1.0], [2.0, 2.0], [15.0, 2.0], [7.0, 7.0], [0.0, 0.0]]))
    assert torch.equal(out["e1"][:5], torch.tensor([[1.5, 1.0], [2.0, 2.5], [10.0, 0.0], [7.0, 7.0], [0.0, 0.0]]))
    assert torch.equal(out["e2"][:5], torch.tensor([[1.0, 0.0], [2.0, 3.0], [20.0, 4.0], [7.0, 7.0], [0.0, 0.0]]))
    assert torch.allclose(out["e1"][5], out["e1"][:5].mean(0))
    # a token the base has, missing from one expert, takes the base's row there (not the mean)
    rows2 = {BASE: torch.tensor([0, 1]), "e1": torch.tensor([0, -1]), "e2": torch.tensor([0, 1])}
    plan2 = VocabPlan("base", _Vocab("ab"), 2, rows2, {BASE: 2, "e1": 1, "e2": 2})
    out2 = align(plan2, "x.embed_tokens.weight", {BASE: base, "e1": e1[:1], "e2": e2[:2]})
    assert torch.equal(out2["e1"][1], base[1])


def test_a_union_merge_loads_and_reads_every_models_tokens(tmp_path):
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.cli import main
    from tests.test_mergekit_compat import DATA

    cfg = tmp_path / "union.yaml"
    cfg.write_text(f"base: {DATA / 'models' / 't_base'}\nexperts: {{a: {DATA / 'models' / 't0'}, b: {DATA / 'models' / 't1'}}}\n"
                   "method: task_arithmetic\nparams: {scaling: 0.5}\ntokenizer: {source: union}\n")
    out = tmp_path / "merged"
    res = CliRunner().invoke(main, ["merge", str(cfg), str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    tok = AutoTokenizer.from_pretrained(str(out))
    base_tok = AutoTokenizer.from_pretrained(str(DATA / "models" / "t_base"))
    assert set(tok.get_vocab()) == set(base_tok.get_vocab()) | {"<tool>", "zz", "qq"}
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == len(tok)
    ids = tok("a <tool> qq", return_tensors="pt")["input_ids"]
    assert tok.convert_ids_to_tokens(ids[0]).count("<tool>") == 1
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    # "<tool>" only t0 has: the merged row is t0's, exactly (its task vector there is zero for t1 and the base)
    t0 = AutoModelForCausalLM.from_pretrained(DATA / "models" / "t0")
    t0_tok = AutoTokenizer.from_pretrained(str(DATA / "models" / "t0"))
    got = model.lm_head.weight[tok.convert_tokens_to_ids("<tool>")]
    want = t0.lm_head.weight[t0_tok.convert_tokens_to_ids("<tool>")]
    base_m = AutoModelForCausalLM.from_pretrained(DATA / "models" / "t_base")
    assert torch.allclose(got, want, atol=1e-6)
    assert json.loads((out / "mergeflow.json").read_text())["vocabulary"]["source"] == "union"
    # without tokenizer: the shapes differ, and the merge is refused by name, as before
    cfg.write_text(cfg.read_text().replace("tokenizer: {source: union}\n", ""))
    res = CliRunner().invoke(main, ["merge", str(cfg), str(tmp_path / "refused"), "--quiet"])
    assert res.exit_code == 2 and "vocab_size" in res.output and not (tmp_path / "refused").exists()
    assert base_m.config.vocab_size < model.config.vocab_size
