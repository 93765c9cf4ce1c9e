"""Every third-party package the library imports is a declared dependency (not one that happens to
come with another); a package only an extra brings is imported only after `extras.need` says which
extra to install; and a missing extra gets that one message."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
# import name -> distribution name, where they differ
DIST = {"ot": "pot", "sklearn": "scikit-learn", "yaml": "pyyaml", "ruamel": "ruamel.yaml", "PIL": "pillow"}
# modules of a dependency that import an optional package themselves
INDIRECT = {"ray.tune.search.optuna": "optuna"}


def _name(requirement: str) -> str:
    for sep in ("[", ">", "<", "=", "!", "~", ";"):
        requirement = requirement.split(sep)[0]
    return requirement.strip().lower()


def _imports() -> dict[str, set[Path]]:
    """Top-level third-party import name -> the library files that import it."""
    found: dict[str, set[Path]] = {}
    for folder in ("pipeline", "stages"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names = {node.module.split(".")[0]} | (
                        {INDIRECT[node.module]} if node.module in INDIRECT else set()
                    )
                else:
                    continue
                for name in names - set(sys.stdlib_module_names) - {"pipeline", "stages", "__future__"}:
                    found.setdefault(name, set()).add(path)
    return found


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_every_imported_package_is_declared():
    project = _project()
    declared = {_name(d) for d in project["dependencies"]}
    extras = {_name(d) for ds in project["optional-dependencies"].values() for d in ds}
    missing = sorted(name for name in _imports() if DIST.get(name, name).lower() not in declared | extras)
    assert missing == [], f"imported but not declared in pyproject.toml: {missing}"


def test_a_package_only_an_extra_brings_is_imported_after_extras_need_names_the_extra():
    project = _project()
    core = {_name(d) for d in project["dependencies"]}
    only_extra = {
        name: paths for name, paths in _imports().items() if DIST.get(name, name).lower() not in core and name != "ray"
    }
    assert "optuna" in only_extra and "mlxtend" in only_extra  # what the check is about still exists
    unguarded = sorted(
        f"{p.relative_to(ROOT)} imports {name}"
        for name, paths in only_extra.items()
        for p in paths
        if f'extras.need("{name}"' not in p.read_text() and f'find_spec("{name}")' not in p.read_text()
    )
    assert unguarded == []
    # every extra the code names exists, and `all` (which dev installs) holds every other one
    groups = project["optional-dependencies"]
    named = {
        line.split('"')[3]
        for p in ROOT.joinpath("pipeline").rglob("*.py")
        for line in p.read_text().splitlines()
        if "extras.need(" in line and line.count('"') >= 4
    }
    assert named and named <= set(groups)
    assert set(groups["all"][0].split("[")[1].rstrip("]").split(",")) == set(groups) - {"all", "dev"}
    assert "ganpipe[all]" in groups["dev"]


def test_a_missing_extra_is_one_message_naming_the_setting_and_the_install_command():
    from pipeline.core import extras

    with pytest.raises(extras.MissingExtra) as e:
        extras.need("ganpipe_no_such_module", "optuna", "tune.search_alg: optuna")
    assert str(e.value).startswith("tune.search_alg: optuna needs the package 'ganpipe_no_such_module'")
    assert "pip install 'ganpipe[optuna]'" in str(e.value)
    extras.need("numpy", "optuna", "anything")  # installed: nothing happens
