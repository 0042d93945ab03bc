"""Store the notebooks nbval executed in the book's jupyter-cache, so the build does not run them again.

    VITSSL_EXECUTED_DIR=/tmp/executed pytest               # book/conftest.py keeps each notebook that passed
    python scripts/cache_notebooks.py /tmp/executed _build/.jupyter_cache
    jupyter-book build .                                    # "Using cached notebook" for each of them

The book is built with ``execute_notebooks: cache``: myst-nb looks a notebook up by the hash of
its code cells' sources and metadata, and executes only what it does not find. An executed copy
whose sources no longer match the chapter (edited since) is skipped here with a line that says
so, and the build then executes that chapter itself.
"""

import argparse
import sys
from pathlib import Path

import nbformat
from jupyter_cache import get_cache
from jupyter_cache.base import CacheBundleIn

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("executed", type=Path, help="the folder book/conftest.py wrote ($VITSSL_EXECUTED_DIR)")
    parser.add_argument("cache", type=Path, help="the book's jupyter-cache folder (BUILD/_build/.jupyter_cache)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the folder pytest ran in (default: the repository)")
    args = parser.parse_args(argv)
    if not args.executed.is_dir():
        parser.error(f"{args.executed} is not a folder: run pytest with VITSSL_EXECUTED_DIR={args.executed} first")
    cache = get_cache(str(args.cache))
    stored, stale = 0, []
    for path in sorted(args.executed.rglob("*.ipynb")):
        source = args.root / path.relative_to(args.executed)
        executed = nbformat.read(str(path), as_version=4)
        key = cache.create_hashed_notebook  # the key the build looks a notebook up by
        if not source.is_file() or key(nbformat.read(str(source), as_version=4))[1] != key(executed)[1]:
            stale.append(str(path.relative_to(args.executed)))
            continue
        cache.cache_notebook_bundle(CacheBundleIn(executed, str(source)), check_validity=True, overwrite=True)
        stored += 1
    print(f"cached {stored} executed notebook(s) in {args.cache}")
    if stale:
        print(f"not cached, changed since they ran (the build executes them): {', '.join(stale)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
