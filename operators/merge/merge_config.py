"""Merge configs for ``mergeflow merge``: mergeflow's own format, or a mergekit YAML read as mergekit does.

mergeflow's format names the base, the experts and one registered method::

    base: ./models/base
    experts: {sentiment: ./experts/sentiment, emotion: ./experts/emotion}
    method: ties
    params: {density: 0.2, scaling: 1.0}
    dtype: float32            # optional: output dtype (default: the base's)
    tokenizer: {source: union} # optional: experts with other vocabularies (union | base | model:NAME)

An expert may be a peft LoRA adapter directory (merged exactly as base + B·A·scaling); an optional
``lora`` block picks the output::

    lora: {mode: adapter, rank: 16, factorization: svd}   # mode: exact (default) | adapter
    adapter_bases: {sentiment: ./round-1/start}           # optional: an adapter's own base (default: base)

A mergekit config (``merge_method``, ``base_model``, ``models[].parameters``, ``parameters``,
``dtype``, ``out_dtype``, ``tokenizer_source: base``) is a drop-in: it is translated to the registered
method with mergekit 0.1.5's semantics (its defaults, per-tensor sparsification, its ``normalize``
divisor, L1 ``rescale``, its gradients and filters of parameter values: ``operators.merge.schedule``),
so deterministic methods give mergekit's tensors. Keys and methods that mergeflow does not implement
are refused by name rather than ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from operators.merge.config_common import (
    _FETCH,
    DTYPES,
    MergeConfigError,
    MergePlan,
    dtype_of,
    local_path,
    tokenizer_setting,
)
from operators.merge.mergekit_config import MERGEKIT_METHODS, from_mergekit
from operators.merge.registry import get_method


def load_merge_config(path: str | Path, fetch: Callable[[str], Path] | None = None) -> MergePlan:
    """Read a mergeflow or mergekit YAML merge config.

    Relative model paths resolve from the config's folder in a mergeflow config, and from the
    working directory in a mergekit config (as mergekit resolves them). ``fetch`` turns a model
    given as a URI (``s3://bucket/…``) into a local directory; without it, URIs are refused.
    """
    token = _FETCH.set(fetch)
    try:
        return _load_merge_config(Path(path))
    finally:
        _FETCH.reset(token)


def _load_merge_config(path: Path) -> MergePlan:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise MergeConfigError(f"{path}: no such merge config") from None
    except yaml.YAMLError as exc:
        raise MergeConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise MergeConfigError(f"{path}: a merge config is a mapping (got {type(raw).__name__})")
    return parse_merge_config(raw, path.parent)


def parse_merge_config(raw: Mapping[str, Any], root: Path = Path(".")) -> MergePlan:
    """Translate a config mapping into a :class:`MergePlan` (mergekit's when it has ``merge_method``)."""
    if "merge_method" in raw:
        return from_mergekit(raw, Path.cwd())
    known = {"base", "experts", "method", "params", "dtype", "lora", "adapter_bases", "tokenizer"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise MergeConfigError(f"{unknown[0]}: unknown key; a mergeflow merge config has {', '.join(sorted(known))} "
                               "(or give a mergekit config with merge_method)")
    for key in ("base", "experts", "method"):
        if key not in raw:
            raise MergeConfigError(f"{key}: required")
    experts = raw["experts"]
    if not isinstance(experts, dict) or not experts:
        raise MergeConfigError(f"experts: a mapping of expert name → checkpoint path (got {experts!r})")
    method = str(raw["method"])
    params = dict(raw.get("params") or {})
    try:
        get_method(method).parse_params(params)
    except ValueError as exc:
        raise MergeConfigError(f"method: {exc}" if "unknown merge method" in str(exc) else str(exc)) from None
    plan = MergePlan(
        base=local_path(raw["base"], root, "base"),
        experts={str(n): local_path(p, root, f"experts.{n}") for n, p in experts.items()},
        method=method,
        params=params,
        out_dtype=dtype_of(raw.get("dtype"), "dtype"),
    )
    _lora_settings(raw, root, plan)
    if raw.get("tokenizer") is not None:
        plan.tokenizer_source, plan.pad_to_multiple_of = tokenizer_setting(raw["tokenizer"], "tokenizer")
        src = plan.tokenizer_source
        if src not in ("union", "base") and not (src.startswith("model:") and src[6:] in plan.experts):
            raise MergeConfigError(f"tokenizer.source: {src!r} is not union, base or model:NAME of an expert "
                                   f"({', '.join(f'model:{n}' for n in plan.experts)})")
    return plan


LORA_KEYS = {"mode": ("exact", "adapter"), "rank": None, "factorization": ("svd", "concat")}


def _lora_settings(raw: Mapping[str, Any], root: Path, plan: MergePlan) -> None:
    """Read the optional ``lora`` block and ``adapter_bases`` into ``plan``."""
    from operators.lora import is_adapter_dir

    lora = raw.get("lora") or {}
    if not isinstance(lora, dict):
        raise MergeConfigError(f"lora: a mapping such as {{mode: adapter, rank: 16}} (got {lora!r})")
    for key, value in lora.items():
        if key not in LORA_KEYS:
            raise MergeConfigError(f"lora.{key}: unknown key; lora takes {', '.join(LORA_KEYS)}")
        choices = LORA_KEYS[key]
        if choices is not None and value not in choices:
            raise MergeConfigError(f"lora.{key}: {value!r} is not one of {', '.join(choices)}")
    rank = lora.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise MergeConfigError(f"lora.rank: {rank!r} must be a positive integer (or left out: the sum of the "
                               "experts' ranks)")
    plan.lora_mode = lora.get("mode", "exact")
    plan.adapter_rank = rank
    plan.adapter_factorization = lora.get("factorization", "svd")
    if plan.lora_mode == "exact" and ("rank" in lora or "factorization" in lora):
        raise MergeConfigError("lora: rank and factorization apply to mode: adapter (exact writes full weights); "
                               "set mode: adapter or remove them")
    bases = raw.get("adapter_bases") or {}
    if not isinstance(bases, dict):
        raise MergeConfigError(f"adapter_bases: a mapping of expert name → base checkpoint path (got {bases!r})")
    for name, ref in bases.items():
        if str(name) not in plan.experts:
            raise MergeConfigError(f"adapter_bases.{name}: not an expert of this config "
                                   f"(experts: {', '.join(plan.experts)})")
        plan.adapter_bases[str(name)] = local_path(ref, root, f"adapter_bases.{name}")
    adapters = [n for n, p in plan.experts.items() if is_adapter_dir(p)]
    if plan.lora_mode == "adapter" and len(adapters) != len(plan.experts):
        full = next(n for n in plan.experts if n not in adapters)
        raise MergeConfigError(f"lora.mode: adapter needs every expert to be a peft adapter directory; experts.{full} "
                               f"({plan.experts[full]}) is a full checkpoint. Use mode: exact")
    if adapters:
        plan.notes.append(f"LoRA experts {', '.join(adapters)} merged as base + B·A·scaling (exact); "
                          f"output: {'one peft adapter' if plan.lora_mode == 'adapter' else 'a full checkpoint'}")


__all__ = ["DTYPES", "MERGEKIT_METHODS", "MergeConfigError", "MergePlan", "load_merge_config", "parse_merge_config"]
