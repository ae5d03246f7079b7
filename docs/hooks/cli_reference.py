"""MkDocs hook: the command-line reference, written from the argparse parser at build time.

A page holding the line ``<!-- cli-reference -->`` gets, in its place, the ``--help`` of
``unet-volume`` and of each of its commands, as :func:`unet_volume.cli.main.build_parser`
makes them: the page says what the installed command says, so it cannot drift from the code.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

MARKER = "<!-- cli-reference -->"
COLUMNS = "100"  # argparse wraps its help to the terminal's width: the same on every machine


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_reference())


def cli_reference() -> str:
    """Markdown: the command's help, then one section per subcommand with its help."""
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = COLUMNS
    try:
        return "\n".join(_sections())
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved


def _sections() -> list[str]:
    from unet_volume.cli.main import build_parser

    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    lines = [_help_block(parser)]
    for choice in commands._choices_actions:
        name = choice.dest
        lines += [
            f"## unet-volume {name} {{#{name}}}",
            "",
            f"{choice.help[0].upper()}{choice.help[1:]}.",
            "",
            _help_block(commands.choices[name]),
        ]
    return lines


def _help_block(parser: argparse.ArgumentParser) -> str:
    return f"```text\n{parser.format_help().rstrip()}\n```\n"
