"""The documentation stays true: the site builds, and every command it quotes exists.

- The MkDocs site (``mkdocs.yml``, pages in ``docs/``) builds with ``--strict``: no broken link or
  anchor, every page in the nav, and the generated spec and CLI references in place. Skipped, with
  the reason, where MkDocs or its Material theme is not installed. A few seconds.
- Every ``mergeflow VERB ...`` quoted in a code span or block of README.md and docs/*.md names a verb
  of ``pipeline.cli:main``, and every ``--option`` it quotes is an option of that verb; every
  ``workflows/...`` path quoted exists, and every ``make TARGET`` quoted is a target of the Makefile.
  Read in process (no subprocess), well under a second.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# paths quoted as examples of what a user might have, not files of this repository
EXAMPLE_PATHS = {"workflows/x.yaml"}  # docs/spec.md: the example error message of a spec with two mistakes

FENCE = re.compile(r"^[ \t]*(```|~~~)[^\n]*\n(.*?)^[ \t]*\1[ \t]*$", re.S | re.M)
SPAN = re.compile(r"(?<!`)`([^`\n]+(?:\n(?![ \t]*\n)[^`\n]*)*)`(?!`)")  # one backtick, may wrap lines
# `mergeflow VERB` where a command starts: a line's or span's start (after `$ `, `VAR=value ` or a path such
# as `.venv/bin/`), or after `|`, `;`, `&&`, `(`; not "a mergeflow or mergekit config" in a description
COMMAND = re.compile(r"(?:^|(?<=[|;&(]))[ \t]*(?:\$[ \t]+)?(?:\w+=\S*[ \t]+)*(?:[\w.~/-]*/)?"
                     r"mergeflow[ \t]+((?:--?)?[a-z][\w-]*(?:/[a-z][\w-]*)*)", re.M)
OPTION = re.compile(r"(?<![\w-])--[a-z][\w-]*")
MAKE = re.compile(r"(?<![\w./-])make[ \t]+([a-z][\w-]*)")
WORKFLOW_PATH = re.compile(r"(?<![\w/.-])workflows/[\w./-]*\w")


def code_snippets(text: str) -> list[str]:
    """The text of every fenced block (one string per logical line) and every inline code span."""
    out: list[str] = []
    for m in FENCE.finditer(text):
        body = re.sub(r"\\\n", " ", m.group(2))  # shell line continuations
        out += [re.split(r"[ \t]#", line, maxsplit=1)[0] for line in body.splitlines()]  # comments dropped
    rest = FENCE.sub("", text)
    out += [" ".join(m.group(1).split()) for m in SPAN.finditer(rest)]
    return out


def quoted_commands(snippet: str) -> list[tuple[str, list[str]]]:
    """``(verb, [--options])`` for each ``mergeflow VERB`` in the snippet: the options up to the next
    ``mergeflow`` or the end of the command (``|``, ``;``, ``&&``)."""
    out = []
    matches = list(COMMAND.finditer(snippet))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(snippet)
        tail = re.split(r"\||;|&&", snippet[m.end():end], maxsplit=1)[0]
        for verb in m.group(1).split("/"):  # `mergeflow round/schedule/history`
            out.append((verb, OPTION.findall(tail)))
    return out


def _pages() -> list[tuple[str, str]]:
    return [(p.relative_to(ROOT).as_posix(), p.read_text(encoding="utf-8")) for p in PAGES]


def _options(command) -> set[str]:
    import click

    opts: set[str] = set()
    for p in command.params:
        if isinstance(p, click.Option):
            opts |= {o for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}
    return opts | {"--help"}


def _make_targets() -> set[str]:
    targets: set[str] = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_][\w. -]*?)[ \t]*:(?!=)", line)
        if m and "$(" not in m.group(1):
            targets |= set(m.group(1).split())
    return targets


def test_pages_exist():
    assert (ROOT / "mkdocs.yml").is_file()
    assert len(PAGES) > 5, PAGES


def test_quoted_mergeflow_commands_exist():
    from pipeline.cli import main

    problems, seen = [], 0
    for page, text in _pages():
        for snippet in code_snippets(text):
            for verb, options in quoted_commands(snippet):
                seen += 1
                if verb.startswith("-"):  # an option of the group itself (mergeflow --version)
                    command, options, verb = main, [verb, *options], "(group)"
                elif verb not in main.commands:
                    problems.append(f"{page}: `mergeflow {verb}` is not a verb (verbs: {', '.join(sorted(main.commands))})"
                                    f" in: {snippet.strip()[:120]}")
                    continue
                else:
                    command = main.commands[verb]
                bad = sorted(set(options) - _options(command))
                if bad:
                    problems.append(f"{page}: `mergeflow {verb}` has no option {', '.join(bad)} "
                                    f"(it has {', '.join(sorted(_options(command)))}) in: {snippet.strip()[:120]}")
    assert seen > 20, f"only {seen} quoted commands found: is the scanner broken?"
    assert not problems, "\n".join(problems)


def test_quoted_workflow_paths_and_make_targets_exist():
    targets = _make_targets()
    assert {"quickstart", "test"} <= targets, targets
    problems = []
    for page, text in _pages():
        for snippet in code_snippets(text):
            for path in WORKFLOW_PATH.findall(snippet):
                if path not in EXAMPLE_PATHS and not (ROOT / path).exists():
                    problems.append(f"{page}: {path} does not exist")
            for target in MAKE.findall(snippet):
                if target not in targets:
                    problems.append(f"{page}: `make {target}`: no such target in the Makefile "
                                    f"(targets: {', '.join(sorted(targets))})")
    assert not problems, "\n".join(problems)


def test_scanner_reads_what_a_reader_sees():
    text = ("Run `mergeflow compare SPEC --strategies a\n--merges b` or:\n\n```bash\n"
            "mergeflow merge CONFIG OUT     merge from a mergeflow or mergekit config\n"
            "$ .venv/bin/mergeflow ui SPEC --port 5001\n"
            "mergeflow run workflows/quickstart.yaml --address auto   # --not-an-option in a comment\n"
            "mergeflow submit SPEC \\\n  --wait\n```\n\nand `mergeflow round/schedule/history`; `make lint`.\n")
    commands = [c for s in code_snippets(text) for c in quoted_commands(s)]
    assert ("compare", ["--strategies", "--merges"]) in commands
    assert ("run", ["--address"]) in commands
    assert ("ui", ["--port"]) in commands and "or" not in {v for v, _ in commands}
    assert ("submit", ["--wait"]) in commands
    assert {"round", "schedule", "history"} <= {v for v, _ in commands}
    assert not any("--not-an-option" in o for _, o in commands)
    assert [t for s in code_snippets(text) for t in MAKE.findall(s)] == ["lint"]


def _hook(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", ROOT / "docs" / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_spec_reference_lists_every_field():
    rows = _hook("spec_reference").spec_reference_rows()
    keys = [r[0] for r in rows]
    assert len(keys) == len(set(keys)), "a key is listed twice"
    for key in ("name", "tasks[].dataset.source", "tasks[].dataset.template.prompt", "finetune.lora.r",
                "merge.heads.ridge", "rounds.merge.method", "recurring.schedule.cron", "store.root"):
        assert key in keys, key
    default = {r[0]: r[2] for r in rows}
    assert default["name"] == "(required)"
    assert default["rounds.merge.method"] == "`linear`"  # the section's own default, not the class's
    assert default["merge.method"] == "`task_arithmetic`"
    assert default["recurring"] == "none"


def test_generated_cli_reference_lists_every_verb_and_option():
    from pipeline.cli import main

    text = _hook("cli_reference").cli_reference()
    for name, command in main.commands.items():
        if command.hidden:
            continue
        assert f"`mergeflow {name}`" in text, name
        for p in command.params:
            if not getattr(p, "hidden", False):
                for opt in getattr(p, "opts", []):
                    if opt.startswith("-"):
                        assert f"`{opt}`" in text, (name, opt)


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
                    reason="MkDocs with the Material theme is not installed (pip install 'mkdocs>=1.6' "
                           "'mkdocs-material>=9.5'); the site build is not checked")
def test_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    spec_page = (site / "spec" / "index.html").read_text(encoding="utf-8")
    assert "tasks[].dataset.source" in spec_page and "<!-- spec-reference -->" not in spec_page
    cli_page = (site / "cli" / "index.html").read_text(encoding="utf-8")
    assert "mergeflow validate" in cli_page and "<!-- cli-reference -->" not in cli_page
    assert (site / "lineage.png").is_file() and (site / "recurring-history.png").is_file()
    assert not (site / "hooks").exists() and not (site / "make_lineage_png.py").exists()
