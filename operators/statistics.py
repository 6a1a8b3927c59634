"""Statistics that data-driven merges need, computed beside each expert and stored with checksums.

- ``gram`` (RegMean, Jin et al. 2023): for every ``nn.Linear`` of the body, the Gram matrix of its
  inputs ``G = Σ_x Σ_tokens x xᵀ / N`` over ``N`` training examples of the expert's task (padding
  tokens left out; divided by the number of examples, as FusionBench does).
- ``fisher`` (Fisher merging, Matena & Raffel 2022): the diagonal Fisher of every body parameter,
  ``F = (1/N) Σ_x (∇_θ log p(y|x))²`` with ``y`` drawn from the expert's own prediction
  ``p(·|x)`` (seeded): an unbiased one-sample estimate of ``E_x E_{y~p(y|x)}[(∇ log p)²]``, one
  backward pass per example. Only inputs are used, never labels.

A statistics directory holds ``<kind>.safetensors`` (tensors named like the body's parameters) and
``<kind>.json``: the kind, the number of examples and seed, the SHA-256 of the tensor file and of the
expert's weights it was computed on, and each tensor's shape. :func:`open_statistics` refuses a
directory whose file does not match its checksum, or that was computed on another expert (a
different weights hash), so a merge never silently uses stale statistics.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from operators.data import TaskData

StatisticsKind = Literal["gram", "fisher"]
KINDS: tuple[str, ...] = ("gram", "fisher")
# which statistics each data-driven merge method reads
METHOD_STATISTICS: dict[str, StatisticsKind] = {"regmean": "gram", "fisher": "fisher"}
DEFAULT_EXAMPLES = 256  # FusionBench's default for both Fisher merging and RegMean


class StatisticsError(ValueError):
    """Statistics that are missing, corrupt, or computed on another model."""


def weights_sha256(ckpt: str | Path) -> str:
    """SHA-256 over a checkpoint's safetensors files (sorted by name): identifies its weights."""
    h = hashlib.sha256()
    files = sorted(Path(ckpt).glob("*.safetensors"))
    if not files:
        raise StatisticsError(f"{ckpt}: no *.safetensors weights to fingerprint; is this a full checkpoint?")
    for f in files:
        h.update(f.name.encode())
        h.update(_file_sha256(f).encode())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class StatisticsRecord:
    """What :func:`compute_statistics` wrote (also in ``<kind>.json``)."""

    kind: str
    task: str
    examples: int
    seed: int
    seconds: float
    expert_sha256: str
    file_sha256: str
    l2_norm: float
    shapes: dict[str, list[int]]

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "task": self.task, "examples": self.examples, "seed": self.seed,
                "seconds": self.seconds, "expert_sha256": self.expert_sha256, "file_sha256": self.file_sha256,
                "l2_norm": self.l2_norm, "shapes": self.shapes}


def sample_rows(n_rows: int, examples: int, seed: int) -> list[int]:
    """``examples`` row indices (all rows when there are fewer), seeded and sorted."""
    if examples >= n_rows:
        return list(range(n_rows))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_rows, generator=g)[:examples].tolist())


