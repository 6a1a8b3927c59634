"""Evaluate a body + task head on a task's held-out split; and the linear-probe baseline.

Metrics: accuracy and macro-F1 on the eval split. Normalised accuracy (merged / expert) is worked
out by the pipeline, which knows both numbers.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from operators.checkpoint import load_model, load_task_model, quiet_transformers
from operators.data import Split, TaskData
from operators.finetune import IGNORE_INDEX, collate_lm, encode_lm, keeps_logits, lm_tokenizer


def classification_metrics(pred: np.ndarray, gold: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (F1 averaged over the labels that occur in gold or predictions)."""
    pred, gold = np.asarray(pred), np.asarray(gold)
    acc = float((pred == gold).mean()) if len(gold) else float("nan")
    f1s = []
    for c in range(num_labels):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        if tp + fp + fn == 0:
            continue  # label absent from both: it does not count towards the macro average
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "macro_f1": float(np.mean(f1s)) if f1s else float("nan"), "n": float(len(gold))}


def length_batches(tokenizer, texts: list[str], batch_size: int, max_length: int) -> list[list[int]]:
    """Example indices in batches of similar length (shortest first, ties in input order).

    Padding every batch to its longest example costs compute for nothing: word-level inputs padded
    to a random batch's longest run 1.6-1.8x slower on CPU. A padded position is masked out, so only
    float rounding differs (logits within ~1e-7 of unsorted batches on the quickstart tasks, argmax
    identical).
    """
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def predict(model, tokenizer, split: Split, *, batch_size: int = 128, max_length: int = 64, device: str = "cpu",
            batches: list[list[int]] | None = None) -> np.ndarray:
    """The predicted class of every example of ``split``, in its order (``batches``: from :func:`length_batches`)."""
    model.eval().to(device)
    pred = np.zeros(len(split), dtype=np.int64)
    for idx in batches if batches is not None else length_batches(tokenizer, split.texts, batch_size, max_length):
        enc = tokenizer([split.texts[i] for i in idx], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt").to(device)
        pred[idx] = model(**enc).logits.argmax(-1).cpu().numpy()
    return pred


def evaluate(
    ckpt: str | Path,
    data: TaskData,
    *,
    head_from: str | Path | None = None,
    adapter_base: str | Path | None = None,
    headline: str | None = None,
    batch_size: int = 128,
    max_length: int = 64,
    device: str = "cpu",
) -> dict[str, float]:
    """Score ``ckpt`` on ``data``'s eval split: body + ``data.name``'s head, or a causal LM.

    Args:
        ckpt: The checkpoint scored: a full checkpoint, or a LoRA adapter (with ``adapter_base``).
        data: The task; its eval split is used.
        head_from: Take the head from this checkpoint instead (e.g. an expert's head on another body).
        adapter_base: The full checkpoint a LoRA adapter ``ckpt`` was trained from.
        headline: Which metric ``accuracy`` reports (the task's headline metric); default: the type's.

    Returns:
        Classification: ``{"accuracy", "macro_f1", "n"}``. Causal LM: ``{"loss", "perplexity",
        "token_accuracy", "exact_match" and "choice_accuracy" (with answers), "accuracy" (= the headline
        metric), "n"}``.
    """
    quiet_transformers()
    model = load_model(ckpt, data.name, causal_lm=data.is_lm, head_from=head_from, adapter_base=adapter_base)
    tok_dir = adapter_base if adapter_base is not None and not (Path(ckpt) / "tokenizer_config.json").is_file() else ckpt
    if data.is_lm:
        tokenizer = lm_tokenizer(tok_dir)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    return score(model, tokenizer, data, headline=headline, batch_size=batch_size, max_length=max_length,
                 device=device)


def score(model, tokenizer, data: TaskData, *, headline: str | None = None, batch_size: int = 128,
          max_length: int = 64, device: str = "cpu") -> dict[str, float]:
    """:func:`evaluate` of a model already in memory (e.g. the expert its fine-tuning step just trained)."""
    if data.is_lm:
        return lm_metrics(model, tokenizer, data.eval, headline=headline, batch_size=batch_size,
                          max_length=max_length, device=device)
    pred = predict(model, tokenizer, data.eval, batch_size=batch_size, max_length=max_length, device=device)
    metrics = classification_metrics(pred, np.array(data.eval.labels), len(data.label_names))
    if headline == "macro_f1":
        metrics = {**metrics, "accuracy_plain": metrics["accuracy"], "accuracy": metrics["macro_f1"]}
    return metrics


@torch.no_grad()
def lm_metrics(model, tokenizer, split: Split, *, headline: str | None = None, batch_size: int = 64,
               max_length: int = 64, device: str = "cpu", max_new_tokens: int | None = None) -> dict[str, float]:
    """Held-out loss, perplexity and next-token accuracy on the response tokens; exact match of greedy answers.

    The loss is the token-weighted mean negative log-likelihood of the tokens the training loss
    covers (response + EOS; every token without prompts), so ``perplexity = exp(loss)``.
    ``exact_match`` (when the split has answers): the fraction of prompts whose greedy continuation,
    cut at EOS or a newline and stripped, equals the answer stripped; ``choice_accuracy`` (with at
    most ``MAX_CHOICES`` distinct answers): see :func:`choice_accuracy`.
    """
    model.eval().to(device)
    rows = encode_lm(tokenizer, split, max_length)
    nll, correct, count = 0.0, 0, 0
    for i in range(0, len(rows), batch_size):
        batch = collate_lm(rows[i:i + batch_size], tokenizer.pad_token_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        keep = target != IGNORE_INDEX
        nll += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
        correct += int((logits.argmax(-1)[keep] == target[keep]).sum())
        count += int(keep.sum())
    loss = nll / max(1, count)
    out = {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))), "token_accuracy": correct / max(1, count),
           "n": float(len(split))}
    if split.answers is not None and split.prompts is not None:
        out["exact_match"] = exact_match(model, tokenizer, split.prompts, split.answers, batch_size=batch_size,
                                         max_length=max_length, device=device, max_new_tokens=max_new_tokens)
        if len(set(split.answers)) <= MAX_CHOICES:
            out["choice_accuracy"] = choice_accuracy(model, tokenizer, split, batch_size=batch_size,
                                                     max_length=max_length, device=device)
    key = headline or ("exact_match" if "exact_match" in out else "token_accuracy")
    if key not in out:
        raise ValueError(f"metric {key} cannot be computed on this split: exact_match and choice_accuracy need "
                         f"prompts and answers, choice_accuracy at most {MAX_CHOICES} distinct answers")
    out["accuracy"] = out[key]
    return out


