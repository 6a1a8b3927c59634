"""Merge configs for ``mergeflow merge``: mergeflow's own format, or a mergekit YAML read as mergekit does.

mergeflow's format names the base, the experts and one registered method::

    base: ./models/base
    experts: {sentiment: ./experts/sentiment, emotion: ./experts/emotion}
    method: ties
    params: {density: 0.2, scaling: 1.0}
    dtype: float32            # optional: output dtype (default: the base's)

An expert may be a peft LoRA adapter directory (merged exactly as base + B·A·scaling); an optional
``lora`` block picks the output::

    lora: {mode: adapter, rank: 16, factorization: svd}   # mode: exact (default) | adapter
    adapter_bases: {sentiment: ./round-1/start}           # optional: an adapter's own base (default: base)

A mergekit config (``merge_method``, ``base_model``, ``models[].parameters``, ``parameters``,
``dtype``, ``out_dtype``, ``tokenizer_source: base``) is a drop-in: it is translated to the registered
method with mergekit 0.1.5's semantics (its defaults, per-tensor sparsification, its ``normalize``
divisor, L1 ``rescale``), so deterministic methods give mergekit's tensors. Keys, parameter forms and
methods that mergeflow does not implement are refused by name rather than ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from operators.merge.registry import get_method

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# mergekit methods mergeflow reproduces, and the mergekit keys each accepts (global or per model)
MERGEKIT_METHODS: dict[str, set[str]] = {
    "linear": {"weight", "normalize"},
    "task_arithmetic": {"weight", "lambda", "normalize", "rescale", "int8_mask", "density"},
    "ties": {"weight", "density", "lambda", "normalize", "rescale", "int8_mask"},
    "dare_linear": {"weight", "density", "lambda", "normalize", "rescale", "int8_mask"},
    "dare_ties": {"weight", "density", "lambda", "normalize", "rescale", "int8_mask"},
    "breadcrumbs": {"weight", "density", "gamma", "lambda", "normalize", "rescale", "int8_mask"},
    "breadcrumbs_ties": {"weight", "density", "gamma", "lambda", "normalize", "rescale", "int8_mask"},
    "slerp": {"t"},
    "model_stock": {"filter_wise"},
    "della": {"weight", "density", "epsilon", "lambda", "normalize", "rescale", "int8_mask"},
    "della_linear": {"weight", "density", "epsilon", "lambda", "normalize", "rescale", "int8_mask"},
    "sce": {"select_topk", "int8_mask"},
    "nuslerp": {"weight", "nuslerp_flatten", "nuslerp_row_wise"},
    "multislerp": {"weight", "normalize_weights", "eps"},
    "karcher": {"max_iter", "tol"},
    "nearswap": {"t"},
}
# mergekit methods whose base_model may be left out (they then merge the models themselves)
MERGEKIT_BASE_OPTIONAL = {"linear", "nuslerp", "multislerp", "karcher"}
MERGEKIT_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
                     "name"}
MERGEKIT_UNSUPPORTED_KEYS = {
    "slices": "layer slicing (passthrough/frankenmerges)",
    "modules": "per-module merges",
    "tokenizer": "tokenizer surgery",
    "chat_template": "chat templates",
}


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
    adapter_rank: int | None = None
    adapter_factorization: str = "svd"
    adapter_bases: dict[str, Path] = field(default_factory=dict)


# How a model given as a URI (s3://…, gs://…) becomes a local directory: set by the caller (the CLI
# passes the checkpoint store's verified download); operators know nothing of stores.
_FETCH: ContextVar[Callable[[str], Path] | None] = ContextVar("mergeflow_merge_config_fetch", default=None)


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
        return _from_mergekit(raw, Path.cwd())
    known = {"base", "experts", "method", "params", "dtype", "lora", "adapter_bases"}
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
        base=_local(raw["base"], root, "base"),
        experts={str(n): _local(p, root, f"experts.{n}") for n, p in experts.items()},
        method=method,
        params=params,
        out_dtype=_dtype(raw.get("dtype"), "dtype"),
    )
    _lora_settings(raw, root, plan)
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
        plan.adapter_bases[str(name)] = _local(ref, root, f"adapter_bases.{name}")
    adapters = [n for n, p in plan.experts.items() if is_adapter_dir(p)]
    if plan.lora_mode == "adapter" and len(adapters) != len(plan.experts):
        full = next(n for n in plan.experts if n not in adapters)
        raise MergeConfigError(f"lora.mode: adapter needs every expert to be a peft adapter directory; experts.{full} "
                               f"({plan.experts[full]}) is a full checkpoint. Use mode: exact")
    if adapters:
        plan.notes.append(f"LoRA experts {', '.join(adapters)} merged as base + B·A·scaling (exact); "
                          f"output: {'one peft adapter' if plan.lora_mode == 'adapter' else 'a full checkpoint'}")


def _local(ref: Any, root: Path, where: str) -> Path:
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


def _dtype(value: Any, where: str) -> torch.dtype | None:
    if value is None:
        return None
    if value not in DTYPES:
        raise MergeConfigError(f"{where}: {value!r} is not a supported dtype; use one of {', '.join(DTYPES)}")
    return DTYPES[value]


def _scalar(value: Any, where: str) -> Any:
    if isinstance(value, list):
        raise MergeConfigError(f"{where}: gradients (a list of values interpolated over layers) are not supported "
                               "by mergeflow; give one value")
    if isinstance(value, dict):
        raise MergeConfigError(f"{where}: filtered (per-tensor) parameter values are not supported by mergeflow; "
                               "give one value")
    return value


def _from_mergekit(raw: Mapping[str, Any], root: Path) -> MergePlan:
    method, glob = _mergekit_method(raw)
    allowed = MERGEKIT_METHODS[method]
    models = raw.get("models") or []
    if not isinstance(models, list) or not models:
        raise MergeConfigError("models: a list of {model: PATH, parameters: {...}} entries is required")
    base_ref = raw.get("base_model")
    base = _local(base_ref, root, "base_model") if base_ref is not None else None
    inputs = _mergekit_models(models, root, method, allowed, base)
    names = _unique_names([ref for ref, _, _ in inputs])
    plan = MergePlan(base=base or inputs[0][1], experts={n: p for n, (_, p, _) in zip(names, inputs, strict=True)},
                     method=method, params={}, source_format="mergekit",
                     out_dtype=_dtype(raw.get("out_dtype") or raw.get("dtype"), "out_dtype" if raw.get("out_dtype") else "dtype"))
    if method not in MERGEKIT_BASE_OPTIONAL and base is None:
        raise MergeConfigError(f"base_model: required by mergekit's {method}")
    _MERGEKIT_PARAMS[method](_MergekitParams(method, glob, inputs, names, plan), plan, base)
    try:
        get_method(plan.method).parse_params(plan.params)
    except ValueError as exc:
        raise MergeConfigError(str(exc)) from None
    return plan


def _mergekit_method(raw: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The config's merge method and its global parameters, checked against what mergeflow reads."""
    for key in raw:
        if key in MERGEKIT_UNSUPPORTED_KEYS:
            raise MergeConfigError(f"{key}: mergekit's {MERGEKIT_UNSUPPORTED_KEYS[key]} is not supported by mergeflow")
        if key not in MERGEKIT_TOP_KEYS:
            raise MergeConfigError(f"{key}: not a mergekit config key mergeflow knows; "
                                   f"supported: {', '.join(sorted(MERGEKIT_TOP_KEYS))}")
    method = raw["merge_method"]
    if method not in MERGEKIT_METHODS:
        raise MergeConfigError(f"merge_method: {method!r} is not supported by mergeflow; "
                               f"supported mergekit methods: {', '.join(sorted(MERGEKIT_METHODS))}")
    ts = raw.get("tokenizer_source")
    if ts not in (None, "base"):
        raise MergeConfigError(f"tokenizer_source: {ts!r} is not supported; mergeflow copies the base model's "
                               "tokenizer (tokenizer_source: base)")
    allowed = MERGEKIT_METHODS[method]
    glob = dict(raw.get("parameters") or {})
    for k, v in glob.items():
        if k not in allowed:
            raise MergeConfigError(f"parameters.{k}: not a parameter of mergekit's {method} "
                                   f"(its parameters: {', '.join(sorted(allowed))})")
        glob[k] = _scalar(v, f"parameters.{k}")
    return method, glob