def compute_statistics(expert: str | Path, data: TaskData, kind: StatisticsKind, out_dir: str | Path, *,
                       examples: int = DEFAULT_EXAMPLES, seed: int = 0, max_length: int = 64,
                       batch_size: int = 32, device: str = "cpu") -> StatisticsRecord:
    """Compute one expert's statistics on ``examples`` inputs of its task's train split.

    Args:
        expert: A full (not LoRA) classification expert checkpoint with a head for ``data.name``.
        data: The task; rows are drawn from its train split (labels are not used).
        kind: ``gram`` (RegMean) or ``fisher`` (Fisher merging).
        out_dir: Directory to write ``<kind>.safetensors`` and ``<kind>.json`` into.
        examples: How many inputs ``N`` (seeded sample; all rows when the split is smaller).
        seed: Seeds the sample and the labels drawn for the Fisher.

    Returns:
        The :class:`StatisticsRecord` written beside the tensors.
    """
    from transformers import AutoTokenizer

    from operators.checkpoint import load_task_model, quiet_transformers

    if kind not in KINDS:
        raise StatisticsError(f"statistics kind {kind!r} is not known; use one of {', '.join(KINDS)}")
    if data.is_lm:
        raise StatisticsError(f"tasks.{data.name}: {kind} statistics are computed for classification tasks only")
    quiet_transformers()
    start = time.perf_counter()
    model = load_task_model(expert, data.name).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(expert))
    rows = sample_rows(len(data.train), examples, seed)
    texts = [data.train.texts[i] for i in rows]
    if not texts:
        raise StatisticsError(f"tasks.{data.name}: no training rows to compute {kind} statistics on")
    body = model.base_model
    if kind == "gram":
        stats = _grams(model, body, tokenizer, texts, max_length, batch_size, device)
    else:
        stats = _fisher(model, body, tokenizer, texts, max_length, seed, device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.float().contiguous().cpu() for k, v in sorted(stats.items())}
    save_file(tensors, str(out / f"{kind}.safetensors"), metadata={"kind": kind, "task": data.name})
    l2 = float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors.values())))
    record = StatisticsRecord(kind=kind, task=data.name, examples=len(texts), seed=seed,
                              seconds=time.perf_counter() - start, expert_sha256=weights_sha256(expert),
                              file_sha256=_file_sha256(out / f"{kind}.safetensors"), l2_norm=l2,
                              shapes={k: list(v.shape) for k, v in tensors.items()})
    (out / f"{kind}.json").write_text(json.dumps(record.as_dict(), indent=2, sort_keys=True) + "\n")
    return record


