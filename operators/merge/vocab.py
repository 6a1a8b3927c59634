"""Merging models whose vocabularies differ: one output tokenizer, and every model's token-indexed tensors
(input embeddings, output head) laid out in its vocabulary before the merge, as mergekit 0.1.5 does.

The output tokenizer (``tokenizer: {source: …}``, mergekit's ``tokenizer_source``):

* ``base``: the base model's;
* ``union``: the base's, with every token of the other models it lacks added (in the config's order of the
  models; mergekit adds them in the order of a set, which is not fixed when several models bring new tokens);
* ``model:NAME``: that expert's.

Each model's row of each output token is its own where it has the token (and its row lies within its
``vocab_size``). Where it lacks it, the row comes from the models that have it (mergekit's rule): the one
model that has it; the base's, where the base has it; else the mean of those that have it (a token none
has gets zeros). So a token only one expert brings keeps that expert's row exactly (its task vector there is
zero), whatever the merge method. With ``pad_to_multiple_of``, rows past the vocabulary are the mean of a
model's rows. Token-indexed tensors are the 2-D floating-point tensors whose first dimension is the model's
``vocab_size`` and whose name marks an embedding or head (``embed_tokens``, ``lm_head``, ``wte``, …).

A model without a tokenizer of its own is read as having the base's (as mergekit does). The aligned tensors
are held in memory (one per model and token-indexed tensor).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from operators.errors import MergeError

VOCAB_MARKERS = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings", "output.weight")
BASE = "__base__"


def vocab_size(model: Path) -> int:
    if not (model / "config.json").is_file():
        raise MergeError(f"{model}: no config.json; merging vocabularies needs full checkpoints (a LoRA adapter "
                         "has its base's vocabulary: leave tokenizer out)")
    cfg = json.loads((model / "config.json").read_text())
    size = cfg.get("vocab_size", (cfg.get("text_config") or {}).get("vocab_size"))
    if not isinstance(size, int):
        raise MergeError(f"{model}/config.json: no vocab_size; merging vocabularies needs it")
    return size


def _tokenizer(model: Path, fallback: Any) -> Any:
    from transformers import AutoTokenizer

    if not any((model / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return fallback
    return AutoTokenizer.from_pretrained(str(model))


def union_tokenizer(base_tok: Any, others: list[Any]) -> Any:
    """The base's tokenizer with every other tokenizer's tokens it lacks added (mergekit's union)."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:  # a copy: the base's tokenizer is not changed
        base_tok.save_pretrained(tmp)
        out = AutoTokenizer.from_pretrained(tmp)
    have = set(out.get_vocab())
    added: dict[str, Any] = {}
    plain: dict[str, None] = {}  # in order of arrival (a dict: membership in constant time over large vocabularies)
    for tok in [base_tok, *others]:
        special = {info.content: info for info in tok.added_tokens_decoder.values()}
        vocab = tok.get_vocab()
        for t in sorted(vocab, key=vocab.get):
            if t in special:
                added.setdefault(t, special[t])
            elif t not in have:
                plain.setdefault(t)
    for t in plain:
        out.add_tokens(t)
    for t, info in added.items():
        if t not in out.get_vocab():
            out.add_tokens(info)
    return out


@dataclass
class VocabPlan:
    """The output tokenizer and, per model (``__base__`` and each expert), each output token's row in it."""

    source: str
    tokenizer: Any
    size: int  # output rows (the vocabulary, padded)
    rows: dict[str, torch.Tensor]  # model → (size,) long: its row of each output token, −1 where it has none
    sizes: dict[str, int]  # model → its vocab_size

    def record(self) -> dict[str, Any]:
        return {"source": self.source, "vocab_size": self.size,
                "missing_tokens": {n: int((r < 0).sum()) for n, r in self.rows.items()}}


def plan_vocab(base: Path, experts: Mapping[str, Path], source: str,
               pad_to_multiple_of: int | None = None) -> VocabPlan:
    """The output tokenizer of ``source`` and every model's rows in it (see the module docstring)."""
    from transformers import AutoTokenizer

    base_tok = AutoTokenizer.from_pretrained(str(base))
    toks = {BASE: base_tok, **{n: _tokenizer(Path(p), base_tok) for n, p in experts.items()}}
    if source == "base":
        out = base_tok
    elif source == "union":
        out = union_tokenizer(base_tok, [toks[n] for n in experts])
    elif source.startswith("model:") and source[6:] in experts:
        out = toks[source[6:]]
    else:
        raise MergeError(f"tokenizer.source: {source!r} is not union, base or model:NAME of an expert "
                         f"({', '.join(f'model:{n}' for n in experts)})")
    vocab = out.get_vocab()
    size = len(vocab)
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size += pad_to_multiple_of - size % pad_to_multiple_of
    sizes = {BASE: vocab_size(base), **{n: vocab_size(Path(p)) for n, p in experts.items()}}
    rows = {}
    for n, tok in toks.items():
        own = tok.get_vocab()
        r = torch.full((size,), -1, dtype=torch.long)
        for t, i in vocab.items():
            j = own.get(t)
            if j is not None and j < sizes[n]:
                r[i] = j
        rows[n] = r
    return VocabPlan(source, out, size, rows, sizes)


def token_indexed(key: str, shape: tuple[int, ...], dtype: torch.dtype, size: int) -> bool:
    return dtype.is_floating_point and len(shape) == 2 and shape[0] == size and any(m in key for m in VOCAB_MARKERS)


def align(plan: VocabPlan, key: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every model's ``key`` (model → its tensor, rows in its own vocabulary) in the output vocabulary."""
    n_vocab = len(plan.tokenizer.get_vocab())
    names = list(tensors)
    present = torch.stack([plan.rows[n][:n_vocab] >= 0 for n in names])  # (models, tokens)
    count = present.sum(0)
    width = next(iter(tensors.values())).shape[1]
    dtype = next(iter(tensors.values())).dtype
    default = torch.zeros((n_vocab, width), dtype=torch.float32)
    # the mean of the models that have the token; the base's where it has it; the only one that has it
    for j, n in enumerate(names):
        has = present[j]
        default[has] += tensors[n].float()[plan.rows[n][:n_vocab][has]]
    default /= count.clamp(min=1).unsqueeze(1)
    if BASE in tensors:
        b = present[names.index(BASE)] & (count > 1)
        default[b] = tensors[BASE].float()[plan.rows[BASE][:n_vocab][b]]
    out = {}
    for j, n in enumerate(names):
        has = present[j]
        t = default.clone()
        t[has] = tensors[n].float()[plan.rows[n][:n_vocab][has]]
        full = torch.empty((plan.size, width), dtype=torch.float32)
        full[:n_vocab] = t
        if plan.size > n_vocab:
            full[n_vocab:] = t.mean(0)
        out[n] = full.to(dtype)
    return out


class AlignedReader:
    """A reader whose token-indexed tensors are in the output vocabulary (computed up front), the rest its own."""

    def __init__(self, reader: Any, aligned: Mapping[str, torch.Tensor]):
        self._r, self._a = reader, dict(aligned)

    def keys(self) -> list[str]:
        return self._r.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._r

    def dtype(self, key: str) -> torch.dtype:
        return self._r.dtype(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._a[key].shape) if key in self._a else self._r.shape(key)

    def numel(self, key: str) -> int:
        return self._a[key].numel() if key in self._a else self._r.numel(key)

    def nbytes(self, key: str) -> int:
        return self._a[key].numel() * self._a[key].element_size() if key in self._a else self._r.nbytes(key)

    def get(self, key: str) -> torch.Tensor:
        return self._a[key].clone() if key in self._a else self._r.get(key)

    def get_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        return self._a[key].reshape(-1)[start:stop].clone() if key in self._a else self._r.get_flat(key, start, stop)

    @property
    def targets(self) -> Any:
        return self._r.targets

    def close(self) -> None:
        self._r.close()


def aligned_readers(plan: VocabPlan, readers: Mapping[str, Any]) -> dict[str, Any]:
    """``readers`` (``__base__`` and each expert) with their token-indexed tensors in the output vocabulary."""
    keys = {n: [k for k in r.keys() if token_indexed(k, r.shape(k), r.dtype(k), plan.sizes[n])]
            for n, r in readers.items()}
    names = list(readers)
    ref = keys[BASE]
    for n in names:
        if sorted(keys[n]) != sorted(ref):
            raise MergeError(f"expert {n!r}: its token-indexed tensors {sorted(keys[n])} are not the base's "
                             f"{sorted(ref)}; vocabularies can be merged only between models of one layout")
    aligned: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    for key in ref:
        for n, t in align(plan, key, {n: readers[n].get(key) for n in names}).items():
            aligned[n][key] = t
    return {n: AlignedReader(readers[n], aligned[n]) for n in names}


__all__ = ["AlignedReader", "VocabPlan", "align", "aligned_readers", "plan_vocab", "union_tokenizer"]
