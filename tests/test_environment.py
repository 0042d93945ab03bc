"""The conda environment and the pip extras list the same packages with the same ranges."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _normalise(req: str) -> str:
    name, spec = re.match(r"^([A-Za-z0-9_.\-]+)(.*)$", req.replace(" ", "")).groups()
    return name.lower().replace("_", "-") + ",".join(sorted(spec.split(",")))


def _pyproject_requirements() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for name, extra in project["optional-dependencies"].items():
        reqs += [r for r in extra if not r.startswith("vitssl-core")]
    return {_normalise(r) for r in reqs}


def _conda_pip_requirements() -> set[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {_normalise(r) for r in pip if not r.startswith("-e")}


def test_environment_yml_matches_pyproject():
    assert _conda_pip_requirements() == _pyproject_requirements()


def test_environment_pins_python_311_and_installs_the_package():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert "-e ." in pip


def test_dev_extra_holds_book_test_and_the_linter():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["dev"][0] == "vitssl-core[book,test]"
    assert [_normalise(r).split(">")[0] for r in extras["dev"][1:]] == ["ruff"]  # what .ci/run checks with
