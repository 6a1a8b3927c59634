"""MkDocs hook: the workflow spec reference, generated from the pydantic models.

``<!-- spec-reference -->`` in a page is replaced by one table row per field of
``pipeline.spec.Workflow``, walked recursively: nested models (``finetune.lora.r``), lists of models
(``tasks[].dataset.source``), optional models (``recurring.schedule.cron``) and dicts of models
(``key.<name>.field``). Each row gives the dotted key, the accepted values (from the annotation and its
bounds), the default as YAML-ish text (``(required)`` when required) and the field's ``description``.
The table is read from the code at build time, so it cannot drift from what ``mergeflow validate``
accepts.
"""

from __future__ import annotations

import enum
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any

MARKER = "<!-- spec-reference -->"
ROOT = Path(__file__).resolve().parents[2]  # the repository (docs/hooks/ -> repository root)
log = logging.getLogger("mkdocs.hooks.spec_reference")


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs' signature)
    if MARKER not in markdown:
        return markdown
    table, empty = spec_reference_table()
    if empty:  # info, not a warning: strict mode would fail the build on a missing description
        log.info("spec reference: %d of its fields have no description yet", empty)
    return markdown.replace(MARKER, table)


# --- walking the models ----------------------------------------------------------------------------


def spec_reference_rows() -> list[tuple[str, str, str, str]]:
    """``(key, values, default, description)`` for every field of the workflow spec, in spec order."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from pipeline.spec import Workflow

    rows: list[tuple[str, str, str, str]] = []
    _walk(Workflow, "", rows, stack=())
    return rows


def spec_reference_table() -> tuple[str, int]:
    """The Markdown table, and how many of its rows have no description."""
    rows = spec_reference_rows()
    lines = ["| key | values | default | description |", "|---|---|---|---|"]
    for key, values, default, description in rows:
        lines.append(f"| `{key}` | {values} | {default} | {_cell(description)} |")
    return "\n".join(lines) + "\n", sum(1 for r in rows if not r[3])


def _walk(model: type, prefix: str, rows: list, stack: tuple, defaults: Any = None) -> None:
    """Rows for ``model``'s fields under ``prefix``. ``defaults``: the section's own default value when it
    has one (``rounds.merge`` defaults to ``{method: linear}``, so ``rounds.merge.method`` does too)."""
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        ann = field.annotation
        if isinstance(defaults, model) and not field.is_required():
            default = _default_text(getattr(defaults, name))
        else:
            default = _default(field)
        rows.append((key, _values(ann, field.metadata), default, (field.description or "").strip()))
        if model in stack:  # a model nested in itself: list its fields once
            continue
        own = _default_value(field)
        for suffix, sub in _nested_models(ann):
            sub_defaults = getattr(defaults, name, None) if isinstance(defaults, model) else own
            _walk(sub, f"{key}{suffix}.", rows, stack + (model,), sub_defaults if suffix == "" else None)


def _args(ann: Any) -> tuple:
    return typing.get_args(ann)


def _origin(ann: Any) -> Any:
    return typing.get_origin(ann)


def _strip(ann: Any) -> Any:
    """``Annotated[X, ...]`` -> X."""
    while _origin(ann) is typing.Annotated:
        ann = _args(ann)[0]
    return ann


def _is_union(ann: Any) -> bool:
    return _origin(ann) in (typing.Union, types.UnionType)


def _is_model(ann: Any) -> bool:
    from pydantic import BaseModel

    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _nested_models(ann: Any) -> list[tuple[str, type]]:
    """The models a field holds, with the key suffix that reaches them: '' (a model, optional or not),
    '[]' (a list of models), '.<name>' (a dict of models)."""
    ann = _strip(ann)
    if _is_model(ann):
        return [("", ann)]
    if _is_union(ann):
        out = []
        for a in _args(ann):
            out += [m for m in _nested_models(a) if m not in out]
        return out
    origin = _origin(ann)
    if origin in (list, tuple, set, frozenset) or (origin is not None and _is_sequence(origin)):
        return [("[]" + s, m) for a in _args(ann) if a is not Ellipsis for s, m in _nested_models(a)]
    if origin is dict or (origin is not None and _is_mapping(origin)):
        args = _args(ann)
        return [(".<name>" + s, m) for s, m in _nested_models(args[1])] if len(args) == 2 else []
    return []


def _is_sequence(origin: Any) -> bool:
    import collections.abc as abc

    return isinstance(origin, type) and issubclass(origin, abc.Sequence) and not issubclass(origin, str)


def _is_mapping(origin: Any) -> bool:
    import collections.abc as abc

    return isinstance(origin, type) and issubclass(origin, abc.Mapping)


# --- rendering ------------------------------------------------------------------------------------


def _type_name(ann: Any) -> str:
    ann = _strip(ann)
    if ann is type(None):
        return "null"
    if ann is Any:
        return "any"
    if _origin(ann) is typing.Literal:
        return " or ".join(f"`{_yaml(v)}`" for v in _args(ann))
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        return " or ".join(f"`{_yaml(m.value)}`" for m in ann)
    if _is_union(ann):
        parts = [a for a in _args(ann) if a is not type(None)]
        text = " or ".join(_type_name(a) for a in parts)
        return text
    if _is_model(ann):
        return "section"
    origin = _origin(ann)
    if origin is not None:
        args = [a for a in _args(ann) if a is not Ellipsis]
        if origin is dict or _is_mapping(origin):
            return f"map of {_type_name(args[0])} to {_type_name(args[1])}" if len(args) == 2 else "map"
        if origin in (list, tuple, set, frozenset) or _is_sequence(origin):
            return f"list of {_plural(_type_name(args[0]))}" if args else "list"
    return {str: "string", int: "integer", float: "number", bool: "`true` or `false`"}.get(
        ann, getattr(ann, "__name__", str(ann)))


def _plural(name: str) -> str:
    return {"section": "sections", "string": "strings", "integer": "integers", "number": "numbers"}.get(name, name)


def _bounds(metadata: list) -> str:
    """The annotated-types bounds pydantic keeps for ``Field(gt=..., ge=..., lt=..., le=..., min_length=...)``."""
    signs = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}
    out = []
    for m in metadata:
        for attr, sign in signs.items():
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sign} {_yaml(v)}")
        if getattr(m, "min_length", None) is not None:
            out.append(f"at least {m.min_length} item{'s' if m.min_length != 1 else ''}")
        if getattr(m, "max_length", None) is not None:
            out.append(f"at most {m.max_length} items")
    return ", ".join(out)


def _values(ann: Any, metadata: list) -> str:
    text = _type_name(ann)
    # bounds may also sit inside Annotated[...] of the annotation itself
    inner = []
    a = ann
    while _origin(a) is typing.Annotated:
        inner += list(_args(a)[1:])
        a = _args(a)[0]
    bounds = _bounds(list(metadata) + inner)
    return f"{text} ({bounds})" if bounds else text


def _default_value(field) -> Any:
    """The field's default (its factory called), or None when it is required or computed."""
    if field.is_required():
        return None
    if field.default_factory is not None:
        try:
            return field.default_factory()
        except TypeError:  # a factory that wants the validated data
            return None
    return field.default


