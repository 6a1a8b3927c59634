"""mergekit YAML configs read as mergekit 0.1.5 reads them, translated to mergeflow's registered methods
(or to a passthrough stack of layer slices)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from operators.errors import MergeError
from operators.merge.config_common import MergeConfigError, MergePlan, dtype_of, local_path, tokenizer_setting
from operators.merge.passthrough import LayerSlice, layer_count
from operators.merge.registry import get_method
from operators.merge.schedule import check_setting, layer_position, resolve, varies
from operators.tensor_io import TensorReader

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
    "arcee_fusion": set(),
}
# mergekit methods whose base_model may be left out (they then merge the models themselves)
MERGEKIT_BASE_OPTIONAL = {"linear", "nuslerp", "multislerp", "karcher"}
MERGEKIT_TOP_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
                     "tokenizer", "name"}
MERGEKIT_UNSUPPORTED_KEYS = {
    "modules": "per-module merges",
    "chat_template": "chat templates",
}


def from_mergekit(raw: Mapping[str, Any], root: Path) -> MergePlan:
    if "slices" in raw and raw.get("merge_method") != "passthrough":
        raw = _whole_model_slice(raw, root)
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
    _tokenizer(raw, root, plan, base)
    if not any(varies(v) for v in [*glob.values(), *(v for _, _, ps in inputs for v in ps.values())]):
        _MERGEKIT_PARAMS[method](_MergekitParams(method, glob, inputs, names, plan), plan, base)
    else:
        schedule = MergekitSchedule(method, glob, inputs, names, plan, base)
        schedule.structure(plan)
        schedule.check(plan.method)
        plan.tensor_params = schedule
        plan.notes.append(f"parameters vary by tensor (gradients or filters): {schedule.distinct} distinct sets "
                          f"over {len(schedule.keys)} tensors")
        return plan
    try:
        get_method(plan.method).parse_params(plan.params)
    except ValueError as exc:
        raise MergeConfigError(str(exc)) from None
    return plan


class MergekitSchedule:
    """A mergekit config whose parameters vary by tensor, as mergeflow parameters for each tensor.

    Each tensor's settings are resolved to values (``operators.merge.schedule``: the tensor's name for the
    filters, its layer's position for the gradients) and then translated exactly as a config of those
    values would be; every tensor of the base is checked when the config is read.
    """

    def __init__(self, method: str, glob: dict[str, Any], inputs: list[tuple[str, Path, dict[str, Any]]],
                 names: list[str], plan: MergePlan, base: Path | None):
        self.method, self.glob, self.inputs, self.names, self.base = method, glob, inputs, names, base
        self._template = replace(plan, experts=dict(plan.experts), params={}, notes=[])
        reader = TensorReader(plan.base)
        try:
            self.keys = reader.keys()
        finally:
            reader.close()
        try:
            self.num_layers = layer_count(plan.base)[1]
        except MergeError as exc:
            raise MergeConfigError(f"parameters given as gradients: {exc}") from None
        self._cache: dict[str, dict[str, Any]] = {}

    def check(self, method: str) -> None:
        """Every tensor's parameters, checked for ``method`` before any merge work."""
        for key in self.keys:
            try:
                get_method(method).parse_params(self(key))
            except ValueError as exc:
                raise MergeConfigError(f"tensor {key!r}: {exc}") from None

    @property
    def distinct(self) -> int:
        return len(self._cache)

    def _resolved(self, key: str) -> tuple[dict[str, Any], list[tuple[str, Path, dict[str, Any]]]]:
        t = layer_position(key, self.num_layers)
        return resolve(self.glob, key, t), [(ref, path, resolve(ps, key, t)) for ref, path, ps in self.inputs]

    def structure(self, plan: MergePlan) -> None:
        """Fill ``plan`` (its method, experts, notes, and the parameters of the first tensor, reported as the
        merge's) as the translation of the first tensor's values does."""
        glob, inputs = self._resolved(self.keys[0])
        _MERGEKIT_PARAMS[self.method](_MergekitParams(self.method, glob, inputs, self.names, plan), plan, self.base)

    def __call__(self, key: str) -> dict[str, Any]:
        glob, inputs = self._resolved(key)
        sig = json.dumps([glob, [ps for _, _, ps in inputs]], sort_keys=True)
        if sig not in self._cache:
            plan = replace(self._template, experts=dict(self._template.experts), params={}, notes=[])
            try:
                _MERGEKIT_PARAMS[self.method](_MergekitParams(self.method, glob, inputs, self.names, plan), plan,
                                              self.base)
            except MergeConfigError as exc:
                raise MergeConfigError(f"tensor {key!r}: {exc}") from None
            self._cache[sig] = plan.params
        return dict(self._cache[sig])


