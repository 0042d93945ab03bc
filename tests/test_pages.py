"""Tests of the book's pages as a reader meets them: length, navigation, the API page, the glossary.

They read the sources only (``_toc.yml``, the notebooks' cells, the Markdown pages); nothing is
executed or built, so they take well under a second.

- Length: STYLE.md allows one idea in at most 3,000 words of prose per page. Prose is every
  Markdown cell of a notebook, or the whole of a Markdown page, hints, maths and code fences
  included; words are whitespace-separated tokens (as the reviews count them). Moving prose into
  code comments or hidden cells is not shortening, and this count does not reward it either way.
- Navigation: chapters link by name (``{doc}``), never "next chapter" / "previous chapter",
  which go stale whenever the table of contents is reordered.
- API: every name a chapter imports from ``vitssl_core`` is documented on ``book/api.md``.
- Glossary: every entry carries its Chinese term.
- Plotting: a code cell that draws a figure is folded (``hide-input``), so the reader sees the idea
  cells and the pictures (STYLE.md, "Notebooks").
"""

import ast
import importlib
import importlib.util
import inspect
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MAX_WORDS = 3000


def toc_pages() -> list[Path]:
    """Every page _toc.yml builds, in its order: the root, then each part's chapters."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    stems = [toc["root"]]

    def walk(entries):
        for entry in entries:
            if "file" in entry:
                stems.append(entry["file"])
            walk(entry.get("sections", []))

    for part in toc.get("parts", []):
        walk(part.get("chapters", []))
    pages = []
    for stem in stems:
        found = [ROOT / f"{stem}{ext}" for ext in (".ipynb", ".md") if (ROOT / f"{stem}{ext}").is_file()]
        assert len(found) == 1, f"_toc.yml names {stem!r}: expected one .ipynb or .md file, found {found}"
        pages.append(found[0])
    return pages


def cells(page: Path, kind: str) -> list[str]:
    """The sources of a notebook's cells of one kind ('markdown' or 'code'); a .md page is one markdown cell."""
    if page.suffix == ".md":
        return [page.read_text(encoding="utf-8")] if kind == "markdown" else []
    nb = json.loads(page.read_text(encoding="utf-8"))
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == kind]


def prose_words(page: Path) -> int:
    return sum(len(text.split()) for text in cells(page, "markdown"))


def rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def test_toc_has_the_pages_this_file_counts():
    pages = {rel(p) for p in toc_pages()}
    assert {"book/zh_guide.md", "book/gpus.md", "book/api.md", "book/glossary.md"} <= pages


def test_prose_words_counts_markdown_cells_only(tmp_path):
    nb = {
        "cells": [
            {"cell_type": "markdown", "metadata": {}, "source": ["# Title\n", "two words $x^2$\n"]},
            {"cell_type": "code", "metadata": {}, "source": ["# a comment is not prose\n"], "outputs": []},
            {"cell_type": "markdown", "metadata": {}, "source": [":::{admonition} Hint\n", "hidden too\n", ":::"]},
        ]
    }
    path = tmp_path / "page.ipynb"
    path.write_text(json.dumps(nb), encoding="utf-8")
    assert prose_words(path) == 5 + 5  # "# Title two words $x^2$" + ":::{admonition} Hint hidden too :::"


def over_limit() -> dict[str, int]:
    counts = {rel(page): prose_words(page) for page in toc_pages()}
    return {name: n for name, n in counts.items() if n > MAX_WORDS}


def test_no_page_exceeds_3000_words_of_prose():
    long = over_limit()
    assert long == {}, f"pages over {MAX_WORDS} words of prose (split them, STYLE.md): {long}"


STALE = re.compile(r"\b(next|previous)\s+chapters?\b", re.IGNORECASE)


def test_no_page_says_next_or_previous_chapter():
    found = []
    for page in toc_pages():
        for kind in ("markdown", "code"):
            for text in cells(page, kind):
                found += [
                    f"{rel(page)}: ...{text[max(0, m.start() - 40) : m.end() + 20]!r}" for m in STALE.finditer(text)
                ]
    assert found == [], "name the chapter with {doc} instead:\n" + "\n".join(found)


def test_stale_phrase_pattern_catches_both_forms():
    assert STALE.search("The next chapter shows both")
    assert STALE.search("the previous\nchapters argued")
    assert not STALE.search("{doc}`concepts` shows both; later chapters train it")


