"""The release files: one version everywhere, a citation that is valid CFF 1.2, the licences named."""

import importlib.util
import json
import tomllib
from pathlib import Path

import pytest
import yaml

import vitssl_core

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CITATION = yaml.safe_load((REPO / "CITATION.cff").read_text())


def test_one_version_everywhere():
    version = PYPROJECT["project"]["version"]
    assert CITATION["version"] == version
    assert vitssl_core.__version__ == version
    assert f"## {version} (" in (REPO / "CHANGELOG.md").read_text()  # the changelog covers this release


def test_citation_has_title_version_and_date():
    assert CITATION["cff-version"] == "1.2.0"
    assert CITATION["title"] and CITATION["authors"] and str(CITATION["date-released"])[:4] == "2026"
    assert CITATION["license"] == "MIT" == PYPROJECT["project"]["license"]["text"]


@pytest.mark.skipif(importlib.util.find_spec("cffconvert") is None, reason="no registry package with the CFF schema")
def test_citation_is_valid_cff_1_2():
    # cffconvert bundles the official CFF 1.2.0 JSON schema (CI installs it with --no-deps for that file)
    import jsonschema

    schema_path = Path(importlib.util.find_spec("cffconvert").origin).parent / "schemas" / "1.2.0" / "schema.json"
    schema = json.loads(schema_path.read_text())
    citation = json.loads(json.dumps(CITATION, default=str))  # YAML dates -> ISO strings, as CFF writes them
    jsonschema.validate(citation, schema)
    broken = dict(citation, authors="nobody")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_licences_are_named_where_readers_look():
    assert "MIT License" in (REPO / "LICENSE").read_text()
    book = (REPO / "LICENSE-BOOK.md").read_text()
    assert "CC BY 4.0" in book and "flowchart" in book and "not ours to license" in book
    footer = yaml.safe_load((REPO / "_config.yml").read_text())["html"]["extra_footer"]
    assert "CC BY 4.0" in footer and "MIT" in footer and "not ours to license" in footer
    readme = (REPO / "README.md").read_text()
    assert "CC BY 4.0" in readme and "LICENSE" in readme and "CITATION.cff" in readme
