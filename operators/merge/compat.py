"""Checks made before a merge writes anything: the base and every expert have one architecture and the
same tensors (names, shapes, dtypes), on disk or in memory, and the LoRA arguments make sense."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from operators.errors import MergeError
from operators.lora import LoraAdapter, check_same_task_type
from operators.tensor_io import TensorReader

# config.json keys that do not change the architecture
_CONFIG_NOISE = {"_name_or_path", "transformers_version", "architectures", "id2label", "label2id",
                 "num_labels", "problem_type", "torch_dtype", "dtype", "finetuning_task"}


def _arch(config_path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise MergeError(f"{config_path.parent}: no config.json; is this a Hugging Face checkpoint?") from None
    except json.JSONDecodeError as exc:
        raise MergeError(f"{config_path}: not valid JSON ({exc}); re-save the checkpoint's config") from None
    return {k: v for k, v in cfg.items() if k not in _CONFIG_NOISE}


def check_compatible(base: Path, experts: Mapping[str, Path], readers: Mapping[str, TensorReader],
                     config_dirs: Mapping[str, Path] | None = None, ignore: frozenset[str] = frozenset()) -> None:
    """Raise :class:`MergeError` naming the first difference between the base and an expert.

    ``config_dirs`` gives, per expert, the directory whose ``config.json`` describes it (a LoRA
    expert's is its base's; default: the expert's own directory); ``ignore``: config keys allowed to differ
    (``vocab_size`` where vocabularies are merged).
    """
    base_arch = _arch(base / "config.json")
    ref = readers["__base__"]
    ref_keys = set(ref.keys())
    for name, path in experts.items():
        arch = _arch((config_dirs or {}).get(name, path) / "config.json")
        # transformers versions add or drop default keys when saving; compare what both declare
        # (tensor names, shapes and dtypes are compared one by one below)
        diff = sorted(k for k in set(base_arch) & set(arch) if base_arch[k] != arch[k] and k not in ignore)
        if base_arch.get("model_type") != arch.get("model_type"):
            diff = ["model_type", *diff]
        if diff:
            k = diff[0]
            raise MergeError(
                f"expert {name!r} ({path}) has a different architecture from the base: config.json "
                f"{k}={arch.get(k)!r} vs base {base_arch.get(k)!r} ({len(diff)} keys differ). "
                "Experts must be fine-tuned from the same base model."
            )
        keys = set(readers[name].keys())
        # integer buffers (e.g. position_ids) are not weights; some transformers versions stop
        # saving them, so an expert may lack one its base has: the base's copy is used
        missing = sorted(k for k in ref_keys - keys if ref.dtype(k).is_floating_point)
        extra = sorted(k for k in keys - ref_keys if readers[name].dtype(k).is_floating_point)
        if missing or extra:
            raise MergeError(
                f"expert {name!r} ({path}) does not have the base's tensors: "
                f"missing {missing[:3]}{'...' if len(missing) > 3 else ''} ({len(missing)}), "
                f"extra {extra[:3]}{'...' if len(extra) > 3 else ''} ({len(extra)}). "
                "Experts must share the base's architecture and parameter names."
            )
        for key in sorted(ref_keys & keys):
            if readers[name].shape(key) != ref.shape(key):
                raise MergeError(
                    f"expert {name!r}: tensor {key!r} has shape {list(readers[name].shape(key))}, "
                    f"base has {list(ref.shape(key))}"
                )
            if readers[name].dtype(key) != ref.dtype(key):
                raise MergeError(
                    f"expert {name!r}: tensor {key!r} has dtype {readers[name].dtype(key)}, base has "
                    f"{ref.dtype(key)}. Convert the checkpoints to one dtype first."
                )


def _check_states(readers: Mapping[str, Any], names: list[str], keys: list[str]) -> None:
    """The checks :func:`check_compatible` makes of files, on tensors held in memory."""
    ref = readers["__base__"]
    for n in names:
        missing = sorted(k for k in keys if k not in readers[n] and ref.dtype(k).is_floating_point)
        bad = next((k for k in keys if k in readers[n] and (readers[n].shape(k), readers[n].dtype(k))
                    != (ref.shape(k), ref.dtype(k))), None)
        if missing or bad or set(readers[n].keys()) - set(keys):
            raise MergeError(f"expert {n!r} does not have the base's tensors (missing {missing[:3]}, first mismatch "
                             f"{bad!r}); experts must be fine-tuned from the same base model")


def _check_lora_args(base: Path, names: list[str], adapters: Mapping[str, LoraAdapter],
                     adapter_bases: Mapping[str, str | Path] | None, lora_mode: str, adapter_rank: int | None,
                     factorization: str, out_dtype: torch.dtype | None) -> dict[str, Path]:
    """Validate the LoRA arguments; return each adapter expert's base checkpoint."""
    if lora_mode not in ("exact", "adapter"):
        raise MergeError(f"lora_mode: {lora_mode!r} is not a LoRA merge mode; use 'exact' (a full checkpoint) or "
                         "'adapter' (one peft adapter)")
    if factorization not in ("svd", "concat"):
        raise MergeError(f"adapter_factorization: {factorization!r} is not known; use 'svd' or 'concat'")
    if adapter_rank is not None and (isinstance(adapter_rank, bool) or not isinstance(adapter_rank, int)
                                     or adapter_rank < 1):
        raise MergeError(f"adapter_rank: {adapter_rank!r} must be a positive integer (or left out: the sum of the "
                         "experts' ranks)")
    if adapter_rank is not None and (lora_mode != "adapter" or factorization != "svd"):
        raise MergeError(f"adapter_rank: {adapter_rank} applies to lora_mode 'adapter' with svd only (concat's rank is "
                         "the sum of the experts' ranks; exact mode writes full weights); leave it out")
    unknown = sorted(set(adapter_bases or {}) - set(adapters))
    if unknown:
        what = "is not an expert" if unknown[0] not in names else "is not a LoRA adapter directory"
        raise MergeError(f"adapter_bases: {unknown[0]!r} {what}; give bases for LoRA experts only "
                         f"(adapters: {', '.join(sorted(adapters)) or 'none'})")
    if lora_mode == "adapter":
        full = [n for n in names if n not in adapters]
        if full:
            raise MergeError(f"lora_mode 'adapter': expert {full[0]!r} is a full checkpoint, not a LoRA adapter; "
                             "adapter mode needs every expert to be an adapter (use lora_mode: exact)")
        if out_dtype is not None:
            raise MergeError(f"out_dtype {out_dtype}: applies to full checkpoints; an adapter-mode output keeps the "
                             "adapters' dtype (leave dtype out, or use lora_mode: exact)")
    if adapters:
        check_same_task_type(dict(adapters))
    return {n: Path((adapter_bases or {}).get(n, base)) for n in adapters}