# --------------------------------------------------------------------------- plotting is folded
PLT_DRAWING = {"subplots", "subplot", "figure", "show", "imshow"}
FIGURE_NAME = re.compile(r"^(ax|axs|axes|fig)(\d+|_\w+)?$")  # ax, axes, fig, ax2, fig_attn, ...
FOLDED = {"hide-input", "remove-input", "remove-cell"}


def drawing_calls(source: str) -> list[str]:
    """What a code cell draws at its top level: ``plt.subplots(...)``, ``x.imshow``, ``axes[0].set_title``, ...

    Top level means outside any ``def``, ``class`` or ``lambda`` body; loops, ``with`` and ``if``
    blocks count. Lines that are IPython magics or shell escapes are read as ``pass``.
    """
    lines = [
        line[: len(line) - len(line.lstrip())] + "pass" if line.lstrip().startswith(("%", "!")) else line
        for line in source.splitlines()
    ]
    found = set()
    stack = list(ast.iter_child_nodes(ast.parse("\n".join(lines))))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue  # a helper that draws when it is called later
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            func = node.func
            if isinstance(func.value, ast.Name) and func.value.id == "plt" and func.attr in PLT_DRAWING:
                found.add(f"plt.{func.attr}")
            elif func.attr == "imshow":
                found.add(".imshow")
        if isinstance(node, ast.Attribute):
            owner = node.value.value if isinstance(node.value, ast.Subscript) else node.value
            if isinstance(owner, ast.Name) and FIGURE_NAME.match(owner.id):
                found.add(f"{owner.id}.{node.attr}")
    return sorted(found)


def unfolded_drawing_cells(page: Path) -> list[str]:
    """'page cell i (id): calls' for each code cell of a notebook that draws and is not folded."""
    if page.suffix != ".ipynb":
        return []
    nb = json.loads(page.read_text(encoding="utf-8"))
    found = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code" or FOLDED & set(cell["metadata"].get("tags", [])):
            continue
        calls = drawing_calls("".join(cell["source"]))
        if calls:
            found.append(f"{rel(page)} cell {i} ({cell.get('id')}): {', '.join(calls[:5])}")
    return found


def test_every_cell_that_draws_is_folded():
    """A code cell that draws at its top level carries ``hide-input`` (or ``remove-input``/``remove-cell``).

    The rule: a cell draws when, outside any ``def``/``class``/``lambda`` body, it calls
    ``plt.subplots``, ``plt.subplot``, ``plt.figure``, ``plt.show`` or ``plt.imshow``, calls
    ``.imshow(`` on anything, or uses an attribute of a name ``ax``, ``axs``, ``axes`` or ``fig``
    (also ``axes[i].``, ``ax2.``, ``fig_attn.``). Such a cell is plumbing: split the computation the
    prose teaches (asserts and printed numbers included) into a visible cell and put the drawing in
    a folded cell right after it. A set-up cell that only defines a helper which draws when called
    later (``def show_figure(fig): fig.savefig(...)``) does not draw and may stay visible.
    ``hide-cell`` does not count: it folds the picture too, and the reader should see the pictures.
    """
    found = [line for page in toc_pages() for line in unfolded_drawing_cells(page)]
    assert found == [], "move the plotting into a cell tagged hide-input (STYLE.md):\n" + "\n".join(found)


def test_drawing_calls_finds_top_level_plotting_and_skips_helpers():
    assert drawing_calls("fig, axes = plt.subplots(1, 2)\nx = 1") == ["plt.subplots"]
    assert drawing_calls("for ax, img in zip(grid.flat, images):\n    ax.set_title('a')") == ["ax.set_title"]
    assert drawing_calls("axes[0].scatter(a, b)\nshow(fig)") == ["axes.scatter"]
    assert drawing_calls("panel.imshow(img)") == [".imshow"]
    assert drawing_calls("%matplotlib inline\nplt.show()") == ["plt.show"]
    helper = (
        "def show_figure(fig):\n    fig.savefig(buf)\n    plt.close(fig)\n\n\nlabel = lambda ax: ax.set_xlabel('x')"
    )
    assert drawing_calls(helper) == []
    assert drawing_calls("loss = model(images)\nprint(f'{loss:.3f}')\naxis = 1\nplt.rcParams.update({})") == []


