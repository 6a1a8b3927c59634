"""LoRA experts and causal-LM tasks: training, evaluation and the pipeline around them.

The merge side (exact ΔW merges, adapter-mode output) is tested against hand-computed tensors in
``tests/test_lora_merge.py``; here: what fine-tuning writes, that evaluation scores exactly what
peft's folded model computes, losses and metrics worked out by hand, and whole workflows (one-shot
in-process, ATM through a real Ray cluster) with their MLflow lineage.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.spec import DatasetSpec, FinetuneSpec, LoraSpec, PromptTemplate, parse_workflow
from tests.helpers import make_tiny_causal_lm, tiny_lm_workflow_dict, write_lm_task, write_task_file


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_causal_lm(tmp_path_factory.mktemp("llama") / "base", "llama")


def _lm_data(tmp: Path, rule: str = "vowel", n: int = 96):
    from operators.data import load_task_data

    src = write_lm_task(tmp / f"{rule}.parquet", rule, n=n)
    ds = DatasetSpec(source=str(src), template=PromptTemplate(prompt="{text}?", response=" {answer}"),
                     answer_column="answer")
    return load_task_data(rule, ds, [], "causal_lm")


# --- training -------------------------------------------------------------------------------------------

def test_lora_classification_expert_is_an_adapter_plus_head_and_folds_exactly(tiny_base, tmp_path):
    """A LoRA expert is a small peft adapter (+ head), and evaluation sees W + (alpha/r)·B·A, by hand."""
    from operators.checkpoint import load_model, load_task_model
    from operators.data import load_task_data
    from operators.finetune import finetune

    src = write_task_file(tmp_path / "v.parquet", "vowel", n=64)
    data = load_task_data("vowel", DatasetSpec(source=str(src)), ["consonant", "vowel"])
    settings = FinetuneSpec(mode="lora", lora=LoraSpec(r=4, alpha=8, target_modules=["query", "value"]),
                            max_steps=4, batch_size=16, learning_rate=1e-2)
    res = finetune(tiny_base, data, settings, tmp_path / "e")
    files = {p.name for p in (tmp_path / "e").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "heads"} <= files
    assert "model.safetensors" not in files, "a LoRA expert is not a copy of the base"
    adapter = load_file(str(tmp_path / "e" / "adapter_model.safetensors"))
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert any(".query." in k for k in adapter) and not any(".key." in k for k in adapter)
    # only the adapters and the head trained: 2 layers x 2 modules x (A: 4x32 + B: 32x4), + head 2x32 + 2
    assert res.trainable_parameters == 2 * 2 * (4 * 32 + 32 * 4) + 2 * 32 + 2

    # fold by hand: W' = W + (alpha / r) B A on every adapted module, head from the expert
    by_hand = load_task_model(tiny_base, "vowel", head_from=tmp_path / "e")
    state = by_hand.state_dict()
    for key in [k for k in adapter if ".lora_A." in k]:
        module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        state[f"{module}.weight"] += (8 / 4) * b @ adapter[key]
    by_hand.load_state_dict(state)
    folded = load_model(tmp_path / "e", "vowel", causal_lm=False, adapter_base=tiny_base)
    x = {"input_ids": torch.tensor([[2, 10, 11, 12, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(folded(**x).logits, by_hand(**x).logits, rtol=1e-5, atol=1e-6)
        base_logits = load_task_model(tiny_base, "vowel", head_from=tmp_path / "e")(**x).logits
    assert not torch.allclose(base_logits, by_hand(**x).logits), "the adapter changed the model"


def test_causal_lm_loss_covers_the_response_and_eos_only(tiny_llama):
    from operators.data import Split
    from operators.finetune import IGNORE_INDEX, collate_lm, encode_lm, lm_tokenizer

    tok = lm_tokenizer(tiny_llama)
    rows = encode_lm(tok, Split(texts=[" no", " yes"], labels=[], prompts=["ab?", "e"]), max_length=64)
    ids, labels = rows[0]
    assert ids == tok("ab?")["input_ids"] + tok(" no", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert labels == [IGNORE_INDEX] * 3 + ids[3:], "prompt masked; ' no' (3 characters) and EOS learned"
    batch = collate_lm(rows, tok.pad_token_id, "cpu")
    assert batch["input_ids"].shape == (2, 7)
    assert batch["attention_mask"].tolist() == [[1] * 7, [1] * 6 + [0]]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] + rows[1][1][1:] + [IGNORE_INDEX]
    # no prompt: every token is learned; a long row is cut at max_length
    (ids, labels), = encode_lm(tok, Split(texts=["abcdef"], labels=[]), max_length=4)
    assert ids == labels == tok("abcdef")["input_ids"][:4]


def test_lm_metrics_match_a_hand_computation(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from operators.evaluate import greedy_answers, lm_metrics
    from operators.finetune import IGNORE_INDEX, encode_lm, lm_tokenizer

    data = _lm_data(tmp_path, n=20)
    model, tok = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval(), lm_tokenizer(tiny_llama)
    got = lm_metrics(model, tok, data.eval, batch_size=3, max_length=24)
    nll, hits, count = 0.0, 0, 0
    with torch.no_grad():
        for ids, labels in encode_lm(tok, data.eval, 24):  # one row at a time, no padding at all
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            for t in range(1, len(ids)):
                if labels[t] != IGNORE_INDEX:
                    nll -= float(torch.log_softmax(logits[t - 1], -1)[labels[t]])
                    hits += int(logits[t - 1].argmax()) == labels[t]
                    count += 1
    assert got["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert got["token_accuracy"] == pytest.approx(hits / count)
    # greedy answers: batched and left-padded = one prompt at a time, argmax step by step
    answers = greedy_answers(model, tok, data.eval.prompts[:3], batch_size=2, max_new_tokens=4)
    for prompt, answer in zip(data.eval.prompts[:3], answers, strict=True):
        ids = tok(prompt)["input_ids"]
        out = []
        with torch.no_grad():
            for _ in range(4):
                nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                out.append(nxt)
        assert answer == tok.decode(out, skip_special_tokens=True).split("\n")[0].strip()
    expected_em = sum(a == b for a, b in zip(greedy_answers(model, tok, data.eval.prompts, max_new_tokens=5),
                                             data.eval.answers, strict=True)) / len(data.eval)
    assert got["exact_match"] == pytest.approx(expected_em) and got["accuracy"] == got["exact_match"]
    # choice accuracy: the more likely of " yes"+EOS / " no"+EOS after the prompt, one sequence at a time
    hits = 0
    with torch.no_grad():
        for prompt, answer in zip(data.eval.prompts, data.eval.answers, strict=True):
            best, best_lp = None, -math.inf
            for option in ("no", "yes"):
                p_ids = tok(prompt)["input_ids"]
                r_ids = tok(" " + option, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                logp = torch.log_softmax(model(input_ids=torch.tensor([p_ids + r_ids])).logits[0], -1)
                lp = sum(float(logp[len(p_ids) + j - 1, t]) for j, t in enumerate(r_ids))
                if lp > best_lp:
                    best, best_lp = option, lp
            hits += best == answer
    assert got["choice_accuracy"] == pytest.approx(hits / len(data.eval))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_training_loss_projects_only_positions_that_predict_a_learned_token(arch, tmp_path):
    """lm_loss: the mean next-token cross-entropy over the learned tokens, worked out here from full logits,
    equal to transformers' own loss, with the same gradients; its vocabulary projection sees only the
    positions that predict a learned token in some row (not the prompts' or the padding's)."""
    from transformers import AutoModelForCausalLM

    from operators.data import Split
    from operators.finetune import IGNORE_INDEX, collate_lm, encode_lm, keeps_logits, lm_loss, lm_tokenizer

    base = make_tiny_causal_lm(tmp_path / arch, arch)
    model, tok = AutoModelForCausalLM.from_pretrained(str(base)), lm_tokenizer(base)
    assert keeps_logits(model)
    split = Split(texts=[" no", " yes", " maybe"], labels=[], prompts=["a long prompt?", "e?", "mid one?"])
    batch = collate_lm(encode_lm(tok, split, max_length=64), tok.pad_token_id, "cpu")
    labels = batch["labels"]
    seen: list[int] = []
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[-2]))
    loss = lm_loss(model, batch, keep_logits=True)
    hook.remove()
    learned = (labels[:, 1:] != IGNORE_INDEX).any(0)
    assert seen == [int(learned.sum())] and seen[0] < labels.shape[1] - 1, "only positions that predict"
    # by hand: log-softmax of the full logits at each learned token's preceding position, averaged
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits, -1)
    terms = [-logp[i, t - 1, labels[i, t]] for i in range(3) for t in range(1, labels.shape[1])
             if labels[i, t] != IGNORE_INDEX]
    assert len(terms) == sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in split.texts)
    assert float(loss) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full = lm_loss(model, batch, keep_logits=False)  # transformers' loss over every position's logits
    full.backward()
    assert float(full) == pytest.approx(float(loss), rel=1e-5)
    for a, b in zip(ours, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch,max_length", [("gpt2", 64), ("gpt2", 13), ("llama", 13)])
def test_choice_logprobs_score_each_answer_after_its_cached_prompt_as_one_sequence(arch, max_length, tmp_path):
    """Each prompt is run once (left-padded, positions from its first token, so GPT-2's absolute positions are
    right) and every answer is scored against its cached keys and values: the log-likelihood of one
    unpadded sequence per (prompt, answer), rows cut at max_length tokens as training cuts them."""
    from transformers import AutoModelForCausalLM

    from operators.evaluate import choice_logprobs
    from operators.finetune import lm_tokenizer

    base = make_tiny_causal_lm(tmp_path / arch, arch)
    model, tok = AutoModelForCausalLM.from_pretrained(str(base)).eval(), lm_tokenizer(base)
    prompts = [tok(p)["input_ids"] for p in ("ab?", "hello there?", "e", "longer prompt words?")]
    answers = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in (" no", " yes", " maybe")]
    got = choice_logprobs(model, prompts, answers, tok.pad_token_id, max_length=max_length, batch_size=3)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            for j, a in enumerate(answers):
                ids = (p + a)[:max_length]
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
                want = sum(float(logp[t - 1, ids[t]]) for t in range(len(p), len(ids)))
                assert float(got[i, j]) == pytest.approx(want, abs=1e-4), (i, j)
    if max_length == 13:  # the cut cases are there: an answer cut part way, and a prompt that leaves it no room
        assert any(len(p) < 13 < len(p) + len(a) for p in prompts for a in answers)
        assert any(len(p) >= 13 for p in prompts) and float(got[3].abs().sum()) == 0.0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_lora_causal_lm_expert_learns_and_saves_small(arch, tmp_path):
    """Llama, Qwen2 (grouped KV heads) and GPT-2 (Conv1D, fan_in_fan_out) LoRA experts train, shrink the
    loss, and save an adapter."""
    from operators.evaluate import evaluate
    from operators.finetune import finetune

    base = make_tiny_causal_lm(tmp_path / "base", arch)
    data = _lm_data(tmp_path, n=96)
    before = evaluate(base, data)
    res = finetune(base, data, FinetuneSpec(mode="lora", lora=LoraSpec(r=4, alpha=16), max_steps=30, batch_size=16,
                                            learning_rate=2e-2), tmp_path / "e")
    cfg = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 16 and cfg["task_type"] == "CAUSAL_LM"
    assert set(cfg["target_modules"]) == ({"c_attn", "c_proj", "c_fc"} if arch == "gpt2" else
                                          {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
    assert cfg["fan_in_fan_out"] is (arch == "gpt2")
    adapter_bytes = (tmp_path / "e" / "adapter_model.safetensors").stat().st_size
    base_bytes = (base / "model.safetensors").stat().st_size
    assert adapter_bytes < base_bytes / 2
    after = evaluate(tmp_path / "e", data, adapter_base=base)
    assert after["loss"] < before["loss"] - 0.2 and after["token_accuracy"] > before["token_accuracy"] + 0.2, \
        (before, after)
    assert res.tokens_seen > 0 and res.precision == "fp32"


def test_lm_spec_rules():
    base = {"name": "x", "base_model": "packaged:word-llama",
            "tasks": [{"name": "a", "type": "causal_lm", "dataset": {"source": "a.parquet"}}]}

    def problems(**changes):
        from pipeline.spec import SpecError

        spec = json.loads(json.dumps(base))
        for k, v in changes.items():
            spec[k] = v
        try:
            parse_workflow(spec)
        except SpecError as exc:
            return exc.problems
        return []

    assert problems() == []
    assert problems(tasks=[{"name": "a", "type": "causal_lm", "labels": ["x", "y"], "dataset": {"source": "a.csv"}}]) == [
        "tasks[0]: a causal_lm task has no labels; drop 'labels'/'num_labels' (use dataset.answer_column for "
        "exact-match evaluation)."]
    assert problems(tasks=[{"name": "a", "labels": ["x", "y"], "dataset": {"source": "a.csv", "answer_column": "y"}}]) == [
        "tasks[0]: dataset.answer_column is for causal_lm tasks; set type: causal_lm or remove it."]
    assert problems(tasks=[base["tasks"][0], {"name": "b", "labels": ["x", "y"], "dataset": {"source": "b.csv"}}]) == [
        "tasks: mixes task types ('a' is causal_lm, 'b' is classification); one workflow merges one kind of model: "
        "split it into two workflows."]
    assert problems(base_model="packaged:all-minilm-l6-v2") == [
        "base_model: 'packaged:all-minilm-l6-v2' is an encoder without a language-model head; causal_lm tasks need "
        "a causal LM (packaged:word-llama or a local checkpoint directory)."]
    assert problems(merge={"heads": "aligned"}) == [
        "merge.heads: aligned refits classification heads, and task 'a' is a causal LM (it has none); use heads: "
        "experts."]
    assert problems(merge={"lora": {"mode": "adapter"}}) == [
        "merge.lora.mode: adapter needs LoRA experts, but some tasks fine-tune with mode full; set finetune.mode: "
        "lora or use lora.mode: exact."]
    assert problems(finetune={"mode": "lora"}, strategy="atm", merge={"lora": {"mode": "adapter"}}) == [
        "merge.lora.mode: adapter writes an adapter, but atm rounds start from the merged weights (every round's "
        "merge is folded into the model); use lora.mode: exact for iterated strategies."]
    assert problems(finetune={"mode": "lora"}, merge={"method": "ties", "lora": {"mode": "adapter",
                                                                                  "factorization": "concat"}}) == [
        "merge: lora: factorization concat is exact only for linear and task_arithmetic (got method 'ties'); use "
        "factorization: svd."]
    assert problems(finetune={"mode": "lora", "lora": {"r": 0}})[0].startswith("finetune.lora.r: Input should be "
                                                                              "greater than or equal to 1")
    assert problems(finetune={"mode": "qlora"})[0].startswith("finetune.mode: Input should be 'full' or 'lora'")


# --- whole workflows ------------------------------------------------------------------------------------

def _client(wf):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=wf.tracking.uri, registry_uri=wf.tracking.uri)


def test_oneshot_lora_adapter_merge_in_process(tiny_llama, tmp_path):
    """One-shot LoRA causal LM, adapter-mode merge: the merged model is one adapter, scored, with its error."""
    from operators.checkpoint_files import is_adapter_checkpoint, read_provenance
    from pipeline.driver import run_workflow

    spec = tiny_lm_workflow_dict(tmp_path, tiny_llama, merge={
        "method": "task_arithmetic", "params": {"scaling": 0.5}, "lora": {"mode": "adapter", "rank": 2}})
    spec["tracking"]["log_expert_artifacts"] = True
    wf = parse_workflow(spec)
    result = run_workflow(wf, address="in-process", report=lambda _m: None)
    final = result.final
    # MLflow holds the adapters, not copies of the base
    base_bytes = (tiny_llama / "model.safetensors").stat().st_size
    for expert in final.experts.values():
        art = _client(wf).get_logged_model(expert.model_id).artifact_location
        files = {p.name: p.stat().st_size for p in Path(art.removeprefix("file://")).rglob("*") if p.is_file()}
        assert "adapter_model.safetensors" in files and "model.safetensors" not in files, files
        assert files["adapter_model.safetensors"] < base_bytes / 2
    merged_dir = Path(final.merged.uri)
    assert is_adapter_checkpoint(merged_dir) and not (merged_dir / "model.safetensors").exists()
    prov = read_provenance(merged_dir)
    assert prov["adapter_base"]["kind"] == "base"
    assert {p["task"]: p["format"] for p in prov["parents"][1:]} == {"vowel": "peft-lora-adapter",
                                                                    "length": "peft-lora-adapter"}
    assert {p["task"]: p["run_id"] for p in prov["parents"][1:]} == {t: e.run_id for t, e in final.experts.items()}
    merge_run = _client(wf).get_run(final.merged.run_id)
    error = merge_run.data.metrics["adapter_relative_error"]
    assert 0 < error < 1 and merge_run.data.metrics["adapter_rank"] == 2
    assert merge_run.data.params["lora.mode"] == "adapter"
    # `mergeflow export` folds the merged adapter into its base: a plain transformers causal LM
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM

    from operators.checkpoint import load_model
    from pipeline.cli import main

    out = CliRunner().invoke(main, ["export", str(merged_dir), "vowel", str(tmp_path / "exported")])
    assert out.exit_code == 0, out.output
    x = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported")).eval()(input_ids=x).logits
        folded = load_model(merged_dir, None, causal_lm=True, adapter_base=tiny_llama)(input_ids=x).logits
    torch.testing.assert_close(plain, folded)
    for task in ("vowel", "length"):  # scored as base + merged adapter, every LM metric logged
        assert {f"eval/{task}/{k}" for k in ("loss", "perplexity", "token_accuracy", "exact_match", "accuracy")} \
            <= set(merge_run.data.metrics)
        assert final.merged_eval[task]["accuracy"] == final.merged_eval[task]["exact_match"]
        # baseline of a causal-LM task: the base model as it is
        assert final.baseline[task]["loss"] > final.expert_evals[task][task]["loss"]


@pytest.mark.e2e
def test_atm_lora_causal_lm_rounds_through_ray_and_mlflow(tiny_llama, tmp_path):
    """Two ATM rounds of LoRA experts on a pico Llama through a real Ray cluster and MLflow store."""
    from operators.checkpoint_files import is_adapter_checkpoint, read_provenance
    from pipeline.context import base_ref
    from pipeline.driver import run_workflow

    wf = parse_workflow(tiny_lm_workflow_dict(tmp_path, tiny_llama, strategy="atm", rounds={"count": 2},
                                              merge={"method": "task_arithmetic", "params": {"scaling": 0.5}}))
    result = run_workflow(wf, address="local", num_cpus=2, report=lambda _m: None)
    assert [r.index for r in result.rounds] == [0, 1]
    client = _client(wf)
    for r in result.rounds:
        start = result.rounds[r.index - 1].merged if r.index else None
        for task, expert in r.experts.items():
            d = Path(expert.uri)
            assert is_adapter_checkpoint(d) and not (d / "model.safetensors").exists(), "adapters, not full copies"
            prov = read_provenance(d)
            # round k's adapters are trained on the round's start: the base, then round 0's merge folded in
            assert prov["adapter_base"]["key"] == (start.key if start else base_ref(wf).key)
            assert prov["adapter_base"]["kind"] == ("merged" if start else "base")
            run = client.get_run(expert.run_id)
            assert run.data.tags["mergeflow.finetune_mode"] == "lora"
            assert run.data.metrics["train_tokens_per_second"] > 0
            assert f"eval/{task}/exact_match" in run.data.metrics
            model = client.get_logged_model(expert.model_id)
            assert model.tags["mergeflow.format"] == "peft-lora-adapter"
        merged = Path(r.merged.uri)
        assert not is_adapter_checkpoint(merged) and (merged / "model.safetensors").is_file(), "rounds fold merges"
        parents = read_provenance(merged)["parents"][1:]
        assert {p["task"]: p["run_id"] for p in parents} == {t: e.run_id for t, e in r.experts.items()}
    versions = client.search_model_versions(f"name = '{wf.registered_model_name}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    runs = client.search_runs([result.experiment_id])
    assert all(run.info.status == "FINISHED" for run in runs), [run.info.run_name for run in runs
                                                                 if run.info.status != "FINISHED"]
    # the merged body loads as a plain transformers causal LM
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(result.final.merged.uri)


def test_oneshot_lora_classification_in_process(tiny_base, tmp_path):
    """LoRA classification experts through the pipeline: adapters + heads, cross-task scores, exact merge."""
    from operators.checkpoint_files import is_adapter_checkpoint, read_provenance
    from pipeline.driver import run_workflow
    from tests.helpers import tiny_workflow_dict

    spec = tiny_workflow_dict(tmp_path, tiny_base)
    spec["finetune"] |= {"mode": "lora", "lora": {"r": 4, "alpha": 8}, "learning_rate": 1e-2}
    result = run_workflow(parse_workflow(spec), address="in-process", report=lambda _m: None)
    final = result.final
    for task, expert in final.experts.items():
        assert is_adapter_checkpoint(expert.uri) and (Path(expert.uri) / "heads" / task / "head.safetensors").is_file()
        assert set(final.expert_evals[task]) == {"vowel", "length"}, "each expert's body scored with every head"
    merged = Path(final.merged.uri)
    assert not is_adapter_checkpoint(merged) and {p.name for p in (merged / "heads").iterdir()} == {"vowel", "length"}
    assert read_provenance(merged)["parents"][1]["format"] == "peft-lora-adapter"
    assert set(final.merged_eval) == {"vowel", "length"}
    # the merged body is task arithmetic (λ = 0.5) of the experts as peft folds them
    from operators.checkpoint import load_model, load_task_model
    from operators.tensor_io import load_state_dict

    base = load_task_model(tiny_base, "vowel", head_from=final.experts["vowel"].uri).base_model.state_dict()
    folded = {t: load_model(e.uri, t, causal_lm=False, adapter_base=tiny_base).base_model.state_dict()
              for t, e in final.experts.items()}
    body = load_state_dict(merged)
    for key in ("encoder.layer.0.attention.self.query.weight", "encoder.layer.1.output.dense.weight"):
        expected = base[key] + 0.5 * sum(f[key] - base[key] for f in folded.values())
        assert not torch.equal(expected, base[key])
        torch.testing.assert_close(body[key], expected, rtol=1e-5, atol=1e-6)


def test_cross_task_scores_can_be_left_out(tiny_base, tmp_path):
    """evaluation.cross_task: false: each expert is scored on its own task only (the same own-task scores, the
    same merge), and the spec keeps its hash (nothing that changes a weight)."""
    from pipeline.driver import run_workflow
    from tests.helpers import tiny_workflow_dict

    spec = tiny_workflow_dict(tmp_path, tiny_base)
    full = run_workflow(parse_workflow(spec), address="in-process", report=lambda _m: None).final
    lean_spec = parse_workflow(spec | {"evaluation": {"cross_task": False}})
    assert lean_spec.spec_hash() == parse_workflow(spec).spec_hash()
    lean = run_workflow(lean_spec, address="in-process", report=lambda _m: None).final
    for task in ("vowel", "length"):
        assert set(full.expert_evals[task]) == {"vowel", "length"} and set(lean.expert_evals[task]) == {task}
        assert lean.expert_evals[task][task] == full.expert_evals[task][task]
    assert lean.merged.uri == full.merged.uri and lean.merged_eval == full.merged_eval  # reused, the same scores


def test_a_one_shot_variant_of_a_spec_with_resident_rounds_runs_one_shot(tiny_base, tmp_path):
    """mergeflow compare: rounds.workers and checkpoint_every apply to rounds; a one-shot variant of a spec
    whose rounds are resident is a valid one-shot workflow (the rule against resident one-shot stays)."""
    from pipeline.compare import variant_workflow
    from pipeline.spec import SpecError
    from tests.helpers import tiny_workflow_dict

    spec = tiny_workflow_dict(tmp_path, tiny_base, strategy="atm",
                              rounds={"count": 4, "workers": "resident", "checkpoint_every": 2})
    wf = parse_workflow(spec)
    oneshot = variant_workflow(wf, "oneshot", "ties")
    assert oneshot.strategy == "oneshot" and oneshot.rounds.workers == "tasks" and oneshot.merge.method == "ties"
    atm = variant_workflow(wf, "atm", "mean")
    assert atm.rounds.workers == "resident" and atm.rounds.checkpoint_every == 2
    with pytest.raises(SpecError, match="rounds.workers: resident keeps models across rounds"):
        parse_workflow(spec | {"strategy": "oneshot"})
