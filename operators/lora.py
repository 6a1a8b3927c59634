"""LoRA experts as full weights: θ_t = W + ΔW_t, with ΔW_t = B·A·scaling computed exactly, row block by row block.

A LoRA expert is a peft adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``,
written by ``PeftModel.save_pretrained``), optionally with mergeflow's ``heads/``, tokenizer files and
``mergeflow.json``. :class:`LoraDeltaReader` presents it to the merge engine exactly as a full
fine-tuned checkpoint would look (same tensor names, shapes and dtypes as its base), so every merge
method applies to LoRA experts unchanged: a module the adapter does not target has task vector 0,
which is what merging the fully fine-tuned weights gives.

peft's forward for a LoRA ``Linear`` adds ``scaling · B(A(x))``, i.e. ``ΔW = B @ A · scaling`` with
``A: (r, in)``, ``B: (out, r)`` and ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
``use_rslora``; ``rank_pattern`` / ``alpha_pattern`` override r and alpha per module, matched as
peft matches them). With ``fan_in_fan_out`` (GPT-2's ``Conv1D``, weights stored as ``(in, out)``)
the stored update is ``(B @ A)ᵀ · scaling``. This is the same formula as peft's ``get_delta_weight``,
in float32. Merging A and B separately (peft's non-SVD ``add_weighted_adapter`` combinations) is not
exact and is not done here.

Only safetensors are read (``adapter_model.bin`` is refused: pickle can run code). Adapter variants
whose update is not ``B @ A · scaling`` on a weight matrix (DoRA, LoRA biases, embedding or conv
LoRA, ``modules_to_save`` copies, ...) are refused by name.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from operators.checkpoint import default_lora_targets
from operators.errors import MergeError
from operators.tensor_io import INDEX_FILE, SINGLE_FILE, CheckpointError, TensorReader

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."
# ΔW is computed in tiles of about this many elements (the merge engine's row-block size)
DELTA_TILE_ELEMENTS = 1024 * 1024

# LoraConfig settings whose adapters are not "W + B·A·scaling on weight matrices": refused when set
_UNSUPPORTED_SETTINGS: dict[str, str] = {
    "use_dora": "DoRA (use_dora) rescales each column by a learned magnitude, so its update is not B·A·scaling; "
                "merge it into its base with peft's merge_and_unload() and give the full checkpoint",
    "lora_bias": "LoRA biases (lora_bias) also change a bias vector; train without lora_bias or merge the adapter "
                 "into its base with merge_and_unload() first",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not supported; target modules instead",
    "layer_replication": "layer_replication changes the architecture; merge the adapter into its base first",
    "trainable_token_indices": "trainable tokens change embedding rows; merge the adapter into its base first",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies its update only after the "
                               "invocation tokens, so it is not a weight update; merge full checkpoints instead",
    "use_qalora": "QA-LoRA (use_qalora) is not supported; merge the adapter into its base first",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported; merge the adapter into its base first",
    "arrow_config": "Arrow routing (arrow_config) is not a weight update; it cannot be merged",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported; merge the adapter into its base first",
    "kasa_config": "KaSA (kasa_config) is not supported; merge the adapter into its base first",
}


def is_adapter_dir(path: str | Path) -> bool:
    """Whether ``path`` is a peft adapter directory rather than a full checkpoint.

    True when it holds an adapter file (``adapter_config.json``, ``adapter_model.safetensors`` or
    ``adapter_model.bin``) and no full weights (``model.safetensors`` or a sharded index). An adapter
    directory with missing or bad pieces is still an adapter directory: :func:`read_adapter` says
    what is wrong with it.
    """
    p = Path(path)
    if not p.is_dir() or (p / SINGLE_FILE).is_file() or (p / INDEX_FILE).is_file():
        return False
    return any((p / f).is_file() for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_PICKLE))


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted linear module: ``ΔW = B @ A · scaling`` (transposed when ``fan_in_fan_out``)."""

    name: str  # the module's name in the model (peft's key without ``base_model.model.``)
    lora_A: Tensor  # (r, in), float32
    lora_B: Tensor  # (out, r), float32
    scaling: float
    fan_in_fan_out: bool

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])

    @property
    def delta_shape(self) -> tuple[int, int]:
        """The shape of ΔW as stored in the base tensor."""
        out_f, in_f = int(self.lora_B.shape[0]), int(self.lora_A.shape[1])
        return (in_f, out_f) if self.fan_in_fan_out else (out_f, in_f)