MAX_CHOICES = 32  # answer sets up to this size are also scored as a choice among the known answers


@torch.no_grad()
def sequence_logprobs(model, rows: list[tuple[list[int], list[int]]], pad_id: int, *, batch_size: int = 64,
                      device: str = "cpu") -> list[float]:
    """The log-likelihood of each row's learned tokens (labels not ``IGNORE_INDEX``), summed per row."""
    sums: list[float] = []
    for i in range(0, len(rows), batch_size):
        batch = collate_lm(rows[i:i + batch_size], pad_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        keep = target != IGNORE_INDEX
        logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        sums.extend((logp * keep).sum(-1).tolist())
    return sums


def left_padded(rows: list[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows left-padded to one width (so every row ends at the last column), and their attention mask."""
    width = max(len(x) for x in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, x in enumerate(rows):
        ids[j, width - len(x):] = torch.tensor(x)
        mask[j, width - len(x):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def choice_logprobs(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int, *, max_length: int = 64,
                    batch_size: int = 64, device: str = "cpu") -> torch.Tensor:
    """``[i, j]``: the log-likelihood of answer ``j``'s tokens after prompt ``i`` (a batch of prompts once, then
    each answer against their cached keys and values, rows cut at ``max_length`` tokens as ``encode_lm`` cuts
    them). The same sums as scoring every (prompt, answer) as one sequence, to float rounding, with the
    prompts' share of the work done once instead of once per answer.

    Prompts are left-padded, with positions counted from each prompt's first token; each prompt must have
    at least one token (it predicts the answer's first).
    """
    model.eval().to(device)
    # the prompts' forward needs the logits of their last position only (not [batch, width, vocabulary])
    last_logits_only = {"logits_to_keep": 1} if keeps_logits(model) else {}
    out = torch.zeros(len(prompts), len(answers))
    for i in range(0, len(prompts), batch_size):
        chunk = [p[:max_length] for p in prompts[i:i + batch_size]]
        ids, mask = left_padded(chunk, pad_id, device)
        lengths = mask.sum(-1, keepdim=True)
        first = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                      use_cache=True, **last_logits_only)
        prompt_cache, last = first.past_key_values, torch.log_softmax(first.logits[:, -1].float(), -1)
        for j, answer in enumerate(answers):
            # a copy of the prompts' keys and values for this answer to extend (every cache kind copies; not
            # every kind can be cut back: sliding-window and linear-attention layers drop what they pass)
            cache = copy.deepcopy(prompt_cache)
            # each row keeps the answer tokens that fit in max_length after its prompt
            keep = [max(0, min(len(answer), max_length - len(p))) for p in chunk]
            a = torch.tensor(answer, device=device)
            total = torch.where(torch.tensor(keep, device=device) > 0, last[:, answer[0]], 0.0)
            if len(answer) > 1 and max(keep) > 1:
                steps = max(keep) - 1  # the tokens that predict the kept ones (none past the longest row's cut)
                amask = torch.cat([mask, torch.ones((len(chunk), steps), dtype=torch.long, device=device)], -1)
                # a row whose cut comes earlier is fed past it, uncounted; its positions stay within max_length
                pos = (lengths + torch.arange(steps, device=device)).clamp(max=max_length - 1)
                logits = model(input_ids=a[:steps].expand(len(chunk), -1), attention_mask=amask, position_ids=pos,
                               past_key_values=cache, use_cache=True).logits.float()
                target = a[1:steps + 1].expand(len(chunk), -1).unsqueeze(-1)
                logp = torch.log_softmax(logits, -1).gather(-1, target).squeeze(-1)
                counted = torch.arange(1, steps + 1, device=device) < torch.tensor(keep, device=device).unsqueeze(-1)
                total = total + (logp * counted).sum(-1)
            out[i:i + len(chunk), j] = total.cpu()
    return out


def choice_accuracy(model, tokenizer, split: Split, *, batch_size: int = 64, max_length: int = 64,
                    device: str = "cpu") -> float:
    """Accuracy of choosing the gold answer among the split's distinct answers by likelihood.

    Multiple-choice scoring as lm-evaluation-harness' ``acc``: for every prompt, each distinct answer's
    response text (+ EOS) is scored by its summed log-likelihood given the prompt, and the most
    likely answer is the prediction. It credits a model that ranks the right answer first even when
    its free-running greedy text is not exactly the answer.
    """
    response_of: dict[str, str] = {}
    for answer, text in zip(split.answers, split.texts, strict=True):
        response_of.setdefault(answer, text)
    options = sorted(response_of)
    prompt_ids = tokenizer(split.prompts)["input_ids"]
    if all(prompt_ids):  # each prompt once, then every answer after it (the prompt's keys and values kept)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        answer_ids = [ids + eos for ids in tokenizer([response_of[o] for o in options],
                                                      add_special_tokens=False)["input_ids"]]
        scores = choice_logprobs(model, prompt_ids, answer_ids, tokenizer.pad_token_id, max_length=max_length,
                                 batch_size=batch_size, device=device)
    else:  # a prompt of no tokens: nothing predicts its answer's first token; every pair as one sequence
        prompts = [p for p in split.prompts for _ in options]
        texts = [response_of[o] for _ in split.prompts for o in options]
        rows = encode_lm(tokenizer, Split(texts=texts, labels=[], prompts=prompts), max_length)
        scores = torch.tensor(sequence_logprobs(model, rows, tokenizer.pad_token_id, batch_size=batch_size,
                                                device=device)).view(len(split.prompts), len(options))
    chosen = [options[j] for j in scores.argmax(-1).tolist()]
    return sum(c == a for c, a in zip(chosen, split.answers, strict=True)) / max(1, len(split.answers))


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], *, batch_size: int = 64, max_length: int = 64,
                   device: str = "cpu", max_new_tokens: int = 16) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), cut at EOS or a newline."""
    model.eval().to(device)
    encoded = [ids[-max_length:] for ids in tokenizer(prompts)["input_ids"]]
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    out: list[str] = []
    for i in range(0, len(encoded), batch_size):
        ids, mask = left_padded(encoded[i:i + batch_size], pad, device)
        width = ids.shape[1]
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos)
        for row in gen[:, width:].tolist():
            if eos in row:
                row = row[:row.index(eos)]
            out.append(tokenizer.decode(row, skip_special_tokens=True).split("\n")[0].strip())
    return out


def exact_match(model, tokenizer, prompts: list[str], answers: list[str], *, batch_size: int = 64,
                max_length: int = 64, device: str = "cpu", max_new_tokens: int | None = None) -> float:
    """The fraction of prompts whose greedy answer equals the reference (both stripped)."""
    if max_new_tokens is None:  # room for the longest reference answer, and its EOS
        max_new_tokens = max(len(ids) for ids in tokenizer(answers, add_special_tokens=False)["input_ids"]) + 2
    got = greedy_answers(model, tokenizer, prompts, batch_size=batch_size, max_length=max_length, device=device,
                         max_new_tokens=max_new_tokens)
    return sum(g == a.strip() for g, a in zip(got, answers, strict=True)) / max(1, len(answers))


@torch.no_grad()
def _features(model, tokenizer, split: Split, head: torch.nn.Module, max_length: int, device: str) -> torch.Tensor:
    """The inputs the head module sees, for every example (captured with a forward pre-hook)."""
    captured: list[torch.Tensor] = []
    batches = length_batches(tokenizer, split.texts, 128, max_length)
    hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().cpu()))
    try:
        predict(model, tokenizer, split, max_length=max_length, device=device, batches=batches)
    finally:
        hook.remove()
    if not captured:
        return torch.zeros(0)
    features = torch.cat(captured)
    out = torch.empty_like(features)
    out[[i for idx in batches for i in idx]] = features  # back into the split's order
    return out


