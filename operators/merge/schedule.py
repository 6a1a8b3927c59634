"""Parameter values that vary by tensor: mergekit's gradients and filters, evaluated as mergekit 0.1.5 does.

A setting is one of

* a scalar (``0.5``, ``true``): every tensor gets it;
* a **gradient**, a list of scalars (``[0, 0.5, 1]``): the list spread over the layers. A tensor of layer
  ``i`` of ``n`` sits at ``t = i / (n - 1)`` (``t = 1`` when ``n == 1``); tensors outside the layers
  (embeddings, final norm, output head) at ``t = 0``. Numbers interpolate linearly between the two
  neighbouring entries at ``t · (len - 1)``; booleans and strings take the entry at ``int(t · (len - 1))``;
* a **filter** list, ``[{filter: self_attn, value: …}, {value: …}]``: the first entry whose ``filter`` is a
  substring of the tensor's name (or that has no filter, or ``filter: "*"``) gives the value (a scalar or a
  gradient). When none matches, the setting gives nothing, and the next place the parameter may be set
  (a model's parameters, then the config's) is asked, as mergekit does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from operators.merge.config_common import MergeConfigError
from operators.merge.layers import LAYER_RE

Scalar = bool | int | float | str


def is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def varies(setting: Any) -> bool:
    """Whether ``setting`` is a gradient or a filter list (not one value for every tensor)."""
    return isinstance(setting, (list, dict))


def check_setting(setting: Any, where: str) -> Any:
    """``setting`` as given, once its form is one mergekit accepts; a :class:`MergeConfigError` names the key."""
    if is_scalar(setting):
        return setting
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list) or not setting:
        raise MergeConfigError(f"{where}: {setting!r} is not a value, a gradient (a list of values) or a list of "
                               "{filter: NAME_PART, value: …} entries")
    if all(is_scalar(v) for v in setting):
        return setting
    for j, cond in enumerate(setting):
        if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
            raise MergeConfigError(f"{where}[{j}]: {cond!r} is not a {{filter: NAME_PART, value: …}} entry "
                                   "(a filtered setting is a list of them, the last without filter as the fallback)")
        if cond.get("filter") is not None and not isinstance(cond["filter"], str):
            raise MergeConfigError(f"{where}[{j}].filter: a part of a tensor name is needed (got {cond['filter']!r})")
        value = cond["value"]
        if not (is_scalar(value) or (isinstance(value, list) and value and all(is_scalar(v) for v in value))):
            raise MergeConfigError(f"{where}[{j}].value: a value or a gradient (a list of values) is needed "
                                   f"(got {value!r})")
    return setting


def evaluate(setting: Any, tensor_name: str, t: float) -> Scalar | None:
    """The value ``setting`` gives the tensor ``tensor_name`` at layer position ``t`` (None: it gives none)."""
    if isinstance(setting, dict):
        setting = [setting]
    if is_scalar(setting):
        return setting
    if all(is_scalar(v) for v in setting):
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        f = cond.get("filter")
        if f is None or f == "*" or (tensor_name and f in tensor_name):
            return evaluate(cond["value"], tensor_name, t)
    return None


def layer_position(key: str, num_layers: int) -> float:
    """``t`` of the tensor ``key`` in a model of ``num_layers`` layers (0 outside the layers)."""
    m = LAYER_RE.match(key)
    if m is None:
        return 0.0
    return int(m["idx"]) / (num_layers - 1) if num_layers > 1 else 1.0


def resolve(settings: Mapping[str, Any], tensor_name: str, t: float) -> dict[str, Scalar]:
    """Every setting's value for one tensor, those that give none left out."""
    out = {}
    for k, v in settings.items():
        value = evaluate(v, tensor_name, t)
        if value is not None:
            out[k] = value
    return out


__all__ = ["check_setting", "evaluate", "is_scalar", "layer_position", "resolve", "varies"]