def _default(field) -> str:
    from pydantic_core import PydanticUndefined

    if field.is_required() or field.default is PydanticUndefined and field.default_factory is None:
        return "(required)"
    if field.default_factory is not None:
        try:
            field.default_factory()
        except TypeError:  # a factory that wants the validated data: not a fixed default
            return "(computed)"
    return _default_text(_default_value(field))


def _default_text(value: Any) -> str:
    return "none" if value is None else f"`{_yaml(value)}`"


def _yaml(value: Any) -> str:
    """A value as one would write it in the spec (flow-style YAML)."""
    if _is_model(type(value)):
        # only what differs from the model's own defaults: rounds.merge -> {method: linear}
        cls = type(value)
        changed = {}
        for name, f in cls.model_fields.items():
            v = getattr(value, name)
            try:
                d = f.get_default(call_default_factory=True)
            except TypeError:
                d = object()
            if f.is_required() or v != d:
                changed[f.alias or name] = v
        return _yaml(changed)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return _yaml(value.value)
    if isinstance(value, float):
        if value.is_integer():  # 16.0 -> 16, 1e6 -> 1e6: what one would write in the spec
            return f"{value:.0e}".replace("e+0", "e") if abs(value) >= 1e5 else str(int(value))
        text = repr(value)
        if "e" in text:
            mant, exp = text.split("e")
            text = f"{mant}e{int(exp)}"
        return text
    if isinstance(value, int):
        return str(value)
    if value is None:
        return "null"
    if isinstance(value, str):
        return '""' if value == "" else value
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_yaml(k)}: {_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple, set, frozenset)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return str(value)


def _cell(text: str) -> str:
    """One table cell: on one line; outside code spans, pipes escaped and '<' kept as text (not HTML)."""
    parts = " ".join(text.split()).split("`")
    for i in range(0, len(parts), 2):  # even parts are outside backticks
        parts[i] = parts[i].replace("|", "\\|").replace("<", "&lt;")
    return "`".join(parts)
