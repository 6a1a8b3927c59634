"""mergekit YAML configs read as mergekit 0.1.5 reads them, translated to mergeflow's registered methods
(or to a passthrough stack of layer slices)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from operators.merge.config_common import MergeConfigError, MergePlan, dtype_of, local_path, scalar
from operators.merge.passthrough import LayerSlice, layer_count
from operators.merge.registry import get_method

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
    "passthrough": {"scale"},
}
# mergekit methods whose base_model may be left out (they then merge the models themselves)
MERGEKIT_BASE_OPTIONAL = {"linear", "nuslerp", "multislerp", "karcher"}
MERGEKIT_TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
                     "name"}
MERGEKIT_UNSUPPORTED_KEYS = {
    "modules": "per-module merges",
    "tokenizer": "tokenizer surgery",
    "chat_template": "chat templates",
}


def from_mergekit(raw: Mapping[str, Any], root: Path) -> MergePlan:
    method, glob = _mergekit_method(raw)
    if method == "passthrough" or "slices" in raw:
        return _passthrough(raw, root, method, glob)
    allowed = MERGEKIT_METHODS[method]
    models = raw.get("models") or []
    if not isinstance(models, list) or not models:
        raise MergeConfigError("models: a list of {model: PATH, parameters: {...}} entries is required")
    base_ref = raw.get("base_model")
    base = local_path(base_ref, root, "base_model") if base_ref is not None else None
    inputs = _mergekit_models(models, root, method, allowed, base)
    names = _unique_names([ref for ref, _, _ in inputs])
    plan = MergePlan(base=base or inputs[0][1], experts={n: p for n, (_, p, _) in zip(names, inputs, strict=True)},
                     method=method, params={}, source_format="mergekit",
                     out_dtype=dtype_of(raw.get("out_dtype") or raw.get("dtype"), "out_dtype" if raw.get("out_dtype") else "dtype"))
    if method not in MERGEKIT_BASE_OPTIONAL and base is None:
        raise MergeConfigError(f"base_model: required by mergekit's {method}")
    _MERGEKIT_PARAMS[method](_MergekitParams(method, glob, inputs, names, plan), plan, base)
    try:
        get_method(plan.method).parse_params(plan.params)
    except ValueError as exc:
        raise MergeConfigError(str(exc)) from None
    return plan


def _passthrough(raw: Mapping[str, Any], root: Path, method: str, glob: dict[str, Any]) -> MergePlan:
    """A mergekit ``passthrough`` config: ``slices`` of one model each (or ``models`` with one model), stacked."""
    if method != "passthrough":
        raise MergeConfigError(f"slices: mergeflow stacks slices with merge_method: passthrough only (got {method!r}); "
                               "merge whole models with models:")
    if "slices" in raw:
        entries = raw["slices"] if isinstance(raw["slices"], list) and raw["slices"] and "models" not in raw else [None]
        for i, sl in enumerate(entries):
            if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or len(sl["sources"]) != 1:
                raise MergeConfigError(f"slices[{i}].sources: passthrough takes slices (not models too) of exactly "
                                       "one source each: {sources: [{model: PATH, layer_range: [START, END]}]}")
        sources = [(f"slices[{i}].sources[0]", sl["sources"][0], dict(sl.get("parameters") or {}))
                   for i, sl in enumerate(entries)]
    else:
        models = raw.get("models") or []
        if len(models) != 1 or not isinstance(models[0], dict):
            raise MergeConfigError(f"models: passthrough copies exactly one model (got {len(models)}); stack layers "
                                   "of several with slices")
        sources = [("models[0]", models[0], {})]
    slices = []
    for where, src, slice_params in sources:
        if not isinstance(src, dict) or "model" not in src:
            raise MergeConfigError(f"{where}: each source needs model: PATH")
        path = local_path(src["model"], root, f"{where}.model")
        params = {**glob, **slice_params, **(src.get("parameters") or {})}
        unknown = sorted(set(params) - {"scale"})
        if unknown:
            raise MergeConfigError(f"{where}.parameters.{unknown[0]}: not a parameter of mergekit's passthrough (scale)")
        scale = scalar(params.get("scale"), f"{where}.parameters.scale")
        rng = src.get("layer_range")
        if rng is None and "slices" not in raw:
            rng = [0, layer_count(path)[1]]
        if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(v, int) for v in rng)):
            raise MergeConfigError(f"{where}.layer_range: [START, END] of whole numbers is needed (got {rng!r})")
        slices.append(LayerSlice(path, rng[0], rng[1], None if scale is None else float(scale)))
    return MergePlan(base=slices[0].model, experts={}, method="passthrough", params={}, source_format="mergekit",
                     out_dtype=dtype_of(raw.get("out_dtype") or raw.get("dtype"),
                                        "out_dtype" if raw.get("out_dtype") else "dtype"), slices=slices)


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
        glob[k] = scalar(v, f"parameters.{k}")
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
        path = local_path(entry["model"], root, f"models[{i}].model")
        params = {}
        for k, v in (entry.get("parameters") or {}).items():
            if k not in allowed:
                raise MergeConfigError(f"models[{i}].parameters.{k}: not a parameter of mergekit's {method} "
                                       f"(its parameters: {', '.join(sorted(allowed))})")
            params[k] = scalar(v, f"models[{i}].parameters.{k}")
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
    if other == "base_model":
        raise MergeConfigError("models: a model folder named base_model clashes with slerp's base_model; rename it")
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
        if "base_model" in plan.experts:
            raise MergeConfigError("models: a model folder named base_model clashes with the base_model karcher "
                                   "averages in; rename that folder")
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
