"""Sphinx extension for the API page: the ``vitssl`` command's help, taken from its parser.

Loaded by ``_config.yml`` (``sphinx.local_extensions``). The directive

    ```{vitssl-help} pretrain
    ```

renders ``vitssl pretrain --help`` as a literal block (no argument: ``vitssl --help``). The text
comes from ``vitssl_core.__main__.build_parser()`` at build time, so the page lists exactly the
options the installed command accepts, at a fixed width of 100 columns.
"""

from __future__ import annotations

import argparse
import os

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

WIDTH = 100


def command_help(subcommand: str | None = None) -> str:
    """``vitssl [subcommand] --help`` as text, wrapped at WIDTH columns."""
    from vitssl_core.__main__ import build_parser

    parser = build_parser()
    if subcommand:
        choices = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        if subcommand not in choices:
            raise ValueError(f"vitssl has no subcommand {subcommand!r}; it has {', '.join(choices)}")
        parser = choices[subcommand]
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)  # argparse wraps at the terminal width it reads from COLUMNS
    try:
        return parser.format_help().rstrip()
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


class VitsslHelp(SphinxDirective):
    optional_arguments = 1

    def run(self) -> list[nodes.Node]:
        try:
            text = command_help(self.arguments[0] if self.arguments else None)
        except ValueError as err:
            raise self.error(str(err)) from err
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


def setup(app: Sphinx) -> dict:
    app.add_directive("vitssl-help", VitsslHelp)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
