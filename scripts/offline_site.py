"""Sphinx extension for the book's website: every script a page runs is served by the site itself.

Loaded by ``_config.yml`` (``sphinx.local_extensions``). It does three things:

1. **Mermaid from a classic script.** sphinxcontrib-mermaid turns a ``{mermaid}`` directive
   into ``<pre class="mermaid">`` inside a numbered figure with its caption and alt text, and on
   each page that has a diagram adds an inline ``<script type="module">`` that imports Mermaid's
   ES module. Browsers refuse ES-module imports on ``file://`` pages, so a reader who opens
   ``_build/html/index.html`` directly would see the diagrams' source text, not pictures. We
   keep the directive and replace that script: pages with a diagram get Mermaid's single-file
   build (``_static/mermaid/mermaid.min.js``, a classic script that
   ``scripts/fetch_static.sh`` copies from npm) and a few lines that draw every ``.mermaid``
   element once the page has loaded, and again when the reader switches light/dark theme.
   That works over http(s) and from ``file://`` alike, with no other host involved.
2. **A clear error when the static files were not fetched.** If MathJax or Mermaid is missing
   from ``html_static_path``, the build warns (an error under ``-W``) and names the script to
   run, instead of producing pages whose maths and diagrams silently fail to load.
3. **No duplicate inline scripts.** Under Jupyter Book 1 some extensions (sphinx-thebe,
   sphinx-togglebutton) register their inline configuration script twice, and the second
   ``const THEBE_JS_URL = ...`` throws a SyntaxError in every page's console. We keep the
   first copy of each identical script.
"""

from __future__ import annotations

import json
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util import logging

logger = logging.getLogger(__name__)

# Relative to the html_static_path folders, i.e. to _static/ in the built site.
MERMAID_JS = "mermaid/mermaid.min.js"
FETCH_HINT = "run scripts/fetch_static.sh before building the book"

# Draws every diagram after the page has loaded, in the theme's light or dark palette, and
# draws them again from their source when the reader switches theme (the pydata theme sets
# <html data-theme="light|dark">). Mermaid is a global from mermaid.min.js, loaded with defer,
# so it is defined before DOMContentLoaded fires.
_MERMAID_INIT = """
document.addEventListener("DOMContentLoaded", () => {
  const nodes = [...document.querySelectorAll("pre.mermaid, div.mermaid")];
  if (!nodes.length || typeof mermaid === "undefined") return;
  nodes.forEach((el) => { el.dataset.mermaidSource = el.textContent; });
  const theme = () => (document.documentElement.dataset.theme === "dark" ? "dark" : "default");
  let drawn = null;
  let queue = Promise.resolve();
  const draw = () => {
    const wanted = theme();
    if (wanted === drawn) return;
    drawn = wanted;
    queue = queue.then(async () => {
      nodes.forEach((el) => { el.removeAttribute("data-processed"); el.textContent = el.dataset.mermaidSource; });
      mermaid.initialize(Object.assign(%(init)s, { startOnLoad: false, theme: wanted }));
      try { await mermaid.run({ nodes }); } catch (err) { console.error("Mermaid: " + ((err && err.message) || err)); }
    });
  };
  draw();
  new MutationObserver(draw).observe(document.documentElement, { attributes: true, attributeFilter: ["data-theme"] });
});
"""


def _find_static(app: Sphinx, relpath: str) -> Path | None:
    """The file ``relpath`` in the first html_static_path folder that has it, else None."""
    for folder in app.config.html_static_path:
        candidate = Path(app.confdir, folder, relpath)
        if candidate.is_file():
            return candidate
    return None


def _replace_mermaid_script(app: Sphinx) -> None:
    """Disconnect sphinxcontrib-mermaid's ES-module script writer; ours takes its place."""
    from sphinxcontrib import mermaid as sphinx_mermaid

    listeners = [
        lst for lst in app.events.listeners.get("html-page-context", []) if lst.handler is sphinx_mermaid.install_js
    ]
    if not listeners:
        raise ExtensionError(
            "offline_site: sphinxcontrib.mermaid.install_js is not connected to "
            "html-page-context; this sphinxcontrib-mermaid version is not supported"
        )
    for listener in listeners:
        app.disconnect(listener.id)