# --------------------------------------------------------------------------- the API page
def api_page():
    """scripts/api_page.py, the Sphinx extension behind book/api.md's generated parts."""
    spec = importlib.util.spec_from_file_location("api_page", ROOT / "scripts" / "api_page.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def documented_objects() -> tuple[set[int], set[str]]:
    """(ids of the objects book/api.md documents, names of the modules it documents)."""
    text = (ROOT / "book" / "api.md").read_text(encoding="utf-8")
    if "```{vitssl-other-modules}" in text:  # the modules no section names yet, with their members
        text += "".join(f"\n.. automodule:: {name}\n   :members:\n" for name in api_page().undocumented_modules(text))
    objects: set[int] = set()
    modules: set[str] = set()
    for m in re.finditer(r"^\.\. auto(\w+):: ([\w.]+)\n((?:[ \t]+:[^\n]*\n)*)", text, re.MULTILINE):
        kind, target, options = m.group(1), m.group(2), m.group(3)
        if kind == "module":
            module = importlib.import_module(target)
            modules.add(target)
            if ":members:" in options:
                objects |= {id(getattr(module, name)) for name in public_members(module)}
        else:
            module_name, _, name = target.rpartition(".")
            objects.add(id(getattr(importlib.import_module(module_name), name)))
    return objects, modules


def public_members(module: types.ModuleType) -> list[str]:
    """What ``automodule :members:`` shows: ``__all__``, else what the module defines with a docstring or ``#:``."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    source = inspect.getsource(module)
    names = re.findall(r"^#:.*\n(\w+)\s*[:=]", source, re.MULTILINE)
    for name, obj in vars(module).items():
        defined_here = getattr(obj, "__module__", None) == module.__name__
        if not name.startswith("_") and defined_here and inspect.getdoc(obj) and callable(obj):
            names.append(name)
    return names


def chapter_imports() -> list[tuple[str, str, str]]:
    """(page, module, name) for every ``from vitssl_core[.module] import name`` and ``vitssl_core.name`` in code cells."""
    found = []
    for page in toc_pages():
        for text in cells(page, "code"):
            text = re.sub(r"#[^\n]*", "", text)
            for m in re.finditer(r"from\s+vitssl_core(?:\.(\w+))?\s+import\s+(\([^)]*\)|[^\n]*)", text):
                for item in m.group(2).strip("()").split(","):
                    name = item.split(" as ")[0].strip()
                    if name:
                        found.append((rel(page), m.group(1) or "", name))
            for m in re.finditer(r"(?<![\w.])vitssl_core\.(\w+)(?:\.(\w+))?", text):
                first, second = m.group(1), m.group(2)
                is_module = isinstance(resolve("", first), types.ModuleType)
                if is_module and second:
                    found.append((rel(page), first, second))
                elif not is_module:
                    found.append((rel(page), "", first))
    return found


def resolve(module_name: str, name: str):
    """``from vitssl_core[.module_name] import name``: an attribute, or a submodule not imported yet."""
    module = importlib.import_module(f"vitssl_core.{module_name}" if module_name else "vitssl_core")
    if hasattr(module, name):
        return getattr(module, name)
    return importlib.import_module(f"{module.__name__}.{name}")


def test_the_api_page_documents_every_export_and_every_name_the_chapters_import():
    objects, modules = documented_objects()
    package = importlib.import_module("vitssl_core")
    exports = [n for n, obj in vars(package).items() if not n.startswith("_") and not isinstance(obj, types.ModuleType)]
    assert len(exports) > 50
    missing = [f"vitssl_core.{n}" for n in exports if id(getattr(package, n)) not in objects]
    imports = chapter_imports()
    assert len(imports) > 100  # the parser above finds the chapters' imports at all
    for page, module_name, name in imports:
        obj = resolve(module_name, name)
        ok = obj.__name__ in modules if isinstance(obj, types.ModuleType) else id(obj) in objects
        if not ok:
            missing.append(f"{page}: vitssl_core.{module_name + '.' if module_name else ''}{name}")
    assert missing == [], "not documented on book/api.md:\n" + "\n".join(sorted(set(missing)))


# --------------------------------------------------------------------------- the glossary
def glossary_entries() -> list[list[str]]:
    """Each entry's term lines (the lines before its indented definition)."""
    text = (ROOT / "book" / "glossary.md").read_text(encoding="utf-8")
    body = text.split("```{glossary}", 1)[1].split("\n```", 1)[0]
    entries = []
    for block in re.split(r"\n\s*\n(?=\S)", body.strip()):
        terms = []
        for line in block.splitlines():
            if line.startswith((" ", "\t")):
                break
            terms.append(line.strip())
        entries.append(terms)
    return entries


def test_every_glossary_entry_carries_its_chinese_term():
    entries = glossary_entries()
    assert len(entries) >= 43
    han = re.compile(r"[\u4e00-\u9fff]")
    without = [terms[0] for terms in entries if not any(han.search(t) for t in terms[1:])]
    assert without == []


def test_the_chinese_guide_maps_every_article_section_and_types_no_result():
    text = (ROOT / "book" / "zh_guide.md").read_text(encoding="utf-8")
    for section in range(1, 11):
        assert re.search(rf"§{section}(?!\d)", text), f"article section §{section} is not mapped"
    linked = set(re.findall(r"\{doc\}`([^`<]+)`", text))
    chapters = {rel(p)[len("book/") :].rsplit(".", 1)[0] for p in toc_pages()}
    assert linked <= chapters
    assert chapters - linked <= {"intro", "zh_guide", "glossary", "bibliography"}
    assert not re.search(r"\d+(\.\d+)?\s*%", text), "numbers live in results, not in the guide"


# --------------------------------------------------------------------------- the vitssl command on the pages
def option_strings(parser) -> set[str]:
    found = set()
    for action in parser._actions:
        found |= set(action.option_strings)
        if isinstance(action.choices, dict):  # a subcommand's parser
            for sub in action.choices.values():
                found |= option_strings(sub)
    return found


def test_every_flag_the_gpu_page_names_exists_in_vitssl_or_torchrun():
    from torch.distributed.run import get_args_parser

    from vitssl_core.__main__ import build_parser

    ship = subprocess.run(  # the page also ships what the GPU trained, with scripts/ship_checkpoint.py
        [sys.executable, str(ROOT / "scripts" / "ship_checkpoint.py"), "--help"], capture_output=True, text=True
    )
    known = option_strings(build_parser()) | option_strings(get_args_parser())
    known |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", ship.stdout))
    assert {"--device", "--precision", "--batch-size", "--nnodes", "--node_rank", "--name"} <= known
    text = (ROOT / "book" / "gpus.md").read_text(encoding="utf-8")
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", text))
    assert len(named) > 15
    assert named - known == set()


def test_the_api_page_prints_the_help_of_every_vitssl_subcommand():
    helper = api_page()
    text = (ROOT / "book" / "api.md").read_text(encoding="utf-8")
    assert "```{vitssl-help} all\n```" in text
    names = list(helper.subcommands())
    assert {"pretrain", "evaluate", "show"} <= set(names)
    for name in names:
        assert helper.command_help(name).startswith(f"usage: vitssl {name}")
    assert "--batch-size" in helper.command_help("pretrain")
    assert "{" + ",".join(names) + "}" in helper.command_help()  # the top-level usage line lists them all
    with pytest.raises(ValueError, match="no subcommand 'train'"):
        helper.command_help("train")


def test_a_module_no_section_names_still_reaches_the_api_page():
    helper = api_page()
    text = (ROOT / "book" / "api.md").read_text(encoding="utf-8")
    assert "```{vitssl-other-modules}\n```" in text
    without_losses = text.replace(".. automodule:: vitssl_core.losses\n", "")
    assert set(helper.undocumented_modules(without_losses)) == {
        *helper.undocumented_modules(text),
        "vitssl_core.losses",
    }


def test_the_intro_names_exactly_the_modules_the_chapters_import():
    text = (ROOT / "book" / "intro.md").read_text(encoding="utf-8")
    sentence = text.split("The chapters import from `vitssl_core` itself and from", 1)[1].split("{doc}`api`", 1)[0]
    named = set(re.findall(r"`(\w+)`", sentence))
    imported = {module for _, module, _ in chapter_imports() if module}
    for _, module, name in chapter_imports():  # `from vitssl_core import visualize` imports a module too
        if not module and isinstance(resolve("", name), types.ModuleType):
            imported.add(name)
    assert named == imported
