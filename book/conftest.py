"""Keep what nbval executed, so the book build can use it instead of running every notebook again.

CI executes every chapter twice unless told otherwise: once under nbval (the README's ``pytest``)
and once when ``jupyter-book build`` fills the pages with outputs. With ``VITSSL_EXECUTED_DIR``
set, each notebook that nbval runs from its first cell to its last without a failure is written
there with its outputs (same relative path as in the repository), and
``scripts/cache_notebooks.py`` stores those files in the book's jupyter-cache, where the build
finds them by the hash of their code cells. A notebook that failed, was skipped or was edited
since is not found there, and the build executes it itself, as before.

Without the variable this file only keeps each notebook's cells together under pytest-xdist.
"""

import os
import re
from pathlib import Path

import nbformat
import pytest

try:
    from nbval.plugin import IPyNbCell
except ImportError:  # nbval not installed: nothing to keep
    IPyNbCell = None

OUT = os.environ.get("VITSSL_EXECUTED_DIR", "").strip()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if not OUT or IPyNbCell is None or not isinstance(item, IPyNbCell):
        return
    report = outcome.get_result()
    notebook = item.parent
    if not report.passed:
        notebook._vitssl_spoiled = True  # a failed or skipped cell: this run is not the notebook's
    if report.when == "call" and report.passed:  # a skip inside runtest reports "skipped", caught above
        count = getattr(notebook, "_vitssl_count", 0) + 1
        notebook._vitssl_count = count
        item.cell.outputs = [nbformat.from_dict(dict(out)) for out in item.test_outputs]
        item.cell.execution_count = count
        for out in item.cell.outputs:
            if out.get("output_type") == "execute_result":
                out["execution_count"] = count


def pytest_runtest_teardown(item, nextitem):
    if not OUT or IPyNbCell is None or not isinstance(item, IPyNbCell):
        return
    notebook = item.parent
    if nextitem is not None and nextitem.parent is notebook:
        return  # not the notebook's last cell
    cells = [c for c in notebook.nb.cells if c.cell_type == "code"]
    if getattr(notebook, "_vitssl_spoiled", False) or getattr(notebook, "_vitssl_count", 0) != len(cells):
        return
    target = Path(OUT) / Path(str(notebook.fspath)).resolve().relative_to(Path(str(notebook.config.rootpath)).resolve())
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook.nb, str(target))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist's ``--dist loadgroup``: all cells of a notebook on one worker, in order."""
    if IPyNbCell is None or not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        if isinstance(item, IPyNbCell):
            item.add_marker(pytest.mark.xdist_group(re.sub(r"\W", "_", item.parent.nodeid)))  # a plain name
