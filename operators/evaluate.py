"""Evaluate a body + task head on a task's held-out split; and the linear-probe baseline.

Metrics: accuracy and macro-F1 on the eval split. Normalised accuracy (merged / expert) is worked
out by the pipeline, which knows both numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from operators.checkpoint import load_task_model, quiet_transformers
from operators.data import Split, TaskData


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


@torch.no_grad()
def predict(model, tokenizer, split: Split, *, batch_size: int = 128, max_length: int = 64, device: str = "cpu") -> np.ndarray:
    model.eval().to(device)
    out = []
    for i in range(0, len(split), batch_size):
        enc = tokenizer(split.texts[i:i + batch_size], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt").to(device)
        out.append(model(**enc).logits.argmax(-1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)


def evaluate(
    ckpt: str | Path,
    data: TaskData,
    *,
    head_from: str | Path | None = None,
    batch_size: int = 128,
    max_length: int = 64,
    device: str = "cpu",
) -> dict[str, float]:
    """Score ``ckpt``'s body with ``data.name``'s head on the eval split.

    Args:
        ckpt: The checkpoint whose body is scored.
        data: The task; its eval split is used.
        head_from: Take the head from this checkpoint instead (e.g. an expert's head on another body).

    Returns:
        ``{"accuracy", "macro_f1", "n"}``.
    """
    from transformers import AutoTokenizer

    quiet_transformers()
    model = load_task_model(ckpt, data.name, head_from=head_from)
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    pred = predict(model, tokenizer, data.eval, batch_size=batch_size, max_length=max_length, device=device)
    return classification_metrics(pred, np.array(data.eval.labels), len(data.label_names))


@torch.no_grad()
def _features(model, tokenizer, split: Split, head: torch.nn.Module, max_length: int, device: str) -> torch.Tensor:
    """The inputs the head module sees, for every example (captured with a forward pre-hook)."""
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().cpu()))
    try:
        predict(model, tokenizer, split, max_length=max_length, device=device)
    finally:
        hook.remove()
    return torch.cat(captured)


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