def linear_probe(
    ckpt: str | Path,
    data: TaskData,
    *,
    steps: int = 300,
    lr: float = 1e-2,
    max_length: int = 64,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, float]:
    """Train only a fresh task head on the frozen body of ``ckpt``, then score it on the eval split.

    This is the baseline "what the body gives without fine-tuning it" (ColD Fusion's ColD-Frozen
    evaluation). Head inputs are computed once with the body frozen; the head module itself (for
    BERT the ``classifier`` linear layer) is trained full-batch with Adam on cross-entropy, over
    standardised features.

    Returns:
        ``{"accuracy", "macro_f1", "n"}`` on the eval split.
    """
    from transformers import AutoTokenizer

    quiet_transformers()
    torch.manual_seed(seed)
    model = load_task_model(ckpt, None, label_names=data.label_names).to(device)
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    prefix = model.base_model_prefix
    head_names = [n for n, m in model.named_children() if n != prefix and any(True for _ in m.parameters())]
    if len(head_names) != 1:
        raise NotImplementedError(
            f"linear_probe needs a model whose head is one module; {type(model).__name__} has {head_names}"
        )
    head = getattr(model, head_names[0])
    x_train = _features(model, tokenizer, data.train, head, max_length, device)
    x_eval = _features(model, tokenizer, data.eval, head, max_length, device)
    y_train = torch.tensor(data.train.labels)
    # standardise the frozen features (train statistics): the probe's optimum does not change, but
    # features that differ only slightly (a small or randomly initialised body) become learnable
    mean, std = x_train.mean(0, keepdim=True), x_train.std(0, keepdim=True) + 1e-6
    x_train, x_eval = (x_train - mean) / std, (x_eval - mean) / std
    head.train()
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(x_train.to(device)), y_train.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        pred = head(x_eval.to(device)).argmax(-1).cpu().numpy()
    return classification_metrics(pred, np.array(data.eval.labels), len(data.label_names))