def _mergekit_models(models: list, root: Path, method: str, allowed: Any,
                     base: Path | None) -> list[tuple[str, Path, dict[str, Any]]]:
    """Each model entry to merge: its reference, local path and parameters (the base listed among them left out,
    as mergekit does for every method but linear)."""
    inputs: list[tuple[str, Path, dict[str, Any]]] = []
    for i, entry in enumerate(models):
        if not isinstance(entry, dict) or "model" not in entry:
            raise MergeConfigError(f"models[{i}]: each entry needs model: PATH (got {entry!r})")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise MergeConfigError(f"models[{i}].{extra[0]}: not supported; an entry has model and parameters")
        path = _local(entry["model"], root, f"models[{i}].model")
        params = {}
        for k, v in (entry.get("parameters") or {}).items():
            if k not in allowed:
                raise MergeConfigError(f"models[{i}].parameters.{k}: not a parameter of mergekit's {method} "
                                       f"(its parameters: {', '.join(sorted(allowed))})")
            params[k] = _scalar(v, f"models[{i}].parameters.{k}")
        if base is not None and path.resolve() == base.resolve() and method != "linear":
            continue  # the base listed among the models: mergekit does not merge it as a non-base input
        inputs.append((str(entry["model"]), path, params))
    return inputs


@dataclass
class _MergekitParams:
    """A mergekit config's parameters as mergekit resolves them: per model, else global, else a default."""

    method: str
    glob: dict[str, Any]
    inputs: list[tuple[str, Path, dict[str, Any]]]
    names: list[str]
    plan: MergePlan

    def value(self, i: int, key: str, default: Any = None, required: bool = False) -> Any:
        if key in self.inputs[i][2]:
            return self.inputs[i][2][key]
        if key in self.glob:
            return self.glob[key]
        if required:
            raise MergeConfigError(f"models[{i}].parameters.{key}: required by mergekit's {self.method} "
                                   f"(give it per model or under parameters)")
        return default

    def shared(self, key: str, default: Any) -> Any:
        return self.glob.get(key, default)

    def per_expert(self, key: str, default: Any = None, required: bool = False) -> dict[str, float]:
        out = {}
        for i, n in enumerate(self.names):
            v = self.value(i, key, default, required)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise MergeConfigError(f"models[{i}].parameters.{key}: a number is needed (got {v!r})")
            if key == "density" and not 0.0 < v <= 1.0:
                raise MergeConfigError(f"models[{i}].parameters.{key}: must be in (0, 1], the fraction of the task "
                                       f"vector kept (got {v!r})")
            out[n] = float(v)
        return out

    def uniform(self, key: str, default: Any) -> float:
        vals = set(self.per_expert(key, default).values())
        if len(vals) > 1:
            raise MergeConfigError(f"{key}: mergeflow's {self.plan.method} takes one {key} for all models "
                                   f"(got {sorted(vals)}); use one value")
        return vals.pop()


