"""The package's version: the installed distribution's, or pyproject.toml's in an uninstalled checkout."""

from importlib import metadata
from pathlib import Path


def _read_version() -> str:
    try:
        return metadata.version("vitssl-core")
    except metadata.PackageNotFoundError:  # imported from a checkout that was never pip-installed
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        lines = pyproject.read_text().splitlines() if pyproject.is_file() else []
        found = [line.split('"')[1] for line in lines if line.startswith("version = ")]
        return found[0] if found else "0+unknown"


__version__ = _read_version()
