"""What both merge-config formats share: the plan ``mergeflow merge`` runs, the error, and reading
model paths, dtypes and tokenizer settings."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from operators.merge.passthrough import LayerSlice

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class MergeConfigError(ValueError):
    """A merge config mergeflow cannot run, naming the key, the value and the fix."""


@dataclass
class MergePlan:
    """What ``merge_checkpoints`` needs, from either config format."""

    base: Path
    experts: dict[str, Path]
    method: str
    params: dict[str, Any]
    out_dtype: torch.dtype | None = None
    source_format: str = "mergeflow"
    notes: list[str] = field(default_factory=list)
    lora_mode: str = "exact"
    slices: list[LayerSlice] = field(default_factory=list)  # passthrough: the layer ranges stacked
    adapter_rank: int | None = None
    adapter_factorization: str = "svd"
    adapter_bases: dict[str, Path] = field(default_factory=dict)
    # parameters that vary by tensor (a mergekit config's gradients and filters): tensor name → parameters
    tensor_params: Callable[[str], dict[str, Any]] | None = None
    # models with different vocabularies: the output tokenizer (union | base | model:NAME) and its padding
    tokenizer_source: str | None = None
    pad_to_multiple_of: int | None = None


# How a model given as a URI (s3://…, gs://…) becomes a local directory: set by the caller (the CLI
# passes the checkpoint store's verified download); operators know nothing of stores.
_FETCH: ContextVar[Callable[[str], Path] | None] = ContextVar("mergeflow_merge_config_fetch", default=None)


def local_path(ref: Any, root: Path, where: str) -> Path:
    ref = str(ref)
    if "@" in ref:
        raise MergeConfigError(f"{where}: {ref!r} applies a LoRA (model@lora), mergekit's syntax, which mergeflow "
                               "refuses; give the adapter directory itself as an expert of a mergeflow merge config "
                               "(experts: {name: ADAPTER_DIR}; its base is `base`)")
    if "://" in ref:
        fetch = _FETCH.get()
        if fetch is None:
            raise MergeConfigError(f"{where}: {ref!r} is a URI; give a local checkpoint directory")
        try:
            return fetch(ref)
        except Exception as exc:  # a missing, incomplete or corrupt remote checkpoint: one line, with the fix
            raise MergeConfigError(f"{where}: {exc}") from None
    p = Path(ref).expanduser()
    p = p if p.is_absolute() else root / p
    if not p.exists():
        hint = " (a Hugging Face hub id? mergeflow reads local checkpoints only; download it first)" \
            if "/" in ref and not ref.startswith((".", "/")) else ""
        raise MergeConfigError(f"{where}: {ref!r} is not a local checkpoint directory{hint}")
    return p


def dtype_of(value: Any, where: str) -> torch.dtype | None:
    if value is None:
        return None
    if value not in DTYPES:
        raise MergeConfigError(f"{where}: {value!r} is not a supported dtype; use one of {', '.join(DTYPES)}")
    return DTYPES[value]


def tokenizer_setting(value: Any, where: str) -> tuple[str, int | None]:
    """A ``tokenizer: {source, pad_to_multiple_of}`` block (or a bare source) read as (source, padding)."""
    if isinstance(value, str):
        value = {"source": value}
    if not isinstance(value, dict):
        raise MergeConfigError(f"{where}: {{source: union | base | model:NAME, pad_to_multiple_of: N}} is needed "
                               f"(got {value!r})")
    unknown = sorted(set(value) - {"source", "pad_to_multiple_of"})
    if unknown:
        what = "per-token embedding sources are not supported by mergeflow" if unknown[0] == "tokens" \
            else "not a key of tokenizer (source, pad_to_multiple_of)"
        raise MergeConfigError(f"{where}.{unknown[0]}: {what}")
    pad = value.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise MergeConfigError(f"{where}.pad_to_multiple_of: a positive whole number is needed (got {pad!r})")
    return str(value.get("source", "union")), pad
