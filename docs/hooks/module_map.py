"""MkDocs hook: the package's layers and their modules, read from the source at build time.

A page holding the line ``<!-- module-map -->`` gets, in its place, one table per layer of
``unet_volume`` (the order of ``LAYERS`` in ``tests/test_layering.py``, which checks it), each
module with the first sentence of its docstring. Read with :mod:`ast`, nothing is imported, so
the map follows the code as it is.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

MARKER = "<!-- module-map -->"
ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "unet_volume"
LAYERING = ROOT / "tests" / "test_layering.py"
ROLE = re.compile(r":(?:py:)?[a-z]+:`~?([^`]+)`")


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, module_map())


def module_map() -> str:
    """Markdown: a section per layer, bottom first, with a table of its modules."""
    sections = []
    for layer in layers():
        folder = PACKAGE / layer if layer else PACKAGE
        title = f"`{layer}/`" if layer else "the vocabulary (modules at the top of `unet_volume/`)"
        package = _summary(folder / "__init__.py") if layer else ""
        rows = [
            f"| `{_module_name(path)}` | {_summary(path)} |"
            for path in sorted(folder.glob("*.py"))
            if path.name not in {"__init__.py", "__main__.py"}
        ]
        head = [f"### {title}", "", package, ""] if package else [f"### {title}", ""]
        sections.append("\n".join([*head, "| module | what |", "| --- | --- |", *rows]))
    return "\n\n".join(sections) + "\n"


def layers() -> list[str]:
    """``LAYERS`` of the layering test, the package's folders from the bottom up."""
    for node in ast.parse(LAYERING.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "LAYERS" for t in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise LookupError(f"no LAYERS in {LAYERING}")


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _summary(path: Path) -> str:
    """The docstring's first paragraph, as one line; past 200 characters, its first sentence."""
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    text = " ".join(docstring.split("\n\n", 1)[0].split())
    if len(text) > 200:
        text = re.split(r"(?<=\.)\s(?=[A-Z])", text, maxsplit=1)[0]
    return ROLE.sub(r"`\1`", text).replace("|", "\\|")
