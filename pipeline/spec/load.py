"""Reading a spec: YAML or a mapping in, a validated :class:`Workflow` or one :class:`SpecError` out,
with one line per problem (field path, value received, fix)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.spec.common import SpecError
from pipeline.spec.workflow import Workflow


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith("function-"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _describe(err: dict[str, Any], data: Any) -> str:
    loc = _format_loc(tuple(err.get("loc", ())))
    msg = str(err.get("msg", "")).removeprefix("Value error, ")
    kind = err.get("type", "")
    value = err.get("input")
    # validators that check several fields name the exact sub-field at the start of their message
    sub = re.match(r"^((?:params|merge|tasks|rounds|base_model|finetune|evaluation)[\w\[\].]*): (.*)$", msg, re.S)
    if sub:
        inner, msg = sub.group(1), sub.group(2)
        loc = inner if loc == "(top level)" else f"{loc}.{inner}"
        return f"{loc}: {msg}" + ("" if msg.endswith(".") else ".")
    if kind == "extra_forbidden":
        return f"{loc}: unknown key (got {value!r}). Remove it or check its spelling against the README's spec reference."
    if kind == "missing":
        return f"{loc}: required field is missing."
    if kind == "literal_error":
        return f"{loc}: {msg} (got {value!r})."
    if isinstance(value, (str, int, float, bool)) or value is None:
        if "(got " not in msg:
            return f"{loc}: {msg} (got {value!r})."
    return f"{loc}: {msg}."


def parse_workflow(data: Any, source: str = "<spec>") -> Workflow:
    """Validate a parsed YAML/JSON mapping into a :class:`Workflow`.

    Args:
        data: The mapping read from the spec file.
        source: Where it came from, for error messages.

    Returns:
        The frozen, validated workflow.

    Raises:
        SpecError: with one line per problem.
    """
    if not isinstance(data, dict):
        raise SpecError(source, [f"(top level): a workflow spec is a mapping of keys (got {type(data).__name__})."])
    try:
        return Workflow.model_validate(data)
    except ValidationError as exc:
        raise SpecError(source, [_describe(e, data) for e in exc.errors()]) from None


def load_workflow(path: str | Path, overrides: dict[str, Any] | None = None) -> Workflow:
    """Read and validate a workflow spec file.

    Args:
        path: A YAML (or JSON) file.
        overrides: Dotted keys to set before validation, e.g. ``{"tracking.uri": "sqlite:///x.db"}``.

    Returns:
        The validated workflow.

    Raises:
        SpecError: when the file is missing, is not YAML, or breaks a rule.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(str(path), [f"(file): no such spec file {str(path)!r}. Check the path; shipped specs are in workflows/."])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise SpecError(str(path), [f"(file): not a text file (byte {exc.start} is not UTF-8); a spec is YAML text: "
                                    "check the path (shipped specs are in workflows/)"]) from None
    except yaml.YAMLError as exc:
        raise SpecError(str(path), [f"(file): not valid YAML: {exc}"]) from None
    if overrides and isinstance(data, dict):
        for dotted, value in overrides.items():
            if value is None:
                continue
            node = data
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
    wf = parse_workflow(data, str(path))
    return wf
