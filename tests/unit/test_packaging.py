"""Every third-party package the library imports is a declared dependency (not one that happens to
come with another)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
# import name -> distribution name, where they differ
DIST = {"ot": "pot", "sklearn": "scikit-learn", "yaml": "pyyaml", "ruamel": "ruamel.yaml", "PIL": "pillow"}


def _imported_top_level() -> set[str]:
    names = set()
    for folder in ("pipeline", "stages"):
        for path in (ROOT / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"pipeline", "stages", "__future__"}


def test_every_imported_package_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {
        d.split(">")[0].split("=")[0].split("[")[0].split("<")[0].strip().lower() for d in project["dependencies"]
    }
    extras = {
        d.split(">")[0].split("[")[0].strip().lower() for ds in project["optional-dependencies"].values() for d in ds
    }
    missing = sorted(name for name in _imported_top_level() if DIST.get(name, name).lower() not in declared | extras)
    assert missing == [], f"imported but not declared in pyproject.toml: {missing}"
