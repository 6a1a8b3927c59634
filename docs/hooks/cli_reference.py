"""MkDocs hook: the command-line reference, generated from the click group ``pipeline.cli:main``.

``<!-- cli-reference -->`` in a page is replaced by one section per verb (``mergeflow <verb>``): its
usage line, its help text and a table of its arguments and options (their help, default and
choices), read from click's own objects (``main.commands``, ``cmd.params``, ``param.opts``,
``param.help``, ``cmd.help``) at build time, so the page cannot drift from the CLI.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

MARKER = "<!-- cli-reference -->"
ROOT = Path(__file__).resolve().parents[2]  # the repository (docs/hooks/ -> repository root)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs' signature)
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_reference())


def cli_group():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from pipeline.cli import main

    return main


# The order verbs are listed in (a verb missing here is still listed, after these).
ORDER = ("validate", "run", "resume", "compare", "status", "ui", "export", "merge", "submit", "jobs", "logs",
         "stop", "contribute", "round", "schedule", "history")


def cli_reference() -> str:
    """One section per module that defines verbs (titled by its docstring), one subsection per verb."""
    import click

    main = cli_group()
    root = click.Context(main, info_name="mergeflow", **(main.context_settings or {}))
    verbs = sorted((n for n, c in main.commands.items() if not getattr(c, "hidden", False)),
                   key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    groups: dict[str, list[str]] = {}
    for name in verbs:  # modules in the order of their first verb
        groups.setdefault(getattr(main.commands[name].callback, "__module__", ""), []).append(name)
    out: list[str] = []
    for module, names in groups.items():
        out += [f"### {_title(module)}", "", "Defined in `" + _source(main.commands[names[0]]) + "`: "
                + ", ".join(f"[`{n}`](#mergeflow-{n})" for n in names) + ".", ""]
        for name in names:
            out += _verb(main.commands[name], name, root)
    return "\n".join(out) + "\n"


def _verb(cmd, name: str, root) -> list[str]:
    import click

    ctx = click.Context(cmd, info_name=name, parent=root)
    usage = " ".join([ctx.command_path, *cmd.collect_usage_pieces(ctx)])
    out = [f"#### `mergeflow {name}`", "", "```", usage, "```", ""]
    for paragraph in _help(cmd.help):
        out += [_escape(paragraph), ""]
    out += ["| argument / option | default | help |", "|---|---|---|"]
    out += [f"| {a} | {d} | {h} |" for a, d, h in
            (_param_row(p) for p in cmd.get_params(ctx) if not getattr(p, "hidden", False))]
    return out + [""]


def _title(module: str) -> str:
    """A verb group's title: its module docstring up to the first ':' or ' (' (``Running workflows``)."""
    doc = (getattr(sys.modules.get(module), "__doc__", None) or "").strip()
    title = " ".join(doc.split("\n\n", 1)[0].split())
    for stop in (":", " ("):
        title = title.split(stop, 1)[0]
    title = title.replace("``", "`").rstrip(".")
    return title or f"`{module}`"


def _source(cmd) -> str:
    """The file that defines the verb, relative to the repository (``pipeline/cli/run.py``)."""
    module = sys.modules.get(getattr(cmd.callback, "__module__", ""), None)
    path = Path(getattr(module, "__file__", "") or "")
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return getattr(cmd.callback, "__module__", "?")


def _help(text: str | None) -> list[str]:
    """click's help as it prints it: up to a form feed, dedented; one string per paragraph."""
    if not text:
        return []
    text = inspect.cleandoc(text.split("\f", 1)[0])
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


def _param_row(p) -> tuple[str, str, str]:
    import click

    if isinstance(p, click.Argument):
        name = f"`{(p.metavar or p.name).upper()}`"
        default = "(required)" if p.required else "(optional)"
        help_text = _escape(getattr(p, "help", None) or "")
        return name, default, help_text + _choices(p)
    opts = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
    if not p.is_flag and not isinstance(p.type, click.Choice):  # a choice's values are listed in its help
        opts += f" `{p.metavar or p.type.name.upper()}`"
    help_text = _escape(p.help or "")
    if p.multiple and "repeat" not in help_text:
        help_text += " May be given more than once."
    if p.required:
        default = "(required)"
    elif p.is_eager and p.is_flag:  # --help, --version: no default to speak of
        default = ""
    else:
        default = _default(p)
    return opts, default, (help_text + _choices(p)).strip()


def _choices(p) -> str:
    import click

    if isinstance(p.type, click.Choice):
        return " One of: " + ", ".join(f"`{c}`" for c in p.type.choices) + "."
    return ""


def _unset(value: Any) -> bool:
    # click 8.2+ marks "no default" with a sentinel (click._utils.UNSET), older clicks with None
    return value is None or type(value).__name__ == "Sentinel" or repr(value).endswith("UNSET")


def _default(p) -> str:
    if p.is_flag:
        return "off" if _unset(p.default) or not p.default else "on"
    if _unset(p.default) or p.default == () or p.default == "":
        return ""
    return f"`{p.default}`"


def _escape(text: str) -> str:
    """Plain help text as Markdown (table-safe, no HTML, no emphasis)."""
    for a, b in (("\\", "\\\\"), ("|", "\\|"), ("<", "&lt;"), ("*", "\\*"), ("_", "\\_"), ("`", "\\`")):
        text = text.replace(a, b)
    return " ".join(text.split())
