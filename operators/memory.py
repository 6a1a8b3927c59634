"""How much accelerator memory one expert's fine-tune takes: an estimate from the checkpoint's header and the
fine-tune settings, read before anything runs (no weights are loaded).

Per worker, in bytes (P parameters, T of them trained, b rows of s tokens on this worker, hidden size h,
L layers, V outputs):

- weights: 4P (fp32; bf16 autocast computes in bf16 but keeps fp32 weights), over N workers with FSDP;
- gradients and AdamW's two moments: 4T + 8T (over N with FSDP); DDP's gradient buckets another 4T;
- activations kept for the backward: c · b·s·h·L, with c = 46 bytes for a full fine-tune and 64 for LoRA
  (peft keeps each adapted input, dropout masks and the adapters' outputs besides), or 8 + c/L with
  gradient checkpointing (each layer's input, and one layer at a time recomputed);
- logits: 6 · b·s·V (bf16 logits and their fp32 softmax for the loss).

The activation constants are fitted to what ``benchmarks/gpu_expert_scale.py`` measured on an H200 (a 0.84B
Llama, batch 16 × 256 tokens, bf16 autocast: 18.95 GiB full, 12.02 GiB LoRA r 16 on every projection, 5.40 GiB
LoRA with checkpointing), which the estimate gives as 18.9, 11.9 and 5.4 GiB. It is an estimate for refusing a
GPU share that clearly cannot hold an expert, not a guarantee: other shapes (wider MLPs, more heads, attention
without a fused kernel) move it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from operators.tensor_io import TensorReader

GIB = 1024**3
CUDA_CONTEXT_BYTES = int(0.5 * GIB)  # each process on a GPU holds its own CUDA context, outside PyTorch's count
ACTIVATION_BYTES = {"full": 46.0, "lora": 64.0}  # per token, hidden unit and layer (fitted, see above)


@dataclass
class MemoryEstimate:
    """Bytes one worker needs, by what holds them."""

    parts: dict[str, float] = field(default_factory=dict)
    parameters: int = 0
    trained: int = 0

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        """Each part in GiB, e.g. ``weights 0.50, gradients + AdamW 0.03, activations 0.40, logits 0.11``."""
        return ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.parts.items())


def _config(base: Path) -> dict[str, Any]:
    return json.loads((base / "config.json").read_text())


def _first(cfg: dict[str, Any], *names: str, default: int = 0) -> int:
    for n in names:
        if isinstance(cfg.get(n), int):
            return cfg[n]
    return default


def lora_parameters(reader: TensorReader, targets: list[str], r: int) -> int:
    """r·(in + out) for every 2-D weight of a module whose name ends with one of ``targets``."""
    pattern = re.compile(r"(^|\.)(" + "|".join(re.escape(t) for t in targets) + r")\.weight$")
    total = 0
    for key in reader.keys():
        shape = reader.shape(key)
        if len(shape) == 2 and pattern.search(key):
            total += r * (shape[0] + shape[1])
    return total


def estimate_expert_memory(base: str | Path, settings: Any, *, outputs: int | None = None, workers: int = 1,
                           strategy: str = "ddp") -> MemoryEstimate:
    """The memory one worker of an expert's fine-tune takes (``settings``: ``FinetuneSpec``; ``outputs``: the
    head's size for classification, default the vocabulary: a causal LM's logits)."""
    base = Path(base)
    cfg = _config(base)
    reader = TensorReader(base)
    try:
        params = sum(reader.numel(k) for k in reader.keys())
        lora = settings.mode == "lora"
        if lora:
            from operators.checkpoint import default_lora_targets

            targets = settings.lora.target_modules or default_lora_targets(cfg.get("model_type", ""))
            trained = lora_parameters(reader, targets, settings.lora.r)
        else:
            trained = params
    finally:
        reader.close()
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model", "dim")
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    vocab = outputs if outputs is not None else _first(cfg, "vocab_size")
    rows = settings.batch_size / workers
    tokens = rows * settings.max_length
    shard = workers if strategy == "fsdp" else 1
    per_token = ACTIVATION_BYTES["lora" if lora else "full"]
    if settings.gradient_checkpointing:
        per_token = 8.0 + per_token / max(1, layers)
    parts = {
        "weights": 4.0 * params / shard,
        "gradients + AdamW": 12.0 * trained / shard + (4.0 * trained if workers > 1 and strategy == "ddp" else 0.0),
        "activations": per_token * tokens * hidden * layers,
        "logits": 6.0 * tokens * vocab,
    }
    return MemoryEstimate(parts, params, trained)
