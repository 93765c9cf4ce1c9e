"""Environment variables set for the length of a block, then put back as they were."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def temporarily(values: dict[str, str]):
    """Set `values` in os.environ for the block (child processes started in it inherit them); restore
    each variable afterwards, removing those that were not set. Process-wide: not for threads that
    need different values at once."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
