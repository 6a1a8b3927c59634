"""The files of a mergeflow checkpoint directory, read and written without building a model.

Layout of a checkpoint directory::

    config.json                    the body's config (e.g. BertModel): AutoModel.from_pretrained(dir)
    model.safetensors              body weights (or model-0000i-of-0000n.safetensors + index)
    tokenizer.json, vocab.txt, ... tokenizer files, copied from the base
    heads/<task>/config.json       the task model's config (num_labels, id2label, architectures)
    heads/<task>/head.safetensors  the task head's weights (e.g. classifier.weight/bias)
    mergeflow.json                 provenance: what made it, from which parents, with which settings

A LoRA expert is a peft adapter directory (``adapter_config.json``, ``adapter_model.safetensors``) with
the same heads, tokenizer and provenance. Here: the file names, copying the tokenizer, reading and
writing task heads, telling what kind of checkpoint a directory is, and provenance.
``operators.checkpoint`` builds models from these files; ``operators.state`` holds a checkpoint in memory.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from operators.tensor_io import CheckpointError

PROVENANCE_FILE = "mergeflow.json"
HEADS_DIR = "heads"
HEAD_WEIGHTS = "head.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
    "merges.txt", "vocab.json", "tokenizer.model", "added_tokens.json", "spiece.model",
)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    src, dst = Path(src), Path(dst)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def head_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of a task model that are not part of its shared body (its head)."""
    prefix = model.base_model_prefix + "."
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if not k.startswith(prefix)}


def head_names(ckpt: str | Path) -> list[str]:
    heads = Path(ckpt) / HEADS_DIR
    if not heads.is_dir():
        return []
    return sorted(p.name for p in heads.iterdir() if (p / HEAD_WEIGHTS).is_file())


def save_head(model: torch.nn.Module, out_dir: str | Path, task: str) -> None:
    """Write one task's head (weights and task-model config) under ``heads/<task>/``."""
    d = Path(out_dir) / HEADS_DIR / task
    d.mkdir(parents=True, exist_ok=True)
    save_file(head_state_dict(model), str(d / HEAD_WEIGHTS), metadata={"format": "pt", "task": task})
    model.config.to_json_file(str(d / "config.json"))


def copy_head(src_ckpt: str | Path, dst_ckpt: str | Path, task: str) -> None:
    src = Path(src_ckpt) / HEADS_DIR / task
    if not (src / HEAD_WEIGHTS).is_file():
        raise CheckpointError(f"{src_ckpt}: has no head for task {task!r} (heads: {head_names(src_ckpt)})")
    dst = Path(dst_ckpt) / HEADS_DIR / task
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        shutil.copy2(f, dst / f.name)


def is_adapter_checkpoint(ckpt: str | Path) -> bool:
    """True for a peft adapter directory (a LoRA expert or an adapter-mode merge)."""
    return (Path(ckpt) / ADAPTER_CONFIG).is_file()


def is_causal_lm_checkpoint(ckpt: str | Path) -> bool:
    """True when the checkpoint's config names a ``*ForCausalLM`` / ``*LMHeadModel`` architecture."""
    try:
        cfg = json.loads((Path(ckpt) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in cfg.get("architectures") or [])


def is_causal_lm_adapter(ckpt: str | Path) -> bool:
    """True for a peft adapter of a causal LM (``task_type: CAUSAL_LM``)."""
    try:
        return json.loads((Path(ckpt) / ADAPTER_CONFIG).read_text()).get("task_type") == "CAUSAL_LM"
    except (OSError, json.JSONDecodeError):
        return False


def write_provenance(ckpt: str | Path, record: dict[str, Any]) -> None:
    """Write ``mergeflow.json``: how this checkpoint was made (kind, parents, settings, metrics, ids)."""
    from operators import __version__ as version

    full = {"mergeflow_version": version, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}
    (Path(ckpt) / PROVENANCE_FILE).write_text(json.dumps(full, indent=2, sort_keys=True, default=str))


def read_provenance(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt) / PROVENANCE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{ckpt}: no {PROVENANCE_FILE}; this is not a mergeflow checkpoint (or it was not finished). "
            "Re-run the step that makes it: `mergeflow run SPEC` resumes and re-creates missing steps."
        )
    return json.loads(path.read_text())
