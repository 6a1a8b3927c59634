"""Statistics that data-driven merges need, computed beside each expert (stored by
:mod:`operators.merge.statistics`, with checksums, where the methods read them).

- ``gram`` (RegMean, Jin et al. 2023): for every ``nn.Linear`` of the body, the Gram matrix of its
  inputs ``G = Σ_x Σ_tokens x xᵀ / N`` over ``N`` training examples of the expert's task (padding
  tokens left out; divided by the number of examples, as FusionBench does).
- ``fisher`` (Fisher merging, Matena & Raffel 2022): the diagonal Fisher of every body parameter,
  ``F = (1/N) Σ_x (∇_θ log p(y|x))²`` with ``y`` drawn from the expert's own prediction
  ``p(·|x)`` (seeded): an unbiased one-sample estimate of ``E_x E_{y~p(y|x)}[(∇ log p)²]``. The
  per-example gradients come from one batched backward pass (each layer's per-example gradient from
  what it read and the gradient of what it wrote), or one backward pass per example for bodies with
  other layers; both give the same numbers. Only inputs are used, never labels.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from operators.data import TaskData
from operators.merge.statistics import (
    DEFAULT_EXAMPLES,
    KINDS,
    StatisticsError,
    StatisticsKind,
    StatisticsRecord,
    write_statistics,
)


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
    return write_statistics(out_dir, kind, data.name, stats, examples=len(texts), seed=seed,
                            seconds=time.perf_counter() - start, expert=expert)


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


def _fisher(model, body, tokenizer, texts, max_length, seed, device, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """The diagonal Fisher: batched per-example gradients when every body parameter allows it, else one
    backward pass per example (:func:`_fisher_per_example`). Both draw the same labels (seeded, in text order)."""
    try:
        return _fisher_batched(model, body, tokenizer, texts, max_length, seed, device, batch_size)
    except _NotBatchable:
        return _fisher_per_example(model, body, tokenizer, texts, max_length, seed, device)


class _NotBatchable(Exception):
    """A body whose per-example gradients the batched Fisher cannot take from its layers' inputs and outputs."""


_BATCHED_LAYERS = (torch.nn.Linear, torch.nn.LayerNorm, torch.nn.Embedding)
_PER_EXAMPLE_ELEMENTS = 1 << 25  # per-example weight gradients held at once (128 MiB in fp32)


def _fisher_batched(model, body, tokenizer, texts, max_length, seed, device, batch_size) -> dict[str, torch.Tensor]:
    """Per-example squared gradients of a batch from one backward pass (the per-sample gradient trick).

    A parameter's gradient for one example is a function of what its layer read and the gradient of
    what it wrote, for that example alone: ``Σ_t g_t a_tᵀ`` for a linear layer's weight, ``Σ_t g_t``
    for a bias, ``Σ_t g_t ⊙ x̂_t`` for a layer norm's weight, the rows of the tokens it looked up for
    an embedding. So a batch's forward and one backward of the summed log-likelihoods (examples do
    not interact: attention is masked to each example's own tokens) give every example's gradient;
    squared and summed, the same Fisher as one backward pass per example, several times faster on
    CPU. Bodies with other parameters, or a layer used twice in one forward, take the per-example path.
    """
    covered: set[int] = set()  # the parameters the supported layers own
    layers: list[tuple[str, torch.nn.Module]] = []
    for mname, module in body.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.is_floating_point()]
        if not own:
            continue
        if not isinstance(module, _BATCHED_LAYERS) or any(n not in ("weight", "bias") for n, _ in own) or (
                isinstance(module, torch.nn.LayerNorm) and len(module.normalized_shape) != 1):
            raise _NotBatchable(mname)
        layers.append((mname, module))
        covered |= {id(p) for _, p in own}
    params = [(n, p) for n, p in body.named_parameters() if p.is_floating_point()]
    if any(id(p) not in covered for _, p in params):
        raise _NotBatchable("a parameter outside the supported layers")
    for _, p in params:
        p.requires_grad_(True)
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
    calls: list[tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor]] = []
    batch = [0]

    def hook(mname):
        def fn(module, args, out):
            x = args[0]
            if out.shape[0] == 1 and batch[0] > 1:  # e.g. position embeddings broadcast over the batch
                out, x = out.expand(batch[0], *out.shape[1:]), x.expand(batch[0], *x.shape[1:])
            calls.append((mname, module, x.detach(), out))
            return out
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in layers]
    g = torch.Generator().manual_seed(seed)
    try:
        for i in range(0, len(texts), batch_size):
            calls.clear()
            chunk = texts[i:i + batch_size]
            batch[0] = len(chunk)
            enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
            with torch.enable_grad():
                logp = torch.log_softmax(model(**enc).logits.float(), dim=-1)
            probs = logp.detach().exp().cpu()
            ys = [int(torch.multinomial(probs[b], 1, generator=g)) for b in range(len(chunk))]  # as the loop draws
            if len({m for m, *_ in calls}) != len(calls) or any(
                    out.shape[0] != len(chunk) or (not isinstance(mod, torch.nn.Embedding) and out.dim() not in (2, 3))
                    for _, mod, _, out in calls):
                raise _NotBatchable("a layer called twice, or an output that is not (batch, [tokens,] features)")
            picked = logp[torch.arange(len(chunk)), torch.tensor(ys, device=logp.device)].sum()
            # a parameter read without calling its layer (e.g. a weight used as a tensor elsewhere) has a gradient
            # the hooks cannot see: checked on the first batch, and then the body takes the per-example path
            unseen = [p for name, m in layers if i == 0 and name not in {c[0] for c in calls}
                      for p in m.parameters(recurse=False)]
            grads = torch.autograd.grad(picked, [out for *_, out in calls] + unseen, allow_unused=True)
            if any(gr is not None for gr in grads[len(calls):]):
                raise _NotBatchable("a parameter with a gradient outside its layer's call")
            grads = grads[:len(calls)]
            mask = enc["attention_mask"].to(torch.float32)
            for (mname, module, x, _), gout in zip(calls, grads, strict=True):
                if gout is not None:
                    _accumulate(fisher, mname, module, x, gout.float(), mask)
    finally:
        for h in handles:
            h.remove()
    # a sum of squares; the token-pair product adds cross terms, whose rounding can dip below an exact 0
    return {n: (f / len(texts)).clamp_min_(0.0) for n, f in fisher.items()}