def _whole_model_slice(raw: Mapping[str, Any], root: Path) -> dict[str, Any]:
    """A config that merges one slice of every source's whole layer range, as the same merge given by
    ``models`` (mergekit turns ``models`` into exactly that slice); slice parameters come before the
    config's for each tensor, as in mergekit."""
    slices = raw["slices"]
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
        raise MergeConfigError("slices: mergeflow merges one slice that covers every source's whole model "
                               f"(got {len(slices) if isinstance(slices, list) else slices!r} slices); merging "
                               "parts of models layer range by layer range is not supported (stack whole layers "
                               "with merge_method: passthrough)")
    sl = slices[0]
    extra = sorted(set(sl) - {"sources", "parameters"})
    if extra:
        raise MergeConfigError(f"slices[0].{extra[0]}: not supported by mergeflow; a slice has sources and parameters")
    if "models" in raw:
        raise MergeConfigError("slices: give models or slices, not both")
    sources = sl.get("sources")
    if not isinstance(sources, list) or not sources:
        raise MergeConfigError("slices[0].sources: a list of {model: PATH, layer_range: [0, N]} is needed")
    models = []
    for j, src in enumerate(sources):
        where = f"slices[0].sources[{j}]"
        if not isinstance(src, dict) or "model" not in src or set(src) - {"model", "layer_range", "parameters"}:
            raise MergeConfigError(f"{where}: {{model: PATH, layer_range: [0, N], parameters: {{…}}}} is needed")
        n = layer_count(local_path(src["model"], root, f"{where}.model"))[1]
        if src.get("layer_range") != [0, n]:
            raise MergeConfigError(f"{where}.layer_range: {src.get('layer_range')!r} is not the model's whole range "
                                   f"[0, {n}]; mergeflow merges whole models (merging layer ranges of models is "
                                   "not supported; stack layers with merge_method: passthrough)")
        models.append({"model": src["model"], **({"parameters": src["parameters"]} if src.get("parameters") else {})})
    params = dict(raw.get("parameters") or {})
    for k, v in (sl.get("parameters") or {}).items():
        params[k] = _first_then(v, params[k]) if k in params else v
    out = {k: v for k, v in raw.items() if k != "slices"}
    return out | {"models": models, **({"parameters": params} if params else {})}


def _first_then(first: Any, then: Any) -> list[dict[str, Any]]:
    """One filter list that asks ``first`` and, where it gives nothing for a tensor, ``then``."""
    def conds(v: Any) -> list[dict[str, Any]]:
        if isinstance(v, dict):
            return [v]
        if isinstance(v, list) and v and all(isinstance(c, dict) for c in v):
            return list(v)
        return [{"value": v}]
    return conds(first) + conds(then)


def _passthrough(raw: Mapping[str, Any], root: Path, method: str, glob: dict[str, Any]) -> MergePlan:
    """A mergekit ``passthrough`` config: ``slices`` of one model each (or ``models`` with one model), stacked."""
    if method != "passthrough":
        raise MergeConfigError(f"slices: mergeflow stacks slices with merge_method: passthrough only (got {method!r}); "
                               "merge whole models with models:")
    if raw.get("tokenizer") is not None or raw.get("tokenizer_source") not in (None, "base"):
        raise MergeConfigError("tokenizer: a passthrough stack takes its first slice's model's tokenizer; merging "
                               "vocabularies is for merges of whole models (remove tokenizer)")
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
        scopes = [(f"{where}.parameters", src.get("parameters") or {}), (f"{where[:where.rfind('.')]}.parameters",
                                                                        slice_params), ("parameters", glob)]
        scale = None  # the source's, then the slice's, then the config's, each asked where the one before gives none
        for scope, params in reversed(scopes):
            unknown = sorted(set(params) - {"scale"})
            if unknown:
                raise MergeConfigError(f"{scope}.{unknown[0]}: not a parameter of mergekit's passthrough (scale)")
            if "scale" in params:
                value = check_setting(params["scale"], f"{scope}.scale")
                scale = value if scale is None else _first_then(value, scale)
        rng = src.get("layer_range")
        if rng is None and "slices" not in raw:
            rng = [0, layer_count(path)[1]]
        if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(v, int) for v in rng)):
            raise MergeConfigError(f"{where}.layer_range: [START, END] of whole numbers is needed (got {rng!r})")
        slices.append(LayerSlice(path, rng[0], rng[1], scale))
    return MergePlan(base=slices[0].model, experts={}, method="passthrough", params={}, source_format="mergekit",
                     out_dtype=dtype_of(raw.get("out_dtype") or raw.get("dtype"),
                                        "out_dtype" if raw.get("out_dtype") else "dtype"), slices=slices)