# mergekit's parameters of each method, as mergeflow's method and parameters (one function per method)
def _linear(m: _MergekitParams, plan: MergePlan, base: Path | None) -> None:
    plan.params = {"weights": m.per_expert("weight", required=True), "normalize": bool(m.shared("normalize", True))}


def _task_arithmetic(m: _MergekitParams, plan: MergePlan, base: Path | None) -> None:
    plan.params = {"weights": m.per_expert("weight", required=True), "scaling": float(m.shared("lambda", 1.0)),
                   "normalize": bool(m.shared("normalize", False))}


def _ties(m: _MergekitParams, plan: MergePlan, base: Path | None) -> None:
    plan.params = {"weights": m.per_expert("weight", required=True), "densities": m.per_expert("density", 1.0),
                   "density": 1.0, "scaling": float(m.shared("lambda", 1.0)), "scope": "tensor",
                   "divisor": "weights", "merge_func": "mean" if m.shared("normalize", True) else "sum",
                   "zero_sign": "positive",
                   "rescale": "l1" if m.shared("rescale", False) else "none"}


def _dare(m: _MergekitParams, plan: MergePlan, base: Path | None) -> None:
    plan.params = {"weights": m.per_expert("weight", required=True), "drop_rate": 1.0 - m.uniform("density", 1.0),
                   "scaling": float(m.shared("lambda", 1.0)), "rescale": "l1" if m.shared("rescale", True) else "none"}
    if m.method == "dare_ties":
        plan.params.update(merge_func="mean" if m.shared("normalize", False) else "sum", divisor="weights",
                           zero_sign="positive")
    elif m.shared("normalize", False):
        raise MergeConfigError("parameters.normalize: true is not supported for dare_linear by mergeflow")
    plan.notes.append("DARE is random: mergekit and mergeflow draw different masks, so outputs differ")