def _accumulate(fisher: dict[str, torch.Tensor], mname: str, module: torch.nn.Module, x: torch.Tensor,
                gout: torch.Tensor, mask: torch.Tensor) -> None:
    """Add the squared per-example gradients of ``module``'s parameters, from its input ``x`` and ``gout``."""
    def key(n: str) -> str:
        return f"{mname}.{n}" if mname else n

    if gout.dim() == 3 and gout.shape[:2] == mask.shape:  # padding positions carry no gradient
        gout = gout * mask[..., None]
    if isinstance(module, torch.nn.Embedding):
        ids = x if x.dim() == 2 else x[:, None]
        rows_g = gout if gout.dim() == 3 else gout[:, None]
        for b in range(ids.shape[0]):
            _add_squared_rows(fisher[key("weight")], ids[b], rows_g[b])
        return
    a = x.float()
    if isinstance(module, torch.nn.LayerNorm):
        mean = a.mean(-1, keepdim=True)
        a = (a - mean) / torch.sqrt(a.var(-1, keepdim=True, unbiased=False) + module.eps)
        per_w = (gout * a).flatten(1, -2).sum(1) if gout.dim() == 3 else gout * a
        if module.weight is not None:
            fisher[key("weight")].add_((per_w * per_w).sum(0))
    else:  # Linear: one example's weight gradient is Σ_t g_t a_tᵀ
        w = fisher[key("weight")]
        g3, a3 = (gout, a) if gout.dim() == 3 else (gout[:, None], a[:, None])
        tokens = g3.shape[1]
        if tokens * tokens * (w.shape[0] + w.shape[1]) <= w.numel():
            # short inputs: (Σ_t g_t a_tᵀ)² = Σ_{t,s} (g_t ⊙ g_s)(a_t ⊙ a_s)ᵀ, one matrix product over every
            # example's token pairs instead of a (batch × out × in) tensor of per-example gradients
            # (padding positions have g = 0, so their pairs add nothing)
            u = (g3[:, :, None, :] * g3[:, None, :, :]).reshape(-1, w.shape[0])
            v = (a3[:, :, None, :] * a3[:, None, :, :]).reshape(-1, w.shape[1])
            w.addmm_(u.T, v)
        else:
            step = max(1, _PER_EXAMPLE_ELEMENTS // w.numel())  # examples at a time: bounded memory on large layers
            for b in range(0, g3.shape[0], step):
                pe = torch.bmm(g3[b:b + step].transpose(1, 2), a3[b:b + step])
                w.add_((pe * pe).sum(0))
    if module.bias is not None:
        per_b = gout.sum(1) if gout.dim() == 3 else gout
        fisher[key("bias")].add_((per_b * per_b).sum(0))


def _fisher_per_example(model, body, tokenizer, texts, max_length, seed, device) -> dict[str, torch.Tensor]:
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
                _add_squared_rows(fisher[word_key], enc["input_ids"][0], grads[-1][0].float())
    finally:
        if hook is not None:
            hook.remove()
    return {n: f / len(texts) for n, f in fisher.items()}


def _add_squared_rows(fisher: torch.Tensor, ids: torch.Tensor, grads: torch.Tensor) -> None:
    """One example's embedding-table gradient, squared, into ``fisher``: ``grads`` (tokens × dim) is the
    gradient of what the table returned for ``ids``; a token seen twice has its gradients added first."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    rows = torch.zeros(len(uniq), grads.shape[-1], dtype=torch.float32, device=grads.device)
    rows.index_add_(0, inverse, grads)
    fisher.index_add_(0, uniq, rows * rows)


def _word_embeddings(body) -> torch.nn.Embedding | None:
    emb = body.get_input_embeddings() if hasattr(body, "get_input_embeddings") else None
    return emb if isinstance(emb, torch.nn.Embedding) and not emb.sparse else None


__all__ = ["compute_statistics", "sample_rows"]