@dataclass(frozen=True)
class LoraAdapter:
    """A validated peft LoRA adapter, its modules keyed by module name."""

    directory: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]
    dtype: torch.dtype  # of the stored A and B

    @property
    def task_type(self) -> str | None:
        return self.config.get("task_type")

    @property
    def ranks(self) -> dict[str, int]:
        return {n: m.rank for n, m in self.modules.items()}


def delta_weight(lora_A: Tensor, lora_B: Tensor, scaling: float, fan_in_fan_out: bool = False,
                 rows: slice | None = None) -> Tensor:
    """The LoRA update ``B @ A · scaling`` in float32, as stored in the base weight.

    Args:
        lora_A: ``(r, in)``.
        lora_B: ``(out, r)``.
        scaling: ``lora_alpha / r`` (or ``/ sqrt(r)`` for rsLoRA).
        fan_in_fan_out: The base weight is stored ``(in, out)`` (GPT-2 ``Conv1D``): return the transpose.
        rows: Only these rows of the stored update (a row block of the base tensor).

    Returns:
        ``(out, in)`` (or ``(in, out)`` with ``fan_in_fan_out``), or the requested rows of it.
    """
    a, b = lora_A.float(), lora_B.float()
    if fan_in_fan_out:
        if rows is not None:
            a = a[:, rows]
        return (b @ a).T * scaling
    if rows is not None:
        b = b[rows]
    return (b @ a) * scaling


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's ``get_pattern_key``: the first pattern that matches the end of the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def lora_scaling(config: dict[str, Any], module: str, rank: int) -> float:
    """peft's scaling of one module: ``alpha / r`` or ``alpha / sqrt(r)`` (rsLoRA), with the per-module patterns.

    Args:
        config: The adapter's ``adapter_config.json``.
        module: The module's name in the model (e.g. ``model.layers.0.self_attn.q_proj``).
        rank: The rank the stored ``lora_A`` has (checked against ``r`` / ``rank_pattern``).

    Raises:
        CheckpointError: if the config's rank for the module is not the stored one.
    """
    r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    if int(r) != rank:
        raise CheckpointError(
            f"adapter_config.json: module {module!r} has r={r} by its r/rank_pattern, but its stored lora_A has "
            f"rank {rank}; the config does not belong to these weights. Save config and weights together."
        )
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


def read_adapter(path: str | Path) -> LoraAdapter:
    """Read and validate a peft LoRA adapter directory (config + safetensors; never pickle).

    Raises:
        CheckpointError: naming the file, the setting or tensor, and the fix, for: a missing
            ``adapter_config.json``; ``adapter_model.bin`` only; a non-LoRA ``peft_type``;
            DoRA, ``bias != "none"`` and the other unsupported settings; ``modules_to_save``
            tensors; embedding or conv LoRA; A/B shapes that do not fit each other or the config.
    """
    d = Path(path)
    cfg_path, weights = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    if not cfg_path.is_file():
        raise CheckpointError(f"{d}: no {ADAPTER_CONFIG}; a LoRA expert is a peft adapter directory written by "
                              "PeftModel.save_pretrained (config and weights); save it again with peft")
    if not weights.is_file():
        if (d / ADAPTER_PICKLE).is_file():
            raise CheckpointError(f"{d}: only {ADAPTER_PICKLE} (pickle, which can run arbitrary code) found; "
                                  f"mergeflow reads {ADAPTER_WEIGHTS} only. Re-save it with "
                                  "model.save_pretrained(dir, safe_serialization=True) in a trusted environment")
        raise CheckpointError(f"{d}: no {ADAPTER_WEIGHTS}; the adapter is incomplete. Save it again with "
                              "PeftModel.save_pretrained")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({exc}); save the adapter again with peft") from None
    _check_config(config, cfg_path)
    tensors: dict[str, Tensor] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[key] = f.get_tensor(key)
    except Exception as exc:  # safetensors raises its own error types for a corrupt file
        raise CheckpointError(f"{weights}: cannot read safetensors file ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
                              "the file is corrupt or truncated. Save the adapter again with peft") from None
    return LoraAdapter(directory=d, config=config, modules=_modules(config, tensors, weights), dtype=_dtype(tensors))


