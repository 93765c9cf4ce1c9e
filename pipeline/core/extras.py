"""The optional parts of the package (pyproject.toml's extras) and the one message a user gets when
the part a setting asks for is not installed."""

from __future__ import annotations

import importlib.util


class MissingExtra(RuntimeError):
    """A setting needs a package from one of ganpipe's extras; the message says how to install it."""


def need(module: str, extra: str, what: str) -> None:
    """Raise MissingExtra naming `what` (the setting or command) and the pip command that installs
    `extra`, unless `module` can be imported."""
    if importlib.util.find_spec(module) is None:
        raise MissingExtra(
            f"{what} needs the package {module!r}, which is not installed: "
            f"pip install 'ganpipe[{extra}]' (in a checkout: pip install -e '.[{extra}]')"
        )