def _breadcrumbs(m: _MergekitParams, plan: MergePlan, base: Path | None) -> None:
    if m.shared("rescale", False):
        raise MergeConfigError(f"parameters.rescale: true is not supported for {m.method} by mergeflow")
    gamma = m.uniform("gamma", 0.01)
    plan.params = {"weights": m.per_expert("weight", required=True), "densities": m.per_expert("density", 1.0),
                   "density": 1.0, "gamma": gamma, "scaling": float(m.shared("lambda", 1.0)), "scope": "tensor",
                   "normalize": bool(m.shared("normalize", False)), "sign_election": m.method == "breadcrumbs_ties"}
    if m.method == "breadcrumbs_ties":
        plan.params["zero_sign"] = "positive"
    plan.method = "breadcrumbs"


def _slerp(m: _MergekitParams, plan: MergePlan, base: Path | None) -> None:
    if len(m.inputs) != 1:
        raise MergeConfigError(f"models: slerp takes the base_model and exactly one other model (got {len(m.inputs)} others)")
    t = m.value(0, "t", m.shared("t", None), required=True)
    other = m.names[0]
    plan.experts = {"base_model": base, other: m.inputs[0][1]}
    plan.params = {"t": float(t), "order": ["base_model", other]}


def _model_stock(m: _MergekitParams, plan: MergePlan, base: Path | None) -> None:
    if len(m.inputs) < 2:
        raise MergeConfigError(f"models: model_stock needs at least two models besides the base (got {len(m.inputs)})")
    plan.params = {"filter_wise": bool(m.shared("filter_wise", False))}


def _della(m: _MergekitParams, plan: MergePlan, base: Path | None) -> None:
    plan.params = {"weights": m.per_expert("weight", required=True), "densities": m.per_expert("density", 1.0),
                   "density": 1.0, "epsilon": m.uniform("epsilon", 0.15), "scaling": float(m.shared("lambda", 1.0)),
                   "normalize": bool(m.shared("normalize", m.method == "della")),
                   "rescale": "l1" if m.shared("rescale", True) else "none"}
    plan.notes.append("DELLA is random: mergekit draws from torch's global generator, mergeflow seeds each tensor, "
                      "so the kept entries differ (the probabilities are the same)")


def _sce(m: _MergekitParams, plan: MergePlan, base: Path | None) -> None:
    plan.params = {"select_topk": float(m.shared("select_topk", 1.0))}


def _spherical(m: _MergekitParams, plan: MergePlan, base: Path | None) -> None:
    plan.params = {"weights": m.per_expert("weight", required=True), "relative_to_base": base is not None}
    if m.method == "nuslerp":
        if len(m.inputs) != 2:
            raise MergeConfigError(f"models: nuslerp interpolates exactly two models besides the base (got {len(m.inputs)})")
        plan.params |= {"flatten": bool(m.shared("nuslerp_flatten", True)),
                        "row_wise": bool(m.shared("nuslerp_row_wise", False))}
    else:
        plan.params |= {"normalize_weights": bool(m.shared("normalize_weights", True)), "eps": float(m.shared("eps", 1e-8))}


def _karcher(m: _MergekitParams, plan: MergePlan, base: Path | None) -> None:
    if base is not None:  # mergekit averages the base_model in as one more model
        plan.experts["base_model"] = base
    plan.params = {"max_iter": int(m.shared("max_iter", 10)), "tol": float(m.shared("tol", 1e-5))}


def _nearswap(m: _MergekitParams, plan: MergePlan, base: Path | None) -> None:
    if len(m.inputs) != 1:
        raise MergeConfigError(f"models: nearswap takes the base_model and exactly one other model (got {len(m.inputs)})")
    plan.params = {"t": float(m.value(0, "t", required=True))}


_MERGEKIT_PARAMS: dict[str, Callable[[_MergekitParams, MergePlan, Path | None], None]] = {
    "linear": _linear, "task_arithmetic": _task_arithmetic, "ties": _ties, "dare_linear": _dare, "dare_ties": _dare,
    "breadcrumbs": _breadcrumbs, "breadcrumbs_ties": _breadcrumbs, "slerp": _slerp, "model_stock": _model_stock,
    "della": _della, "della_linear": _della, "sce": _sce, "nuslerp": _spherical, "multislerp": _spherical,
    "karcher": _karcher, "nearswap": _nearswap,
}


def _unique_names(refs: list[str]) -> list[str]:
    base = [Path(r.rstrip("/")).name or f"model{i}" for i, r in enumerate(refs)]
    return [b if base.count(b) == 1 else f"{b}-{i}" for i, b in enumerate(base)]