def adapter_from_tensors(config: dict[str, Any], tensors: dict[str, Tensor], name: str) -> LoraAdapter:
    """A LoRA adapter held in memory (a resident worker's expert): its ``adapter_config.json`` as a dict and its
    tensors under the names ``save_pretrained`` gives them (``get_peft_model_state_dict``); validated as
    :func:`read_adapter` validates a directory. ``name`` stands for the directory in messages."""
    _check_config(config, f"{name} (adapter config)")
    return LoraAdapter(directory=Path(name), config=config, modules=_modules(config, tensors, name), dtype=_dtype(tensors))


def _check_config(config: dict[str, Any], cfg_path) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type={peft_type!r}; mergeflow merges LoRA adapters only "
                              "(peft_type LORA). Merge other adapters into their base first")
    for key, why in _UNSUPPORTED_SETTINGS.items():
        if config.get(key):
            raise CheckpointError(f"{cfg_path}: {key}={config[key]!r}: {why}")
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"{cfg_path}: bias={config['bias']!r}: the adapter also trains biases, which are not "
                              "part of B·A; train with bias='none' or merge the adapter into its base first")


def _dtype(tensors: dict[str, Tensor]) -> torch.dtype:
    dtypes = {t.dtype for k, t in tensors.items() if k.endswith(".lora_A.weight")}
    return torch.float32 if len(dtypes) != 1 else dtypes.pop()


def _modules(config: dict[str, Any], tensors: dict[str, Tensor], weights) -> dict[str, LoraModule]:
    pairs: dict[str, dict[str, Tensor]] = {}
    extra_modules = config.get("modules_to_save") or []
    # the tensors that name a variant (embedding LoRA, DoRA) first: their error says more than the extra
    # tensors they bring (peft saves an embedding LoRA's base layer beside it)
    for key in sorted(tensors, key=lambda k: ("lora_embedding_" not in k and "lora_magnitude_vector" not in k, k)):
        m = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
        # peft saves a modules_to_save copy under the module's own name (older versions: ...modules_to_save...)
        if "modules_to_save" in key or (extra_modules and m is None and any(
                re.search(rf"(^|\.){re.escape(str(mod))}\.", key) for mod in extra_modules)):
            raise CheckpointError(
                f"{weights}: tensor {key!r} is a modules_to_save copy (a fully trained module, not a LoRA update); "
                "mergeflow keeps task heads under heads/<task>/. Train without modules_to_save, or merge the "
                "adapter into its base and give the full checkpoint")
        if "lora_embedding_" in key:
            raise CheckpointError(f"{weights}: tensor {key!r} is an embedding LoRA, which mergeflow does not merge; "
                                  "target linear modules only, or merge the adapter into its base first")
        if "lora_magnitude_vector" in key:
            raise CheckpointError(f"{weights}: tensor {key!r} is DoRA's magnitude: {_UNSUPPORTED_SETTINGS['use_dora']}")
        if m is None:
            raise CheckpointError(f"{weights}: tensor {key!r} is not a LoRA lora_A/lora_B weight; only plain LoRA on "
                                  "linear modules is merged (no biases, no extra modules)")
        name = m.group(1).removeprefix(PEFT_PREFIX)
        pairs.setdefault(name, {})[m.group(2)] = tensors[key]
    if not pairs:
        raise CheckpointError(f"{weights}: no lora_A/lora_B tensors; the adapter is empty")

    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    modules: dict[str, LoraModule] = {}
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise CheckpointError(f"{weights}: module {name!r} has no {missing}.weight; the adapter is incomplete")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2:
            raise CheckpointError(f"{weights}: module {name!r} has lora_A of shape {list(a.shape)} and lora_B of shape "
                                  f"{list(b.shape)}: only LoRA on linear modules (2-D) is merged, not conv LoRA")
        if a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{weights}: module {name!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} "
                                  "have different ranks; the adapter is corrupt")
        modules[name] = LoraModule(name=name, lora_A=a.float(), lora_B=b.float(),
                                   scaling=lora_scaling(config, name, int(a.shape[0])), fan_in_fan_out=fan_in_fan_out)
    return modules


