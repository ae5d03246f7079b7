"""Griffe extension: the package's reST-flavoured docstrings as Markdown that renders cleanly.

- Sphinx roles (:class:`Box`, :func:`~a.b.f`) become optional cross-references of
  mkdocs-autorefs: a link where the object is documented on the site, plain code where it is
  not (optional references never warn, so ``mkdocs build --strict`` stays quiet). ``~`` shows
  the last part of the name, as in Sphinx; a bare name is taken from the docstring's module.
- Doctests (``>>>`` lines and their output, up to a blank line) become fenced ``pycon`` code,
  so that an output such as ``['[0:2]']`` is not read as a Markdown link.
- reST literal blocks (a paragraph ending in ``::``, then an indented block) become fenced
  ``text`` code after a paragraph ending in one colon, so that a block after a list item is
  still code, not a paragraph of the item.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?P<role>class|func|meth|mod|data|attr|exc|obj):`(?P<target>[^`]+)`")


def _link(match: re.Match[str], module: str) -> str:
    text = match["target"].strip()
    if text.endswith(">") and "<" in text:  # :class:`title <target>`
        title, target = text[:-1].split("<", 1)
        title = " ".join(title.split())
    else:
        target = text
        title = "".join(text.split()).removeprefix("~")
        if text.startswith("~"):
            title = title.rsplit(".", 1)[-1]
    identifier = "".join(target.split()).removeprefix("~").removeprefix(".")
    if not identifier.startswith("unet_volume"):
        identifier = f"{module}.{identifier}"
    if match["role"] in {"func", "meth"} and not title.endswith(")"):
        title = f"{title}()"
    return f'<autoref identifier="{identifier}" optional><code>{title}</code></autoref>'


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _fence_literal_blocks(text: str) -> str:
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line.rstrip().endswith("::"):
            out.append(line)
            continue
        base = _indent(line)
        head = line.rstrip()[:-1]  # "text::" -> "text:"; a lone "::" goes
        if head.strip() != ":":
            out.append(head)
        while i < len(lines) and not lines[i].strip():
            i += 1
        block = []
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
            block.append(lines[i])
            i += 1
        while block and not block[-1].strip():
            block.pop()
        if not block:
            continue
        cut = min(_indent(b) for b in block if b.strip())
        pad = " " * base
        out += ["", f"{pad}```text", *(pad + b[cut:] for b in block), f"{pad}```", ""]
    return "\n".join(out)


def _fence_doctests(text: str) -> str:
    fenced: list[str] = []
    indent: str | None = None  # the open fence's indentation, None outside one
    in_fence = False  # inside a fence already there (a literal block)
    for line in text.splitlines():
        stripped = line.lstrip()
        if indent is None and stripped.startswith("```"):
            in_fence = not in_fence
        if in_fence:
            fenced.append(line)
            continue
        if indent is None and stripped.startswith(">>>"):
            indent = line[: len(line) - len(stripped)]
            fenced.append(f"{indent}```pycon")
        elif indent is not None and not stripped:
            fenced.append(f"{indent}```")
            indent = None
        fenced.append(line)
    if indent is not None:
        fenced.append(f"{indent}```")
    return "\n".join(fenced)


class SphinxRoles(griffe.Extension):
    """Rewrites every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None:
            return
        module = obj.module.path
        text = ROLE.sub(lambda match: _link(match, module), obj.docstring.value)
        text = _fence_literal_blocks(text) if "::" in text else text
        obj.docstring.value = _fence_doctests(text) if ">>>" in text else text
