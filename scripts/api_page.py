"""Sphinx extension for the API page (book/api.md): the parts that must follow the code by themselves.

Loaded by ``_config.yml`` (``sphinx.local_extensions``). Two directives:

- ``{vitssl-help}`` renders ``vitssl --help`` as a literal block, ``{vitssl-help} pretrain`` the
  help of one subcommand, and ``{vitssl-help} all`` the command's help followed by every
  subcommand's. The text comes from ``vitssl_core.__main__.build_parser()`` at build time, at a
  fixed width of 100 columns, so the page lists exactly the options the command accepts, and a
  new subcommand appears without an edit.
- ``{vitssl-other-modules}`` documents (autodoc, ``:members:``) every module of ``vitssl_core``
  that no ``automodule`` on the same page names yet, so a new module is never missing from the
  reference; the page's sections place it properly later. With none left, it says so.
"""

from __future__ import annotations

import argparse
import os
import pkgutil
import re
from pathlib import Path

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

WIDTH = 100


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """The ``vitssl`` subcommands' parsers, by name, in the order ``vitssl --help`` lists them."""
    from vitssl_core.__main__ import build_parser

    return dict(build_parser().commands)


def command_help(subcommand: str | None = None) -> str:
    """``vitssl [subcommand] --help`` as text, wrapped at WIDTH columns."""
    from vitssl_core.__main__ import build_parser

    parser = build_parser()
    if subcommand:
        choices = subcommands()
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


def undocumented_modules(page_source: str) -> list[str]:
    """The public ``vitssl_core`` modules that no ``automodule`` in page_source names, sorted."""
    import vitssl_core

    shown = set(re.findall(r"automodule:: (vitssl_core[\w.]*)", page_source))
    names = sorted(m.name for m in pkgutil.iter_modules(vitssl_core.__path__) if not m.name.startswith("_"))
    return [f"vitssl_core.{n}" for n in names if f"vitssl_core.{n}" not in shown]


def _literal(text: str) -> nodes.literal_block:
    block = nodes.literal_block(text, text)
    block["language"] = "text"
    return block


class VitsslHelp(SphinxDirective):
    optional_arguments = 1

    def run(self) -> list[nodes.Node]:
        which = self.arguments[0] if self.arguments else None
        try:
            if which != "all":
                return [_literal(command_help(which))]
            out: list[nodes.Node] = [_literal(command_help())]
            for name in subcommands():
                out += [nodes.rubric(text=f"vitssl {name}"), _literal(command_help(name))]
            return out
        except ValueError as err:
            raise self.error(str(err)) from err


class OtherModules(SphinxDirective):
    def run(self) -> list[nodes.Node]:
        source = Path(self.env.doc2path(self.env.docname)).read_text(encoding="utf-8")
        missing = undocumented_modules(source)
        if not missing:
            return [nodes.paragraph(text="None: every module of the package is documented above.")]
        # A MyST page parses nested content as MyST, so autodoc's reStructuredText goes in eval-rst.
        text = "\n\n".join(f"```{{eval-rst}}\n.. automodule:: {name}\n   :members:\n```" for name in missing)
        container = nodes.container()
        lines = StringList(text.splitlines(), source=self.get_source_info()[0])
        self.state.nested_parse(lines, self.content_offset, container)
        return container.children


def setup(app: Sphinx) -> dict:
    app.add_directive("vitssl-help", VitsslHelp)
    app.add_directive("vitssl-other-modules", OtherModules)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