def map_modules(adapter: LoraAdapter, base_keys: Iterable[str], base_name: str = "the base") -> dict[str, str]:
    """Map each adapted module to the base tensor it updates: base tensor name → module name.

    ``<module>.weight`` exactly if the base has it; else leading name components are stripped
    (``bert.encoder.…query`` → ``encoder.…query.weight`` for a body saved without its task wrapper)
    until exactly one base tensor is named that or ends with ``.`` + that.

    Raises:
        MergeError: a module with no base tensor (an adapter for another architecture), one whose
            name fits several, or two modules on one tensor.
    """
    keys = set(base_keys)
    out: dict[str, str] = {}
    for name in adapter.modules:
        parts = name.split(".")
        found: str | None = None
        for i in range(len(parts)):
            cand = ".".join(parts[i:]) + ".weight"
            if cand in keys:
                found = cand
                break
            matches = sorted(k for k in keys if k.endswith("." + cand))
            if len(matches) > 1:
                raise MergeError(
                    f"adapter {adapter.directory}: module {name!r} fits {len(matches)} tensors of {base_name} "
                    f"({matches[0]!r}, {matches[1]!r}, ...); cannot tell which it adapts. Give the base the adapter "
                    "was trained on, saved with the same model class")
            if len(matches) == 1:
                found = matches[0]
                break
        if found is None:
            raise MergeError(
                f"adapter {adapter.directory}: module {name!r} has no weight in {base_name} (no tensor named "
                f"{parts[-1]}.weight under its path); the adapter was trained on a different architecture. Give the "
                "base checkpoint it was trained from")
        if found in out:
            raise MergeError(f"adapter {adapter.directory}: modules {out[found]!r} and {name!r} both map to "
                               f"{found!r} of {base_name}; the adapter does not fit this base")
        out[found] = name
    return out


