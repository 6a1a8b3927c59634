"""mergeflow checkpoints held in memory: what resident workers train and a round merges without the store.

:class:`StateCheckpoint` (a full checkpoint: body and task heads, or a whole causal LM) and
:class:`AdapterCheckpoint` (a LoRA expert: its adapter and heads), and how they travel through Ray's
object store (as numpy arrays).
``StateCheckpoint.write`` and ``StateCheckpoint.read`` convert to and from the on-disk checkpoint
(``operators.checkpoint_files``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from operators.checkpoint_files import (
    HEAD_WEIGHTS,
    HEADS_DIR,
    copy_tokenizer,
    head_names,
    head_state_dict,
    is_causal_lm_checkpoint,
    write_provenance,
)
from operators.tensor_io import CheckpointError


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
