"""Causal-LM batches: the tokenizer with a pad token, every row's token ids and loss labels (prompt masked),
right-padded batches, and the loss over the learned tokens (logits only where a token is learned)."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from operators.data import Split

IGNORE_INDEX = -100  # label value the loss skips (prompt and padding positions)


def lm_tokenizer(path: str | Path):
    """The tokenizer of a causal LM, with a pad token (its EOS when it has none) for batching."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_lm(tokenizer, split: Split, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Token ids and loss labels of every row: prompt tokens masked, response tokens + EOS learned.

    Without prompts, every token is learned. Rows longer than ``max_length`` are cut from the right.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows = []
    prompts = tokenizer(split.prompts)["input_ids"] if split.prompts is not None else None
    texts = tokenizer(split.texts, add_special_tokens=prompts is None)["input_ids"]
    for i, text_ids in enumerate(texts):
        prompt_ids = prompts[i] if prompts is not None else []
        ids = (prompt_ids + text_ids + eos)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + text_ids + eos)[:max_length]
        rows.append((ids, labels))
    return rows


def collate_lm(rows: list[tuple[list[int], list[int]]], pad_id: int, device: str) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input ids, attention mask, labels (padding is ``IGNORE_INDEX``)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
        mask[i, :len(x)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def keeps_logits(model) -> bool:
    """Whether the causal LM's forward can compute its logits at chosen positions only (``logits_to_keep``)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def learned_tokens(labels: list[int]) -> int:
    """How many of a row's tokens the loss learns (position t predicts token t + 1: the first never is)."""
    return sum(1 for y in labels[1:] if y != IGNORE_INDEX)


def lm_loss(model, batch: dict[str, torch.Tensor], *, keep_logits: bool, total: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the learned tokens (labels not ``IGNORE_INDEX``).

    With ``keep_logits``, the vocabulary projection (for a small LM the largest matmul of a step: SmolLM2's
    is 576 x 49,152) and the softmax run only at the positions that predict a learned token in some row of
    the batch (``logits_to_keep``), not at every prompt and padding position. The same mean as
    transformers' loss over full logits, to float rounding; without it, that loss.

    ``total``: divide the summed token losses by this count instead of the batch's own (a worker's share
    of a batch split over several: the whole batch's learned tokens, so the shares add up to its mean).
    """
    if not keep_logits and total is None:
        return model(**batch).loss
    targets = batch["labels"][:, 1:]  # position t predicts token t + 1
    if keep_logits:
        positions = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=positions).logits
        targets = targets[:, positions]
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                               ignore_index=IGNORE_INDEX, reduction="mean" if total is None else "sum")
    return losses if total is None else losses / total