class LoraDeltaReader:
    """A LoRA expert's full weights, ``base + ΔW``, with :class:`~operators.tensor_io.TensorReader`'s interface.

    Tensors the adapter does not target are the base's, read from disk. A targeted tensor's rows
    are computed on demand: ``get_flat`` over a row block reads that block of the base and adds
    the same rows of ``B @ A · scaling``, in float32 (float64 for a float64 base). They are
    returned in that precision, not rounded to a bfloat16/float16 base's dtype: the merge engine
    computes in float32 anyway, and a task vector ``(W + ΔW) − W`` then is ΔW to float32 rounding,
    not to the resolution of bfloat16 weights (``dtype()`` still reports the base's dtype, which
    the merged output is written in). For a float32 base this is exactly the fine-tuned weights a
    float32 ``merge_and_unload`` gives. Only the adapter's A and B stay in memory.

    Args:
        adapter: The adapter directory (or an already-read :class:`LoraAdapter`).
        base: The full checkpoint the adapter was trained from: its directory, or a reader with
            :class:`~operators.tensor_io.TensorReader`'s interface over its tensors in memory
            (``base_name`` then names it in messages).

    Raises:
        CheckpointError / MergeError: an invalid adapter (see :func:`read_adapter`), a module the
            base does not have, or A/B shapes that do not fit the base tensor.
    """

    def __init__(self, adapter: str | Path | LoraAdapter, base: str | Path | Any, base_name: str | None = None):
        self.adapter = adapter if isinstance(adapter, LoraAdapter) else read_adapter(adapter)
        self.directory = self.adapter.directory
        in_memory = hasattr(base, "get_flat")  # a reader over tensors held in memory (a resident worker's merge)
        self.base_directory = Path(base_name or "the round's start model") if in_memory else Path(base)
        self._base = base if in_memory else TensorReader(base)
        try:
            self.targets = map_modules(self.adapter, self._base.keys(), f"base {self.base_directory}")
            for key, name in self.targets.items():
                mod = self.adapter.modules[name]
                shape = tuple(self._base.shape(key))
                if shape != mod.delta_shape or not self._base.dtype(key).is_floating_point:
                    layout = " (fan_in_fan_out: stored (in, out))" if mod.fan_in_fan_out else ""
                    raise MergeError(
                        f"adapter {self.directory}: module {name!r} has lora_A {list(mod.lora_A.shape)} and lora_B "
                        f"{list(mod.lora_B.shape)}, an update of shape {list(mod.delta_shape)}{layout}, but base "
                        f"tensor {key!r} has shape {list(shape)}; the adapter was trained on a different base. "
                        "Give the base checkpoint it was trained from")
        except BaseException:
            self._base.close()
            raise

    def module(self, key: str) -> LoraModule | None:
        """The LoRA module that updates base tensor ``key`` (None if untargeted)."""
        name = self.targets.get(key)
        return None if name is None else self.adapter.modules[name]

    def delta(self, key: str, rows: slice | None = None) -> Tensor:
        """ΔW of base tensor ``key`` (float32; zeros if untargeted), or rows of it."""
        n = self.shape(key)[0]
        r0, r1, _ = (rows or slice(None)).indices(n)
        mod = self.module(key)
        if mod is None:
            return torch.zeros((max(0, r1 - r0), *self.shape(key)[1:]), dtype=torch.float32)
        return self._delta_rows(key, mod, r0, r1)

    def _delta_rows(self, key: str, mod: LoraModule, r0: int, r1: int) -> Tensor:
        # ΔW is computed in fixed tiles of rows (the engine's row blocks), whatever rows are asked for:
        # a matmul's rounding can depend on its operands' shapes, and the merged values must not
        # depend on how the caller splits the tensor
        n, cols = self.shape(key)
        tile = max(1, DELTA_TILE_ELEMENTS // cols)
        pieces = []
        for t in range(r0 // tile, -(-r1 // tile)):
            lo, hi = t * tile, min(n, (t + 1) * tile)
            d = delta_weight(mod.lora_A, mod.lora_B, mod.scaling, mod.fan_in_fan_out, slice(lo, hi))
            pieces.append(d[max(r0, lo) - lo:min(r1, hi) - lo])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def keys(self) -> list[str]:
        return self._base.keys()

    def __contains__(self, key: str) -> bool:
        return key in self._base

    def dtype(self, key: str) -> torch.dtype:
        return self._base.dtype(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._base.shape(key)

    def numel(self, key: str) -> int:
        return self._base.numel(key)

    def nbytes(self, key: str) -> int:
        return self._base.nbytes(key)

    def get(self, key: str) -> Tensor:
        """The whole tensor, base + ΔW (a fresh, writable buffer; at least float32 where targeted)."""
        return self.get_flat(key, 0, self.numel(key)).reshape(self.shape(key))

    def get_flat(self, key: str, start: int, stop: int) -> Tensor:
        """Elements ``start:stop`` of the flattened ``base + ΔW``; only the rows they span are computed."""
        mod = self.module(key)
        if mod is None:
            return self._base.get_flat(key, start, stop)
        cols = self.shape(key)[1]
        r0, r1 = start // cols, -(-stop // cols)
        w = self._base.get_flat(key, r0 * cols, r1 * cols).reshape(r1 - r0, cols)
        out = (w.to(torch.promote_types(w.dtype, torch.float32)) + self._delta_rows(key, mod, r0, r1)).reshape(-1)
        lo = start - r0 * cols
        if lo == 0 and out.numel() == stop - start:
            return out
        return out[lo:lo + stop - start].clone()

    def close(self) -> None:
        self._base.close()

    def __enter__(self) -> LoraDeltaReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_same_task_type(adapters: dict[str, LoraAdapter]) -> None:
    """Refuse experts of different peft ``task_type`` (their module names and heads do not correspond).

    Raises:
        MergeError: naming two experts and their task types.
    """
    seen: dict[str | None, str] = {}
    for name, ad in adapters.items():
        seen.setdefault(ad.task_type, name)
    if len(seen) > 1:
        (t1, n1), (t2, n2) = list(seen.items())[:2]
        raise MergeError(
            f"experts {n1!r} (task_type={t1!r}) and {n2!r} (task_type={t2!r}) are adapters of different peft task "
            "types; merge adapters trained for the same task type (the same model class) together")


__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_PICKLE", "ADAPTER_WEIGHTS", "PEFT_PREFIX", "LoraAdapter", "LoraDeltaReader",
    "LoraModule", "adapter_from_tensors", "check_same_task_type", "delta_weight", "is_adapter_dir", "lora_scaling", "map_modules",
    "read_adapter",
]


def add_lora(model, settings: Any, causal_lm: bool):
    """Wrap ``model`` with peft LoRA adapters (``settings``: ``finetune.lora``); only they (and a classification
    head) stay trainable.

    Classification adapters are made without a peft task type, so the head is not copied into the
    adapter (``modules_to_save``): mergeflow keeps heads apart (``heads/<task>/``) and trains it here.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    targets = settings.target_modules or default_lora_targets(model.config.model_type)
    config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets,
        use_rslora=settings.use_rslora, bias="none", task_type=TaskType.CAUSAL_LM if causal_lm else None,
        fan_in_fan_out=model.config.model_type == "gpt2",  # GPT-2's Conv1D stores weights as (in, out)
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise ValueError(f"finetune.lora.target_modules {targets} do not fit this {model.config.model_type} model "
                         f"({exc}); name its linear layers") from None
    if not causal_lm:
        prefix = model.base_model_prefix + "."
        for name, p in model.named_parameters():
            if not name.startswith(prefix):  # the task head trains in full
                p.requires_grad_(True)
    return peft_model