def _check_static_files(app: Sphinx) -> None:
    """Warn, naming the fix, when the files scripts/fetch_static.sh provides are missing."""
    if app.builder.format != "html":
        return
    mathjax = app.config.mathjax_path
    if mathjax and "://" not in mathjax and not mathjax.startswith("/"):
        if _find_static(app, mathjax) is None:
            logger.warning("MathJax (_static/%s) is missing: %s", mathjax, FETCH_HINT)
    if _find_static(app, MERMAID_JS) is None:
        logger.warning("Mermaid (_static/%s) is missing: %s", MERMAID_JS, FETCH_HINT)


def _add_mermaid_js(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """On pages with a Mermaid diagram, add mermaid.min.js and the script that draws them."""
    from sphinxcontrib.mermaid import mermaid as mermaid_node

    if app.builder.format != "html" or doctree is None or doctree.next_node(mermaid_node) is None:
        return
    init = {k: v for k, v in (app.config.mermaid_init_config or {}).items() if k != "startOnLoad"}
    app.add_js_file(MERMAID_JS, priority=app.config.mermaid_js_priority, defer="defer")
    app.add_js_file(None, body=_MERMAID_INIT % {"init": json.dumps(init)}, priority=app.config.mermaid_js_priority)


def _drop_duplicate_scripts(app: Sphinx, pagename: str, templatename: str, context: dict, doctree) -> None:
    """Keep the first of identical scripts (same file or inline body, same attributes)."""
    scripts = context.get("script_files")
    if not isinstance(scripts, list):
        return
    seen, unique = set(), []
    for js in scripts:
        # Inline scripts come with filename None or "" depending on who added them.
        key = (getattr(js, "filename", js) or None, tuple(sorted(getattr(js, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    scripts[:] = unique


def setup(app: Sphinx) -> dict:
    app.setup_extension("sphinx.ext.mathjax")
    app.setup_extension("sphinxcontrib.mermaid")
    _replace_mermaid_script(app)
    app.connect("builder-inited", _check_static_files)
    app.connect("html-page-context", _add_mermaid_js)
    # After every other handler has added its scripts (default priority 500).
    app.connect("html-page-context", _drop_duplicate_scripts, priority=900)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}


def quick_check() -> list[str]:
    """Build a one-page site with a diagram in a temporary folder; return what is wrong with it (nothing: [])."""
    import sys
    import tempfile

    from sphinx.application import Sphinx

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # as _config.yml's local_extensions does
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp, "src"), Path(tmp, "html")
        (src / "_static" / "mermaid").mkdir(parents=True)
        (src / "_static" / MERMAID_JS).write_text("/* stands in for the file fetch_static.sh copies */\n")
        (src / "_static" / "mathjax.js").write_text("/* likewise */\n")
        (src / "conf.py").write_text(
            "extensions = ['offline_site']\nhtml_static_path = ['_static']\nmathjax_path = 'mathjax.js'\n"
        )
        (src / "index.rst").write_text(
            "Quick\n=====\n\n.. mermaid::\n\n   graph LR\n     a --> b\n\n"
            "Maths: :math:`x^2`.\n\n.. toctree::\n\n   plain\n"
        )
        (src / "plain.rst").write_text("Plain\n=====\n\nText only.\n")
        app = Sphinx(str(src), str(src), str(out), str(Path(tmp, "doctrees")), "html", status=None, warningiserror=True)
        app.build()
        page, plain = (out / "index.html").read_text(), (out / "plain.html").read_text()
    problems = []
    if f'src="_static/{MERMAID_JS}' not in page or "DOMContentLoaded" not in page:
        problems.append("the page with a diagram does not load mermaid.min.js and its drawing script")
    if 'type="module"' in page:
        problems.append("sphinxcontrib-mermaid's ES-module import is still on the page")
    if MERMAID_JS in plain:
        problems.append("a page without a diagram loads Mermaid")
    if page.count("const THEBE_JS_URL") > 1:
        problems.append("an inline script appears twice")
    return problems


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Smoke test of this Sphinx extension (the book loads it itself).")
    parser.add_argument(
        "--quick",
        action="store_true",
        required=True,
        help="build a one-page site in a temporary folder and check its scripts",
    )
    parser.parse_args()
    found = quick_check()
    print("\n".join(found) or "offline_site: a one-page site builds and loads Mermaid without ES modules")
    raise SystemExit(1 if found else 0)