def _tokenizer(raw: Mapping[str, Any], root: Path, plan: MergePlan, base: Path | None) -> None:
    """``tokenizer_source`` / ``tokenizer``: union, base, or a model's path (as ``model:NAME`` of that expert)."""
    where = "tokenizer_source" if raw.get("tokenizer_source") is not None else "tokenizer"
    value = raw.get(where)
    if value is None:
        return
    source, pad = tokenizer_setting(value, where)
    if source not in ("union", "base"):
        path = local_path(source, root, f"{where}{'.source' if where == 'tokenizer' else ''}").resolve()
        names = [n for n, p in plan.experts.items() if p.resolve() == path]
        if base is not None and path == base.resolve():
            source = "base"
        elif names:
            source = f"model:{names[0]}"
        else:
            raise MergeConfigError(f"{where}: {value!r} is none of the config's models; give union, base or one of "
                                   "its models")
    plan.tokenizer_source, plan.pad_to_multiple_of = source, pad


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
    if raw.get("tokenizer_source") is not None and raw.get("tokenizer") is not None:
        raise MergeConfigError("tokenizer_source: give tokenizer_source or tokenizer, not both (as mergekit)")
    allowed = MERGEKIT_METHODS[method]
    glob = dict(raw.get("parameters") or {})
    for k, v in glob.items():
        if k not in allowed:
            raise MergeConfigError(f"parameters.{k}: not a parameter of mergekit's {method} "
                                   f"({_its_parameters(allowed)})")
        glob[k] = check_setting(v, f"parameters.{k}")
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
                                       f"({_its_parameters(allowed)})")
            params[k] = check_setting(v, f"models[{i}].parameters.{k}")
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


def _arcee_fusion(m: _MergekitParams, plan: MergePlan, base: Path | None) -> None:
    if len(m.inputs) != 1:
        raise MergeConfigError(f"models: arcee_fusion takes the base_model and exactly one other model "
                               f"(got {len(m.inputs)} others)")
    plan.params = {}
    plan.notes.append("arcee_fusion: quantiles taken exactly; mergekit samples 10^6 entries of larger tensors at "
                      "random, so those tensors may differ slightly")


def _nearswap(m: _MergekitParams, plan: MergePlan, base: Path | None) -> None:
    if len(m.inputs) != 1:
        raise MergeConfigError(f"models: nearswap takes the base_model and exactly one other model (got {len(m.inputs)})")
    plan.params = {"t": float(m.value(0, "t", required=True))}


_MERGEKIT_PARAMS: dict[str, Callable[[_MergekitParams, MergePlan, Path | None], None]] = {
    "linear": _linear, "task_arithmetic": _task_arithmetic, "ties": _ties, "dare_linear": _dare, "dare_ties": _dare,
    "breadcrumbs": _breadcrumbs, "breadcrumbs_ties": _breadcrumbs, "slerp": _slerp, "model_stock": _model_stock,
    "della": _della, "della_linear": _della, "sce": _sce, "nuslerp": _spherical, "multislerp": _spherical,
    "karcher": _karcher, "nearswap": _nearswap, "arcee_fusion": _arcee_fusion,
}


def _its_parameters(allowed: set[str]) -> str:
    return f"its parameters: {', '.join(sorted(allowed))}" if allowed else "it takes none"


def _unique_names(refs: list[str]) -> list[str]:
    base = [Path(r.rstrip("/")).name or f"model{i}" for i, r in enumerate(refs)]
    return [b if base.count(b) == 1 else f"{b}-{i}" for i, b in enumerate(base)]