def _grams(model, body, tokenizer, texts, max_length, batch_size, device) -> dict[str, torch.Tensor]:
    grams: dict[str, torch.Tensor] = {}
    mask_now: list[torch.Tensor] = []

    def hook(name):
        def fn(_module, inputs):
            x = inputs[0].detach()
            if x.dim() == 3:  # (batch, tokens, features): padding tokens are not inputs
                x = x[mask_now[0].bool()] if mask_now and x.shape[:2] == mask_now[0].shape else x.flatten(0, 1)
            x = x.reshape(-1, x.shape[-1]).double()
            g = x.T @ x
            grams[name] = grams[name] + g if name in grams else g
        return fn

    handles = [m.register_forward_pre_hook(hook(f"{name}.weight"))
               for name, m in body.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt").to(device)
                mask_now[:] = [enc["attention_mask"]]
                model(**enc)
    finally:
        for h in handles:
            h.remove()
    return {k: (g / len(texts)).float() for k, g in grams.items()}


def _fisher(model, body, tokenizer, texts, max_length, seed, device) -> dict[str, torch.Tensor]:
    params = [(n, p) for n, p in body.named_parameters() if p.is_floating_point()]
    for _, p in params:
        p.requires_grad_(True)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
    # the word embeddings' gradient is dense (vocabulary × hidden) but non-zero only in the rows of
    # the example's tokens: take it from the gradient of the embedding output, row by token
    word = _word_embeddings(body)
    word_key = next((n for n, p in params if word is not None and p is word.weight), None)
    dense = [(n, p) for n, p in params if n != word_key]
    captured: list[torch.Tensor] = []
    hook = word.register_forward_hook(lambda _m, _i, out: captured.append(out)) if word_key else None
    g = torch.Generator().manual_seed(seed)
    try:
        for text in texts:  # one backward per example: the Fisher needs per-example squared gradients
            captured.clear()
            enc = tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt").to(device)
            logp = torch.log_softmax(model(**enc).logits[0].float(), dim=-1)
            y = int(torch.multinomial(logp.detach().exp().cpu(), 1, generator=g))
            inputs = [p for _, p in dense] + captured[:1]
            grads = torch.autograd.grad(logp[y], inputs, allow_unused=True)
            for (n, _), gr in zip(dense, grads[:len(dense)], strict=True):
                if gr is not None:
                    fisher[n].addcmul_(gr, gr)
            if word_key and captured and grads[-1] is not None:
                ids = enc["input_ids"][0]
                uniq, inverse = torch.unique(ids, return_inverse=True)
                rows = torch.zeros(len(uniq), grads[-1].shape[-1], dtype=torch.float32, device=ids.device)
                rows.index_add_(0, inverse, grads[-1][0].float())  # a token seen twice: its gradients add
                fisher[word_key].index_add_(0, uniq, rows * rows)
    finally:
        if hook is not None:
            hook.remove()
    return {n: f / len(texts) for n, f in fisher.items()}


def _word_embeddings(body) -> torch.nn.Embedding | None:
    emb = body.get_input_embeddings() if hasattr(body, "get_input_embeddings") else None
    return emb if isinstance(emb, torch.nn.Embedding) and not emb.sparse else None


class Statistics:
    """One expert's stored statistics, verified, read tensor by tensor."""

    def __init__(self, directory: Path, record: dict[str, Any]):
        self.directory = directory
        self.record = record
        self.kind: str = record["kind"]
        self._file = safe_open(str(directory / f"{self.kind}.safetensors"), framework="pt")
        self._keys = set(self._file.keys())

    def get(self, key: str) -> torch.Tensor | None:
        """The statistic of tensor ``key`` (None when there is none, e.g. no Gram for a bias)."""
        return self._file.get_tensor(key).float() if key in self._keys else None

    def shape(self, key: str) -> list[int] | None:
        return self.record["shapes"].get(key)

    @property
    def l2_norm(self) -> float:
        return float(self.record["l2_norm"])


def open_statistics(directory: str | Path, kind: str, *, expert: str | Path | None = None,
                    expert_sha256: str | None = None, who: str = "") -> Statistics:
    """Open and verify a statistics directory.

    Args:
        directory: Where :func:`compute_statistics` wrote them.
        kind: The kind the caller needs (``gram`` or ``fisher``).
        expert: The expert checkpoint they must belong to (its weights are hashed and compared).
        expert_sha256: Instead of ``expert``, its known weights hash.
        who: The expert's name, for error messages.

    Raises:
        StatisticsError: missing files, a checksum mismatch, another kind, or another expert.
    """
    d = Path(directory)
    label = f"expert {who!r}: " if who else ""
    meta_path, tensor_path = d / f"{kind}.json", d / f"{kind}.safetensors"
    if not meta_path.is_file() or not tensor_path.is_file():
        raise StatisticsError(f"{label}no {kind} statistics in {d} ({meta_path.name} and {tensor_path.name} "
                              "expected); compute them with operators.statistics.compute_statistics or run the "
                              "workflow, which computes them beside each expert")
    record = json.loads(meta_path.read_text())
    if record.get("kind") != kind:
        raise StatisticsError(f"{label}{d} holds {record.get('kind')!r} statistics, the merge needs {kind!r}")
    actual = _file_sha256(tensor_path)
    if actual != record.get("file_sha256"):
        raise StatisticsError(f"{label}{tensor_path}: checksum {actual[:12]}… does not match the recorded "
                              f"{str(record.get('file_sha256'))[:12]}…; the file is corrupt: delete {d} to recompute")
    want = expert_sha256 or (weights_sha256(expert) if expert is not None else None)
    if want is not None and record.get("expert_sha256") != want:
        raise StatisticsError(f"{label}{d} was computed on other weights (hash {str(record.get('expert_sha256'))[:12]}…, "
                              f"expert has {want[:12]}…); recompute the statistics for this expert")
    return Statistics(d, record)


__all__ = ["DEFAULT_EXAMPLES", "KINDS", "METHOD_STATISTICS", "Statistics", "StatisticsError", "StatisticsRecord",
           "compute_statistics", "open_statistics", "sample_rows", "weights_sha256"]
